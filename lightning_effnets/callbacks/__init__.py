"""The public Lightning face of every method: one callback (or a small family) per file."""

from lightning_effnets.callbacks.adder import AdaptiveAdderLR, AdderConversion
from lightning_effnets.callbacks.binary import Binarization, BopOptimizer
from lightning_effnets.callbacks.bn_recalibration import BatchNormRecalibration
from lightning_effnets.callbacks.camera_bn import CameraBN
from lightning_effnets.callbacks.cost import CostReport
from lightning_effnets.callbacks.distillation import ProgressiveKernelDistillation
from lightning_effnets.callbacks.pruning import ChannelPruning

__all__ = ["AdaptiveAdderLR", "AdderConversion", "BatchNormRecalibration", "Binarization", "BopOptimizer", "CameraBN",
           "ChannelPruning", "CostReport", "ProgressiveKernelDistillation"]
