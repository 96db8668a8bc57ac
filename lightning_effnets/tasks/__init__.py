"""Task LightningModules; compression-agnostic, all built on :class:`EffnetsTaskMixin`."""

from lightning_effnets.tasks.base import EffnetsTaskMixin
from lightning_effnets.tasks.classification import ImageClassifier
from lightning_effnets.tasks.detection import ObjectDetector

__all__ = ["EffnetsTaskMixin", "ImageClassifier", "ObjectDetector"]
