"""Kernel mappings of layer outputs for progressive kernel knowledge distillation (PKKD, arXiv:2009.13044).

An adder layer outputs ``-||x - w||_1`` and a convolution ``x . w``, so their features live in different spaces.
PKKD compares them after mapping both into kernel spaces where they are similarities of the same kind:

* adder side, Laplace kernel: ``exp(-||x - w||_1 / sigma) = exp(adder_out / sigma)``;
* CNN side, Gaussian kernel: ``exp(-||x - w||^2 / (2 sigma^2))``, where the squared distance comes from
  convolutions, ``-||x - w||^2 = 2 conv(X, W) - conv(X^2, 1) - ||W||^2``, so nothing is unfolded.

Both act on the *raw* layer output (before normalisation, without bias): that is where the distance identities
hold. Padded positions count as zeros, as in ``Conv2d`` and ``Adder2d`` (``padding_mode="zeros"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_kernel", "laplace_kernel", "negative_squared_distance"]

_IntPair = int | Sequence[int]


def negative_squared_distance(x: Tensor, weight: Tensor, stride: _IntPair = 1, padding: _IntPair | str = 0,
                              dilation: _IntPair = 1, groups: int = 1, conv_out: Tensor | None = None) -> Tensor:
    """``-||x_p - w_o||^2`` for every output position ``p`` and filter ``o``, computed as
    ``2 conv(X, W) - conv(X^2, 1) - ||W||^2`` (shape of ``F.conv2d(x, weight, ...)``).

    ``conv_out``: ``F.conv2d(x, weight)`` *without bias* if already available (a teacher's layer output minus its
    bias), which saves the main convolution.
    """
    if weight.dim() != 4 or x.dim() != 4:
        raise ValueError(f"negative_squared_distance: expected 4-d input and weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    out_channels = weight.shape[0]
    if conv_out is None:
        conv_out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    # conv(X^2, 1): one all-ones filter per group gives the patch energy of that group's input channels.
    ones = weight.new_ones(groups, weight.shape[1], *weight.shape[2:])
    energy = F.conv2d(x * x, ones, None, stride, padding, dilation, groups)  # (N, groups, H', W')
    if groups > 1:
        energy = energy.repeat_interleave(out_channels // groups, dim=1)
    weight_norm = weight.pow(2).sum(dim=(1, 2, 3)).view(1, out_channels, 1, 1)
    return 2 * conv_out - energy - weight_norm


def gaussian_kernel(x: Tensor, weight: Tensor, sigma: float | Tensor, stride: _IntPair = 1,
                    padding: _IntPair | str = 0, dilation: _IntPair = 1, groups: int = 1,
                    conv_out: Tensor | None = None) -> Tensor:
    """Gaussian (RBF) kernel between each input patch and each filter: ``exp(-||x - w||^2 / (2 sigma^2))``.

    Same arguments as ``F.conv2d`` plus ``sigma`` (bandwidth, > 0) and ``conv_out`` (see
    :func:`negative_squared_distance`). The exponent is clamped at 0 (it is <= 0 up to rounding).
    """
    distance = negative_squared_distance(x, weight, stride, padding, dilation, groups, conv_out)
    return torch.exp((distance / (2 * sigma * sigma)).clamp(max=0.0))


def laplace_kernel(adder_out: Tensor, sigma: float | Tensor) -> Tensor:
    """Laplace kernel of an adder layer's raw output ``-||x - w||_1``: ``exp(adder_out / sigma)``.

    ``adder_out`` must exclude the layer's bias (the L1 distance alone); ``sigma`` > 0.
    """
    return torch.exp(adder_out / sigma)
