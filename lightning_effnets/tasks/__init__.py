"""Task LightningModules; compression-agnostic, all built on :class:`EffnetsTaskMixin`."""

from lightning_effnets.tasks.base import EffnetsTaskMixin
from lightning_effnets.tasks.classification import ImageClassifier
from lightning_effnets.tasks.detection import ObjectDetector
from lightning_effnets.tasks.referring import ReferringExpressionGrounder
from lightning_effnets.tasks.reid import PersonReID
from lightning_effnets.tasks.super_resolution import SuperResolver

__all__ = ["EffnetsTaskMixin", "ImageClassifier", "ObjectDetector", "ReferringExpressionGrounder", "PersonReID",
           "SuperResolver"]
