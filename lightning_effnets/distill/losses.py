"""Distillation losses: kernel-space feature matching with a learnable 1x1 mapping, and softened-logit KD.

PKKD (arXiv:2009.13044) compares an adder student's Laplace-kernel features with its CNN teacher's Gaussian-kernel
features (:mod:`lightning_effnets.distill.kernels`) through a learnable 1x1 convolution on the student side, and
adds Hinton-style temperature-softened logit distillation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KernelFeatureLoss", "output_distillation_loss", "soft_logit_loss"]


def soft_logit_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (Hinton et al.).

    The ``T^2`` factor keeps the gradient scale independent of ``T``. Class scores are on dimension 1 (any
    trailing dimensions, e.g. per-pixel logits, are averaged like the batch). Pass detached teacher logits to
    leave the teacher untouched.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"soft_logit_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"soft_logit_loss: temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * temperature**2


def output_distillation_loss(student: Tensor, teacher: Tensor, kind: str = "l1") -> Tensor:
    """Distance between two dense outputs (e.g. super-resolved images): ``"l1"`` or ``"mse"``, mean-reduced."""
    if student.shape != teacher.shape:
        raise ValueError(f"output distillation: student output {tuple(student.shape)} and teacher output "
                         f"{tuple(teacher.shape)} differ in shape")
    if kind == "l1":
        return F.l1_loss(student, teacher)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"output distillation kind must be 'l1' or 'mse', got {kind!r}")


class KernelFeatureLoss(nn.Module):
    """``mean((conv1x1(student_kernel) - teacher_kernel)^2)``: PKKD's feature loss with its learnable mapping.

    The 1x1 convolution (``student_channels -> teacher_channels``, with bias) lets the student's kernel features
    match the teacher's up to a per-position linear map instead of exactly; it is initialised to the identity
    when the channel counts agree (matching starts as a plain L2 between the two kernel maps).
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.mapping = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=True)
        if student_channels == teacher_channels:
            with torch.no_grad():
                self.mapping.weight.copy_(torch.eye(teacher_channels).view(teacher_channels, teacher_channels, 1, 1))
                self.mapping.bias.zero_()

    def forward(self, student_kernel: Tensor, teacher_kernel: Tensor) -> Tensor:
        mapped = self.mapping(student_kernel)
        if mapped.shape != teacher_kernel.shape:
            raise ValueError(f"KernelFeatureLoss: mapped student features {tuple(mapped.shape)} do not match the "
                             f"teacher's {tuple(teacher_kernel.shape)} (spatial sizes must agree)")
        return F.mse_loss(mapped, teacher_kernel)
