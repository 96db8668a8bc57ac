"""Knowledge-distillation building blocks (kernels, losses, schedules, teachers) used by PKKD (arXiv:2009.13044)."""

from lightning_effnets.distill.kernels import gaussian_kernel, laplace_kernel, negative_squared_distance
from lightning_effnets.distill.losses import KernelFeatureLoss, output_distillation_loss, soft_logit_loss
from lightning_effnets.distill.schedule import progressive_weight
from lightning_effnets.distill.teacher import adder_units, cnn_twin, conv_from_adder

__all__: list[str] = ["KernelFeatureLoss", "adder_units", "cnn_twin", "conv_from_adder", "gaussian_kernel",
                      "laplace_kernel", "negative_squared_distance", "output_distillation_loss",
                      "progressive_weight", "soft_logit_loss"]
