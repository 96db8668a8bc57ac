"""AdderNet layer: convolution with the negative L1 distance instead of the dot product (arXiv:1912.13200).

``Y[n, o, p] = -sum_{c,i,j} |X[n, c, p + (i, j)] - W[o, c, i, j]|`` with Conv2d's stride, padding, dilation and
groups semantics (padded positions are zeros, exactly as in the authors' ``unfold``-based code).

Backward is the paper's, not autograd's: the weight gets the *full-precision* gradient ``X - W`` (not
``sign(X - W)``) and the input the *HardTanh* gradient ``clamp(W - X, -1, 1)``. Both are unscaled; the adaptive
per-layer scaling of the paper is :class:`lightning_effnets.callbacks.AdaptiveAdderLR`'s job.

How it is computed (the authors' code materialises an ``O x C*k*k x N*L`` tensor; nothing here does):

* weight gradient: ``sum_p g[o,p] (X[k,p] - W[o,k])`` is linear in X, so it is Conv2d's own weight gradient
  minus ``W * g.sum(p)`` -- one GEMM-class call into oneDNN/cuDNN;
* forward and input gradient on CPU (float32/float64): a C++ extension (``csrc/adder_cpu.cpp``) with direct
  kernels that never unfold (implicit im2col per panel, register-blocked, AVX-512/AVX2/baseline picked at run
  time). It is compiled with ``torch.utils.cpp_extension.load`` on first use (~20 s, cached on disk under
  ``TORCH_EXTENSIONS_DIR``);
* everywhere else (CUDA, half precision, or if the compiler is missing): a pure-PyTorch path tiled so that no
  intermediate exceeds ``_TILE_ELEMENTS`` elements (``torch.cdist(p=1)`` for the forward, clamp-multiply-sum
  tiles plus ``F.fold`` for the input gradient).

``EFFNETS_ADDER_BACKEND=auto|cpp|torch`` forces a backend (``cpp`` raises if the extension cannot be built).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lightning_effnets.cost import OpCount, register_cost

__all__ = ["Adder2d", "SelfShortcut", "adder2d", "adder_backend", "load_extension"]

_IntPair = int | Sequence[int]
_BACKEND_ENV = "EFFNETS_ADDER_BACKEND"
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("adder_cpu.cpp", "adder_kernels.h")
# -O3 and OpenMP for at::parallel_for; -ffp-contract=fast lets a*b+c become one FMA (ISO C++ mode forbids it by
# default). No -march=native: the kernels carry their own per-ISA target attributes (see adder_cpu.cpp), so the
# cached binary is valid on any x86-64 machine.
_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi")
_LDFLAGS = ("-fopenmp",)
#: Largest intermediate (in elements) of the pure-PyTorch path: 2**22 floats = 16 MiB.
_TILE_ELEMENTS = 1 << 22

_ext_lock = threading.Lock()
_ext_state: dict[str, Any] = {"loaded": None, "error": None}


# --------------------------------------------------------------------------------------------- extension
def _extension_name() -> str:
    digest = hashlib.sha1()
    for name in _SOURCES:
        digest.update((_CSRC / name).read_bytes())
    digest.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"effnets_adder_{digest.hexdigest()[:12]}"


def load_extension(verbose: bool = False) -> bool:
    """Build (first call only, cached on disk) and load the CPU kernels; returns whether they are available.

    Safe to call from several processes at once (``cpp_extension`` locks the build directory). A failure is
    reported once as a warning and the pure-PyTorch path is used from then on.
    """
    with _ext_lock:
        if _ext_state["loaded"] is not None:
            return bool(_ext_state["loaded"])
        if hasattr(torch.ops, "effnets_adder") and hasattr(torch.ops.effnets_adder, "forward"):
            _ext_state["loaded"] = True
            return True
        try:
            from torch.utils.cpp_extension import load

            load(name=_extension_name(), sources=[str(_CSRC / "adder_cpu.cpp")], extra_cflags=list(_CFLAGS),
                 extra_ldflags=list(_LDFLAGS), is_python_module=False, verbose=verbose)
            _ext_state["loaded"] = True
        except Exception as err:  # compiler missing, headers missing, unsupported platform...
            _ext_state["loaded"] = False
            _ext_state["error"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"lightning_effnets: could not build the Adder2d CPU kernels ({_ext_state['error']}); "
                          "falling back to the slower pure-PyTorch implementation", RuntimeWarning, stacklevel=2)
        return bool(_ext_state["loaded"])


def adder_backend(x: Tensor) -> str:
    """The backend ``adder2d`` uses for input ``x``: ``"cpp"`` or ``"torch"`` (honours ``EFFNETS_ADDER_BACKEND``)."""
    choice = os.environ.get(_BACKEND_ENV, "auto").lower()
    if choice not in ("auto", "cpp", "torch"):
        raise ValueError(f"{_BACKEND_ENV}={choice!r}: expected 'auto', 'cpp' or 'torch'")
    if choice == "torch":
        return "torch"
    eligible = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if choice == "cpp":
        if not eligible:
            raise RuntimeError(f"{_BACKEND_ENV}=cpp: the C++ kernels take float32/float64 CPU tensors, got "
                               f"{x.dtype} on {x.device}")
        if not load_extension():
            raise RuntimeError(f"{_BACKEND_ENV}=cpp but the extension failed to build: {_ext_state['error']}")
        return "cpp"
    return "cpp" if eligible and load_extension() else "torch"


# --------------------------------------------------------------------------------------------- geometry
def _output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_shapes(x: Tensor, weight: Tensor, groups: int) -> None:
    if weight.dim() != 4:
        raise ValueError(f"adder2d: weight must be 4-d (out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"adder2d: input must be 4-d (N, C, H, W), got shape {tuple(x.shape)}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"adder2d: out_channels={weight.shape[0]} is not divisible by groups={groups}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"adder2d: input has {x.shape[1]} channels but the weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")


# --------------------------------------------------------------------------------------------- torch path
def _unfold_groups(x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], groups: int) -> Tensor:
    """Patches of ``x`` as (N, groups, K, L) with K = C/groups * kh * kw (unfold orders channels first)."""
    cols = F.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    return cols.view(x.shape[0], groups, -1, cols.shape[-1])


def _samples_per_chunk(per_sample: int) -> int:
    return max(1, _TILE_ELEMENTS // max(per_sample, 1))


def _forward_torch(x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], groups: int) -> Tensor:
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = (_output_size(h, kh, stride[0], padding[0], dilation[0]),
              _output_size(w, kw, stride[1], padding[1], dilation[1]))
    wg = weight.reshape(groups, o // groups, -1)  # (G, Og, K)
    out = x.new_empty(n, o, oh * ow)
    step = _samples_per_chunk(weight[0].numel() * groups * oh * ow)
    for start in range(0, n, step):
        cols = _unfold_groups(x[start:start + step], weight, stride, padding, dilation, groups)  # (n, G, K, L)
        b = cols.shape[0]
        pts = cols.permute(1, 0, 3, 2).reshape(groups, b * oh * ow, -1)  # (G, n*L, K)
        dist = torch.cdist(wg, pts, p=1)  # (G, Og, n*L): a pairwise kernel, nothing of size Og*K*n*L
        out[start:start + b] = -dist.view(groups, o // groups, b, oh * ow).permute(2, 0, 1, 3).reshape(b, o, -1)
    return out.view(n, o, oh, ow)


def _input_grad_torch(grad: Tensor, x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                      dilation: tuple[int, int], groups: int) -> Tensor:
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    og, k = o // groups, weight[0].numel()
    wg = weight.reshape(1, groups, og, k, 1)
    g = grad.reshape(n, groups, og, 1, -1)
    length = g.shape[-1]
    per_channel = k * length  # elements of one (sample, output channel) slice of the pairwise tile
    if o * per_channel <= _TILE_ELEMENTS:
        step, ochunk = _TILE_ELEMENTS // (o * per_channel), og
    else:
        step, ochunk = 1, max(1, _TILE_ELEMENTS // (groups * per_channel))
    dx = torch.empty_like(x)
    for start in range(0, n, step):
        cols = _unfold_groups(x[start:start + step], weight, stride, padding, dilation, groups)  # (b, G, K, L)
        b = cols.shape[0]
        dcols = torch.zeros_like(cols)
        for o0 in range(0, og, ochunk):
            tile = (wg[:, :, o0:o0 + ochunk] - cols[:, :, None]).clamp_(-1, 1)  # (b, G, oc, K, L), bounded
            dcols += tile.mul_(g[start:start + b, :, o0:o0 + ochunk]).sum(2)
        dx[start:start + b] = F.fold(dcols.view(b, groups * k, length), (h, w), (kh, kw), dilation=dilation,
                                     padding=padding, stride=stride)
    return dx


# --------------------------------------------------------------------------------------------- autograd
def _weight_grad(grad: Tensor, x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int) -> Tensor:
    """``sum_p g[o,p] (X[k,p] - W[o,k])`` = Conv2d's weight gradient - ``W * sum_p g[o,p]``."""
    conv_grad = torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding),
                                                    list(dilation), False, [0, 0], groups,
                                                    [False, True, False])[1]
    return conv_grad - weight * grad.sum(dim=(0, 2, 3)).view(-1, 1, 1, 1)


class _Adder2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
        if adder_backend(xc) == "cpp":
            y = torch.ops.effnets_adder.forward(xc, wc, list(stride), list(padding), list(dilation), groups)
        else:
            y = _forward_torch(xc, wc, stride, padding, dilation, groups)
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_w = None
        compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        gc, xc, wc = grad.to(compute_dtype).contiguous(), x.to(compute_dtype), weight.to(compute_dtype)
        if ctx.needs_input_grad[0]:
            if adder_backend(xc) == "cpp":
                grad_x = torch.ops.effnets_adder.input_grad(gc, xc, wc, list(stride), list(padding), list(dilation),
                                                            groups)
            else:
                grad_x = _input_grad_torch(gc, xc, wc, stride, padding, dilation, groups)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(gc, xc, wc, stride, padding, dilation, groups).to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


def _resolve_padding(padding: str | _IntPair, kernel: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """Conv2d's padding argument -> symmetric padding for the kernel, plus an extra asymmetric F.pad for 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), None
        if padding != "same":
            raise ValueError(f"padding={padding!r}: expected 'valid', 'same' or integers")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided adder layers (as for Conv2d)")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        sym = (total[0] // 2, total[1] // 2)
        extra = (0, total[1] - 2 * sym[1], 0, total[0] - 2 * sym[0])
        return sym, extra if any(extra) else None
    return _pair(padding), None  # type: ignore[return-value]


def adder2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: _IntPair = 1,
            padding: str | _IntPair = 0, dilation: _IntPair = 1, groups: int = 1) -> Tensor:
    """Functional AdderNet layer with ``F.conv2d``'s signature; see the module docstring."""
    _check_shapes(input, weight, groups)
    stride_, dilation_ = _pair(stride), _pair(dilation)
    pad, extra = _resolve_padding(padding, tuple(weight.shape[2:]), stride_, dilation_)  # type: ignore[arg-type]
    if extra is not None:  # asymmetric part of 'same' padding for even kernels: zeros, like Conv2d
        input = F.pad(input, extra)
    if any(v < 1 for v in stride_ + dilation_) or any(v < 0 for v in pad):
        raise ValueError(f"adder2d: invalid stride={stride_}, padding={pad}, dilation={dilation_}")
    out = _Adder2dFunction.apply(input, weight, stride_, pad, dilation_, groups)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


# --------------------------------------------------------------------------------------------- modules
class Adder2d(nn.Module):
    """Drop-in AdderNet replacement for :class:`torch.nn.Conv2d` (arXiv:1912.13200).

    Same constructor and attributes as Conv2d (``weight`` of shape ``(out, in/groups, kh, kw)``, ``bias``),
    so code that reads a conv's geometry works unchanged. Differences: ``bias`` defaults to False (the layer is
    always followed by BatchNorm: adder outputs are large and negative), and weights are initialised N(0, 1)
    as in the authors' code (the L1 distance compares weights with activations of unit scale).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntPair, stride: _IntPair = 1,
                 padding: str | _IntPair = 0, dilation: _IntPair = 1, groups: int = 1, bias: bool = False,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"Adder2d: in_channels={in_channels} and out_channels={out_channels} must both be "
                             f"divisible by groups={groups}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"Adder2d: padding_mode={padding_mode!r}; expected zeros, reflect, replicate or "
                             "circular")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size: tuple[int, int] = _pair(kernel_size)  # type: ignore[assignment]
        self.stride: tuple[int, int] = _pair(stride)  # type: ignore[assignment]
        self.dilation: tuple[int, int] = _pair(dilation)  # type: ignore[assignment]
        self.padding: str | tuple[int, int] = padding if isinstance(padding, str) else _pair(padding)  # type: ignore
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1) weights (authors' initialisation), zero bias."""
        nn.init.normal_(self.weight, 0.0, 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, copy_weights: bool = False) -> Adder2d:
        """An ``Adder2d`` with ``conv``'s geometry, device and dtype (``copy_weights`` also copies its tensors)."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        if copy_weights:
            with torch.no_grad():
                layer.weight.copy_(conv.weight)
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias)  # type: ignore[union-attr]
        elif conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)  # type: ignore[union-attr]
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Adder2d expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.padding_mode != "zeros" and not isinstance(self.padding, str):
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return adder2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return adder2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s


class SelfShortcut(nn.Module):
    """``y = x + body(x)``: AdderSR's self-shortcut (arXiv:2009.08891).

    An adder layer cannot represent the identity mapping (``-|x - w|`` is never ``x``), which super-resolution
    bodies need; adding the input back restores it. ``body`` must preserve the input's shape.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        if y.shape != x.shape:
            raise ValueError(f"SelfShortcut: body output {tuple(y.shape)} differs from its input {tuple(x.shape)}; "
                             "wrap only layers with stride 1, 'same' padding and equal in/out channels")
        return x + y


@register_cost(Adder2d)
def _adder_cost(module: Adder2d, inputs: tuple[Any, ...], output: Tensor) -> OpCount:
    """Additions only: each of the ``N * O * OH * OW * (C/groups) * kh * kw`` positions of a conv's MACs costs
    one subtraction and one accumulation (``|.|`` is a sign-bit operation), i.e. 2 additions, no multiplication
    -- the AdderNet paper's count (arXiv:1912.13200, Table 1: CNN ``n`` mul + ``n`` add, AdderNet ``2n`` add)."""
    positions = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return OpCount(macs=positions, mults=0, adds=2 * positions)
