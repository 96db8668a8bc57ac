"""Binary layers: ±1 weights and activations with selectable gradient estimators.

* :func:`binarize` -- ``sign`` (with ``sign(0) = +1``, so values are always ±1) and a surrogate gradient:
  ``"ste"``, the clipped straight-through estimator of BinaryNet (Hubara et al., arXiv:1602.02830),
  ``d/dx = 1{|x| <= 1}``; or ``"approx_sign"``, Bi-Real Net's piecewise-quadratic approximation
  (arXiv:1808.00278), ``d/dx = 2 + 2x`` on [-1, 0), ``2 - 2x`` on [0, 1), 0 elsewhere.
* :class:`BinaryConv2d` / :class:`BinaryLinear` -- drop-in subclasses of ``nn.Conv2d`` / ``nn.Linear`` (same
  signature) whose weights are binary. Two weight modes:

  - ``latent=False`` (default, for the Bop optimizer, arXiv:1906.02107): the ``weight`` parameter *is* ±1.
    There are no latent weights; the gradient reaches the ±1 weight unchanged and Bop flips its sign.
    The parameter is marked binary (:func:`is_binary`) so :func:`binary_parameters` finds it.
  - ``latent=True`` (classic BNN training with a real optimizer): ``weight`` is real-valued and binarised
    in every forward with the clipped STE; ``balanced=True`` centres every filter first,
    ``sign(W - mean(W))`` (BBG's weight-balanced binarisation, arXiv:1909.12117; the per-filter centring
    is our reading of the abstract, whose details are unverified).

  ``activation`` binarises the layer input (``None`` keeps real inputs: a binary-*weight* network).
  ``scale=True`` adds a per-output-channel scale ``alpha``: learnable (initialised to ``mean|W|`` of the
  real weights a layer is converted from) for ±1 weights, the XNOR-Net analytic ``mean|W|`` of the
  (centred) latent weights for latent weights.
* :class:`RSign` / :class:`RPReLU` -- ReActNet's learnable-threshold sign and shifted PReLU
  (arXiv:2003.03488): ``sign(x + b_c)`` and ``PReLU(x + b1_c) + b2_c``.

Cost: ``lightning_effnets.cost.profile`` counts a binary layer with binarised inputs as XNOR/popcount
``binary_ops`` (one per multiply-accumulate position) and one with real inputs as additions (a ±1 weight
only decides the sign of each addend). No energy figure is assigned to ``binary_ops``
(``cost.ENERGY_PJ`` has no ``"binary"`` entry: we know of no 45 nm XNOR-popcount figure from the same
source as the float ones), so reported energy excludes binary operations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_effnets.cost import OpCount, register_cost

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "BinaryConv2d",
    "BinaryLinear",
    "RPReLU",
    "RSign",
    "approx_sign",
    "binarize",
    "binary_parameters",
    "is_binary",
    "iter_binary_layers",
    "mark_binary",
    "sign_ste",
]

Estimator = Literal["ste", "approx_sign"]
ESTIMATORS: tuple[str, ...] = ("ste", "approx_sign")

#: Attribute set on binary (±1) parameters; optimisers such as Bop look for it.
BINARY_ATTR = "effnets_binary"


# --------------------------------------------------------------------------- sign estimators
def _sign(x: Tensor) -> Tensor:
    """``sign`` that never returns 0 (``sign(0) = +1``), so a binarised tensor is exactly ±1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _SignSTE(torch.autograd.Function):
    """Forward ``sign(x)``; backward passes the gradient where ``|x| <= 1`` (hardtanh derivative)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _ApproxSign(torch.autograd.Function):
    """Forward ``sign(x)``; backward Bi-Real's ``max(0, 2 - 2|x|)`` (= 2+2x on [-1,0), 2-2x on [0,1))."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_min_(0.0)


def sign_ste(x: Tensor) -> Tensor:
    """``sign(x)`` (±1) with the clipped straight-through gradient ``1{|x| <= 1}``."""
    return _SignSTE.apply(x)


def approx_sign(x: Tensor) -> Tensor:
    """``sign(x)`` (±1) with Bi-Real Net's approx-sign gradient ``max(0, 2 - 2|x|)``."""
    return _ApproxSign.apply(x)


def binarize(x: Tensor, estimator: Estimator = "ste") -> Tensor:
    """``sign(x)`` in {-1, +1} with the named surrogate gradient (see :data:`ESTIMATORS`)."""
    if estimator == "ste":
        return sign_ste(x)
    if estimator == "approx_sign":
        return approx_sign(x)
    raise ValueError(f"unknown sign estimator {estimator!r}; choose one of {ESTIMATORS}")


# --------------------------------------------------------------------------- marking binary parameters
def mark_binary(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as a ±1 parameter (an attribute: it survives ``.to()`` and pickling; binary layers
    re-mark their weight after ``copy.deepcopy``, which drops Parameter attributes)."""
    setattr(param, BINARY_ATTR, True)
    return param


def is_binary(param: Tensor) -> bool:
    """Whether ``param`` was marked binary by :func:`mark_binary` (e.g. a ±1 layer weight)."""
    return bool(getattr(param, BINARY_ATTR, False))


def binary_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The ±1 parameters of ``module``, in registration order, without duplicates.

    Found by layer type (the ``weight`` of :class:`BinaryConv2d`/:class:`BinaryLinear` with ``latent=False``,
    robust to code that re-creates Parameter objects) and by the :func:`is_binary` mark (binary parameters
    of user-defined layers).
    """
    found: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, _BinaryMixin) and not sub.latent:
            found.setdefault(id(sub.weight), sub.weight)
    for p in module.parameters():
        if is_binary(p):
            found.setdefault(id(p), p)
    order = {id(p): i for i, p in enumerate(module.parameters())}
    return sorted(found.values(), key=lambda p: order.get(id(p), len(order)))


# --------------------------------------------------------------------------- binary layers
class _BinaryMixin:
    """Shared weight/activation binarisation of :class:`BinaryConv2d` and :class:`BinaryLinear`."""

    weight: nn.Parameter
    activation: str | None
    latent: bool
    balanced: bool
    scale: nn.Parameter | None
    analytic_scale: bool

    def _init_binary(self, activation: str | None, scale: bool, balanced: bool, latent: bool) -> None:
        if activation is not None and activation not in ESTIMATORS:
            raise ValueError(f"activation must be None or one of {ESTIMATORS}, got {activation!r}")
        if balanced and not latent:
            raise ValueError("balanced binarisation centres latent real-valued weights; with ±1 weights "
                             "(latent=False, what Bop trains) sign(W - mean(W)) would just be W. "
                             "Use latent=True with a real-valued optimizer, or balanced=False.")
        self.activation = activation
        self.latent = latent
        self.balanced = balanced
        self.analytic_scale = scale and latent
        if scale and not latent:
            # A ±1 weight carries no magnitude: the scale is a real, learnable per-channel parameter.
            w = self.weight.detach()
            self.scale = nn.Parameter(w.abs().flatten(1).mean(1))
        else:
            self.register_parameter("scale", None)
        if not latent:
            with torch.no_grad():
                self.weight.copy_(_sign(self.weight))
            mark_binary(self.weight)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy re-creates Parameters without their attributes: mark the ±1 weight again
        super().__setstate__(state)  # type: ignore[misc]
        if not self.latent:
            mark_binary(self.weight)

    def binary_weight(self) -> Tensor:
        """The ±1 (or ±alpha) weight the forward uses; differentiable w.r.t. ``self.weight``."""
        if not self.latent:
            return self.weight  # already ±1: the gradient w.r.t. it is what Bop consumes
        w = self.weight
        if self.balanced:
            w = w - w.mean(dim=tuple(range(1, w.ndim)), keepdim=True)
        wb = sign_ste(w)
        if self.analytic_scale:
            alpha = w.detach().abs().mean(dim=tuple(range(1, w.ndim)), keepdim=True)
            wb = wb * alpha
        return wb

    def _binary_input(self, x: Tensor) -> Tensor:
        return x if self.activation is None else binarize(x, self.activation)

    def _extra_binary_repr(self) -> str:
        return (f", activation={self.activation}, scale={self.scale is not None or self.analytic_scale}, "
                f"balanced={self.balanced}, latent={self.latent}")


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """``nn.Conv2d`` with binary weights and (optionally) binary inputs; see the module docstring.

    Positional arguments and ``stride/padding/dilation/groups/bias/padding_mode/device/dtype`` are those of
    ``nn.Conv2d``. Zero padding of binarised inputs pads with 0 (not ±1), like larq's default.

    Args:
        activation: input binarisation estimator, ``"ste"`` or ``"approx_sign"``; ``None`` keeps real inputs.
        scale: per-output-channel scale (learnable for ±1 weights, analytic ``mean|W|`` for latent weights).
        balanced: binarise ``W - mean(W)`` per filter (latent weights only).
        latent: keep real-valued latent weights binarised in the forward (train with a real optimizer)
            instead of ±1 weights (train with :class:`lightning_effnets.optim.Bop`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None, *,
                 activation: Estimator | None = "ste", scale: bool = False, balanced: bool = False,
                 latent: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_binary(activation, scale, balanced, latent)

    def reset_parameters(self) -> None:
        """Kaiming init (as ``nn.Conv2d``), then ``sign`` for ±1 weights."""
        super().reset_parameters()
        if not getattr(self, "latent", True):
            with torch.no_grad():
                self.weight.copy_(_sign(self.weight))

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **options: Any) -> BinaryConv2d:
        """A binary copy of ``conv``: ±1 weights ``sign(W)`` (or the latent ``W``), same geometry/device."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype, **options)
        _copy_from_float(new, conv)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``scale * conv(binarize(x), W_b) + bias`` (the bias is added after the scale)."""
        if self.scale is None:
            return self._conv_forward(self._binary_input(x), self.binary_weight(), self.bias)
        y = self._conv_forward(self._binary_input(x), self.binary_weight(), None) * self.scale.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._extra_binary_repr()


class BinaryLinear(_BinaryMixin, nn.Linear):
    """``nn.Linear`` with binary weights and (optionally) binary inputs; options as :class:`BinaryConv2d`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: Any = None,
                 dtype: Any = None, *, activation: Estimator | None = "ste", scale: bool = False,
                 balanced: bool = False, latent: bool = False) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_binary(activation, scale, balanced, latent)

    def reset_parameters(self) -> None:
        """Kaiming init (as ``nn.Linear``), then ``sign`` for ±1 weights."""
        super().reset_parameters()
        if not getattr(self, "latent", True):
            with torch.no_grad():
                self.weight.copy_(_sign(self.weight))

    @classmethod
    def from_float(cls, linear: nn.Linear, **options: Any) -> BinaryLinear:
        """A binary copy of ``linear`` (see :meth:`BinaryConv2d.from_float`)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype, **options)
        _copy_from_float(new, linear)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``scale * binarize(x) @ W_b^T + bias``."""
        if self.scale is None:
            return F.linear(self._binary_input(x), self.binary_weight(), self.bias)
        y = F.linear(self._binary_input(x), self.binary_weight()) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + self._extra_binary_repr()


def _copy_from_float(new: BinaryConv2d | BinaryLinear, old: nn.Conv2d | nn.Linear) -> None:
    with torch.no_grad():
        w = old.weight.detach()
        new.weight.copy_(w if new.latent else _sign(w))
        if new.scale is not None:
            new.scale.copy_(w.abs().flatten(1).mean(1))
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)


# --------------------------------------------------------------------------- ReActNet blocks
def _channel_view(p: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-channel vector over dim 1 of ``x`` (N, C, ...)."""
    return p.view(1, -1, *([1] * (x.ndim - 2))) if x.ndim > 2 else p


class RSign(nn.Module):
    """ReActNet's RSign: ``sign(x + b_c)`` with a learnable per-channel threshold (arXiv:2003.03488).

    Args:
        channels: size of dim 1 of the input.
        estimator: surrogate gradient of the sign, ``"ste"`` or ``"approx_sign"``.
    """

    def __init__(self, channels: int, estimator: Estimator = "ste") -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return binarize(x + _channel_view(self.bias, x), self.estimator)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}, estimator={self.estimator}"


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``PReLU(x + b1_c) + b2_c`` with per-channel slopes (init 0.25) and shifts.

    Args:
        channels: size of dim 1 of the input.
        init: initial negative slope.
    """

    def __init__(self, channels: int, init: float = 0.25) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.weight = nn.Parameter(torch.full((channels,), float(init)))
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x + _channel_view(self.shift_in, x), self.weight) + _channel_view(self.shift_out, x)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}"


# --------------------------------------------------------------------------- cost accounting
def _binary_cost(module: BinaryConv2d | BinaryLinear, inputs: tuple[Any, ...], output: Tensor) -> OpCount:
    if isinstance(module, BinaryConv2d):
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    else:
        per_output = module.in_features
    macs = output.numel() * per_output
    scaled = module.scale is not None or module.analytic_scale
    mults = output.numel() if scaled else 0  # one rescale per output element
    adds = output.numel() if module.bias is not None else 0
    if module.activation is not None:
        return OpCount(macs=macs, mults=mults, adds=adds, binary_ops=macs)  # XNOR + popcount
    return OpCount(macs=macs, mults=mults, adds=adds + macs)  # ±1 weights: signed accumulation


register_cost(BinaryConv2d)(_binary_cost)
register_cost(BinaryLinear)(_binary_cost)


def iter_binary_layers(module: nn.Module) -> Iterator[tuple[str, BinaryConv2d | BinaryLinear]]:
    """``(name, layer)`` for every :class:`BinaryConv2d`/:class:`BinaryLinear` in ``module``."""
    for name, sub in module.named_modules():
        if isinstance(sub, (BinaryConv2d, BinaryLinear)):
            yield name, sub
