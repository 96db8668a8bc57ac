"""Learnable power activation of AdderSR (arXiv:2009.08891).

``P(y) = sign(y) * |y|^alpha`` with a learnable exponent: adder layers compute L1 distances, whose outputs are
far less sensitive to the high-frequency detail super-resolution needs than a CNN's; raising the magnitude to a
learned power (alpha > 1 stretches large responses, alpha < 1 compresses them) gives the network that control
back. It is odd-symmetric, so the sign of the response survives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PowerActivation", "power_activation"]


def power_activation(x: Tensor, alpha: Tensor, eps: float = 1e-6) -> Tensor:
    """``sign(x) * |x|^alpha`` with gradients that stay finite at ``x = 0``.

    ``|x|`` is clamped below at ``eps`` before the power: for ``alpha < 1`` the true derivative
    ``alpha |x|^(alpha-1)`` is infinite at 0 and ``d/d alpha = |x|^alpha log|x|`` is ``0 * -inf``. With the clamp,
    both are finite everywhere, and ``sign(0) = 0`` keeps ``P(0) = 0`` exactly.
    """
    magnitude = x.abs().clamp_min(eps)
    return torch.sign(x) * magnitude.pow(alpha)


class PowerActivation(nn.Module):
    """AdderSR's learnable power activation ``sign(x) * |x|^alpha`` (arXiv:2009.08891).

    Args:
        num_parameters: 1 for one exponent shared by all channels, or the channel count for one per channel
            (the ``nn.PReLU`` convention; channels are dimension 1).
        init: initial exponent; 1.0 starts as the identity.
        eps: lower clamp of ``|x|`` that keeps gradients finite at 0 (see :func:`power_activation`).
    """

    def __init__(self, num_parameters: int = 1, init: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        if num_parameters < 1:
            raise ValueError(f"PowerActivation: num_parameters must be >= 1, got {num_parameters}")
        if init <= 0:
            raise ValueError(f"PowerActivation: the initial exponent must be positive, got {init}")
        self.num_parameters, self.eps = num_parameters, eps
        self.alpha = nn.Parameter(torch.full((num_parameters,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha
        if self.num_parameters > 1:
            if x.dim() < 2 or x.shape[1] != self.num_parameters:
                raise ValueError(f"PowerActivation has {self.num_parameters} exponents but the input has shape "
                                 f"{tuple(x.shape)} (channels are dimension 1)")
            alpha = alpha.view(1, -1, *([1] * (x.dim() - 2)))
        return power_activation(x, alpha, self.eps)

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}"
