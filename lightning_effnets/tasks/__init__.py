"""Task LightningModules; compression-agnostic, all built on :class:`EffnetsTaskMixin`."""

from lightning_effnets.tasks.base import EffnetsTaskMixin
from lightning_effnets.tasks.classification import ImageClassifier

__all__ = ["EffnetsTaskMixin", "ImageClassifier"]
