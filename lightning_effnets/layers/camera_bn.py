"""Camera-based batch normalisation, CamBN (Zhuang et al., arXiv:2001.08680).

Person re-identification images from different cameras follow different distributions (colour cast, exposure,
blur, viewpoint). CamBN normalises every camera's features with *that camera's* statistics, in training and at
test time, so all cameras -- including cameras never seen in training -- are mapped onto one distribution. The
affine parameters stay shared across cameras.

* :class:`CameraBatchNorm2d` / :class:`CameraBatchNorm1d` keep one row of running statistics per camera slot
  (``running_mean``/``running_var`` of shape ``(num_cameras, num_features)``) and shared ``weight``/``bias``.
  Slots can be added later (:meth:`~_CameraBatchNorm.add_cameras`), e.g. for a camera met only at test time.
* :func:`use_camera` tells every camera BN layer of a model which camera the coming forward belongs to: one camera
  id for the whole batch (then the layer is exactly ``F.batch_norm`` on that camera's statistics), or one id per
  sample. With per-sample ids, training normalises every camera's samples with that camera's own batch
  statistics in *one* forward (grouped statistics: per-sample ``var_mean`` combined per camera with
  ``index_add``) and updates only the running statistics of the cameras present. This equals the authors'
  one-forward-per-camera training (their ``CameraClsTrainer`` splits the batch by camera) without splitting the
  batch, and its backward is written out (:class:`_GroupedBatchNormFn`) so that it costs about as much as a
  plain BN backward.
* :func:`collect_camera_statistics` re-estimates statistics from unlabeled images (test-time adaptation): while
  collecting, each layer normalises every camera's samples with their batch statistics (the authors forward
  each camera's mini-batches in train mode) and accumulates exact per-camera sums, so a camera's adapted
  running mean/variance are the mean and unbiased variance over *all* of that camera's images, whatever the
  batching -- the sample-weighted cumulative average (PyTorch's ``momentum=None``, not ``momentum=0``). The sums
  are plain tensors, so DDP ranks combine them with one all-reduce (:meth:`CameraStatistics.to_tensor`).

Without a camera context an eval-mode forward (cost profiling, model summaries) uses camera-agnostic statistics:
the equal-weight mixture of all slots' distributions. A training forward without a camera context is an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CameraBatchNorm1d",
    "CameraBatchNorm2d",
    "CameraContext",
    "CameraStatistics",
    "camera_bn_layers",
    "collect_camera_statistics",
    "grouped_batch_statistics",
    "set_camera",
    "use_camera",
]


# ---------------------------------------------------------------------------------------------- functional core
def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def grouped_batch_statistics(x: Tensor, groups: Tensor, num_groups: int,
                             counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-group mean and biased variance ``[G, C]`` of ``x [N, C, L]`` whose samples belong to ``groups [N]``.

    ``counts`` (samples per group, ``[G, 1]``, float64) can be passed when already known.

    One pass of two fast last-dimension reductions (sum and L2 norm) gives each sample's mean and variance
    (``torch.var_mean`` over the last dimension is ~30x slower on CPU); every sample has the same ``L``
    positions, so a group's mean is the mean of its samples' means and its variance is the mean within-sample
    variance plus the variance of the sample means (law of total variance), combined in float64 at the
    ``[N, C]`` level. Empty groups get mean 0 and variance 0.
    """
    positions = x.shape[2]
    wide = _wide(x.device)
    sample_mean = x.sum(dim=2).to(wide) / positions
    sample_sq = torch.linalg.vector_norm(x, dim=2).to(wide).square() / positions
    sample_var = (sample_sq - sample_mean.square()).clamp(min=0)
    if counts is None:
        counts = torch.bincount(groups, minlength=num_groups).to(wide)[:, None]
    counts = counts.clamp(min=1)
    zeros = sample_mean.new_zeros(num_groups, x.shape[1])
    mean = zeros.index_add(0, groups, sample_mean) / counts
    deviation = sample_mean - mean[groups]
    var = zeros.index_add(0, groups, sample_var + deviation * deviation) / counts
    return mean.to(x.dtype), var.to(x.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class _GroupedBatchNormFn(torch.autograd.Function):
    """Batch norm whose statistics are computed per group of samples, with a hand-written backward.

    Forward: ``y = x * s[g] + t[g]`` with ``s = w / sqrt(var_g + eps)``, ``t = b - mean_g * s``. Backward, per
    group ``g`` with ``n_g`` elements per channel (the standard BN backward restricted to the group):
    ``dx = s * (dy - mean_g(dy) - xhat * mean_g(dy * xhat))``, rewritten as ``dy * A + x * B + C`` with
    per-(sample, channel) coefficients from two reductions (``sum dy``, ``sum dy * x``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: Tensor, counts: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        xc = x.to(_compute_dtype(x))
        num_groups = counts.shape[0]
        mean, var = grouped_batch_statistics(xc, groups, num_groups, counts)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(xc.dtype)
        shift = -mean * scale if bias is None else bias.to(xc.dtype) - mean * scale
        y = torch.addcmul(shift[groups].unsqueeze(2), xc, scale[groups].unsqueeze(2)).to(x.dtype)
        ctx.save_for_backward(x, groups, counts, mean, invstd, weight)
        ctx.num_groups = num_groups
        ctx.has_bias = bias is not None
        ctx.param_dtype = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor) -> tuple[Tensor | None, ...]:
        x, groups, counts, mean, invstd, weight = ctx.saved_tensors
        dtype = _compute_dtype(x)
        xc, gy = x.to(dtype), grad_y.to(dtype)
        per_channel = (x.shape[2] * counts.clamp(min=1)).to(dtype)
        zeros = mean.new_zeros(ctx.num_groups, x.shape[1])
        sum_dy = zeros.index_add(0, groups, gy.sum(dim=2))
        sum_dy_x = zeros.index_add(0, groups, (gy * xc).sum(dim=2))
        sum_dy_xhat = invstd * (sum_dy_x - mean * sum_dy)  # per group: sum dy * (x - mean) * invstd
        a = invstd if weight is None else invstd * weight.to(dtype)
        b = -a * invstd * sum_dy_xhat / per_channel
        c = -a * sum_dy / per_channel - b * mean
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(torch.addcmul(c[groups].unsqueeze(2), xc, b[groups].unsqueeze(2)),
                                   gy, a[groups].unsqueeze(2)).to(x.dtype)
        grad_w = sum_dy_xhat.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[3] else None
        grad_b = sum_dy.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_w, grad_b, None


# ---------------------------------------------------------------------------------------------- camera context
@dataclass
class CameraContext:
    """Which camera(s) the coming forward belongs to, prepared once for all layers (see :func:`use_camera`).

    ``cameras`` are the distinct ids in the batch (ascending) with ``counts`` samples each; ``groups`` maps each
    sample to its position in ``cameras``; ``camera`` is set when the whole batch is one camera (fast path).
    """

    cameras: tuple[int, ...]
    counts: tuple[int, ...] | None
    groups: Tensor | None
    camera: int | None
    _on_device: dict[torch.device, tuple[Tensor | None, Tensor, Tensor | None]] = field(default_factory=dict,
                                                                                         repr=False)

    @classmethod
    def build(cls, camera_ids: int | Tensor | Sequence[int]) -> CameraContext:
        if isinstance(camera_ids, bool):
            raise TypeError("camera ids must be an int or a 1-D integer tensor, got a bool")
        if isinstance(camera_ids, int):
            if camera_ids < 0:
                raise ValueError(f"camera ids must be >= 0, got {camera_ids}")
            return cls(cameras=(camera_ids,), counts=None, groups=None, camera=camera_ids)
        ids = torch.as_tensor(camera_ids)
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"per-sample camera ids must be a 1-D integer tensor, got dtype {ids.dtype} and "
                             f"shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError("per-sample camera ids are empty: the batch has no samples")
        cameras, groups, counts = torch.unique(ids.long(), sorted=True, return_inverse=True, return_counts=True)
        camera_list = cameras.tolist()  # the one host synchronisation of a camera-aware forward
        if camera_list[0] < 0:
            raise ValueError(f"camera ids must be >= 0, got {camera_list[0]}")
        if len(camera_list) == 1:
            return cls(cameras=(camera_list[0],), counts=(ids.numel(),), groups=None, camera=camera_list[0])
        return cls(cameras=tuple(camera_list), counts=tuple(counts.tolist()), groups=groups, camera=None)

    def on(self, device: torch.device) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """``(groups, cameras, counts [G, 1] float64)`` as tensors on ``device`` (cached: every layer of a forward
        reuses them)."""
        if device not in self._on_device:
            groups = self.groups.to(device, non_blocking=True) if self.groups is not None else None
            counts = None if self.counts is None else \
                torch.tensor(self.counts, dtype=_wide(device), device=device)[:, None]
            self._on_device[device] = (groups, torch.tensor(self.cameras, device=device), counts)
        return self._on_device[device]


# ---------------------------------------------------------------------------------------------- layers
class _CameraBatchNorm(nn.Module):
    """Batch norm with one set of running statistics per camera slot and shared affine parameters."""

    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, num_cameras: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if num_cameras < 1:
            raise ValueError(f"num_cameras must be >= 1, got {num_cameras}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_cameras, num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_cameras, num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros(num_cameras, dtype=torch.long, device=device))
        self.context: CameraContext | None = None
        self._collected: dict[int, Tensor] | None = None

    # ------------------------------------------------------------------ slots
    @property
    def num_cameras(self) -> int:
        return self.running_mean.shape[0]

    def pooled_statistics(self, slots: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of the equal-weight mixture of the slots' distributions (default: all slots),
        the camera-agnostic statistics."""
        rm, rv = (self.running_mean, self.running_var) if slots is None else \
            (self.running_mean[list(slots)], self.running_var[list(slots)])
        mean = rm.mean(0)
        var = (rv + rm.square()).mean(0) - mean.square()
        return mean, var.clamp(min=0)

    def add_cameras(self, count: int = 1) -> list[int]:
        """Append ``count`` slots, initialised with :meth:`pooled_statistics`; returns their indices.

        The buffers are resized in place (``.data``), so references held elsewhere (DDP's buffer list) stay valid.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        first = self.num_cameras
        if count:
            mean, var = self.pooled_statistics()
            self._resize(first + count)
            self.running_mean.data[first:] = mean
            self.running_var.data[first:] = var
        return list(range(first, first + count))

    def _resize(self, num_cameras: int) -> None:
        with torch.inference_mode(False), torch.no_grad():  # new buffers must be normal tensors
            for name, fill in (("running_mean", 0.0), ("running_var", 1.0), ("num_batches_tracked", 0)):
                old = getattr(self, name)
                new = torch.full((num_cameras, *old.shape[1:]), fill, dtype=old.dtype, device=old.device)
                keep = min(num_cameras, old.shape[0])
                new[:keep] = old[:keep]
                old.data = new

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def set_camera_statistics(self, slot: int, mean: Tensor, var: Tensor, num_batches: int = 1) -> None:
        """Overwrite one slot's running mean / (unbiased) variance."""
        with torch.no_grad():
            self.running_mean[slot] = mean.to(self.running_mean)
            self.running_var[slot] = var.to(self.running_var)
            self.num_batches_tracked[slot] = num_batches

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, x: Tensor) -> None:
        if x.ndim not in self._expected_dims:
            raise ValueError(f"{type(self).__name__} expects a {' or '.join(map(str, self._expected_dims))}-D input, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels "
                             f"(input shape {tuple(x.shape)})")

    def _check_range(self, context: CameraContext) -> None:
        if context.cameras[-1] >= self.num_cameras:
            raise IndexError(
                f"camera id {context.cameras[-1]} is outside the {self.num_cameras} camera slot(s) of this "
                f"{type(self).__name__}: add a slot with add_cameras() (callbacks.CameraBN(adapt=True) adds one per "
                "unseen camera and estimates it from that camera's images) or convert with a larger num_cameras")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        context = self.context
        if self._collected is not None:
            out = self._collect(x, context)
        elif context is None:
            if self.training:
                raise RuntimeError(
                    f"{type(self).__name__} in training mode needs to know each sample's camera: wrap the forward "
                    "in `with lightning_effnets.layers.use_camera(model, camera_ids):` (callbacks.CameraBN does "
                    "this from the task's side_information(batch)['camera_ids'])")
            mean, var = self.pooled_statistics()
            out = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        else:
            self._check_range(context)
            out = self._train_forward(x, context) if self.training else self._eval_forward(x, context)
        return self._post(out)

    def _post(self, x: Tensor) -> Tensor:
        # drop / act exist when converted from timm's BatchNormAct2d (like timm's SplitBatchNorm2d)
        drop, act = self._modules.get("drop"), self._modules.get("act")
        if drop is not None:
            x = drop(x)
        if act is not None:
            x = act(x)
        return x

    def _factor(self, slots: Tensor | int) -> Tensor | float:
        """Running-average weight of this update (``momentum``, or ``1/n`` -- cumulative -- when it is None)."""
        self.num_batches_tracked[slots] += 1
        if self.momentum is not None:
            return self.momentum
        tracked = self.num_batches_tracked[slots]
        return 1.0 / float(tracked) if isinstance(slots, int) else 1.0 / tracked.to(self.running_mean.dtype)

    def _train_forward(self, x: Tensor, context: CameraContext) -> Tensor:
        positions = x[0, 0].numel()
        if positions == 1 and (x.shape[0] == 1 or (context.counts is not None and min(context.counts) == 1)):
            lonely = [c for c, n in zip(context.cameras, context.counts or (1,)) if n == 1]
            raise ValueError(
                f"{type(self).__name__}: camera(s) {lonely} have a single sample in this training batch, so their "
                "batch statistics are undefined (one value per channel). The CamBN authors drop such cameras from "
                "the batch: callbacks.CameraBN(drop_single_image_cameras=True) does that")
        if context.camera is not None:
            k = context.camera
            factor = self._factor(k)
            return F.batch_norm(x, self.running_mean[k], self.running_var[k], self.weight, self.bias, True,
                                factor, self.eps)
        groups, cameras, counts = context.on(x.device)
        x3 = x.reshape(x.shape[0], x.shape[1], -1)
        y, mean, var = _GroupedBatchNormFn.apply(x3, groups, counts, self.weight, self.bias, self.eps)
        with torch.no_grad():
            elements = counts.to(var.dtype) * positions
            unbiased = var * elements / (elements - 1).clamp(min=1)
            factor = self._factor(cameras)
            factor = factor[:, None] if isinstance(factor, Tensor) else factor
            rm, rv = self.running_mean, self.running_var
            rm.index_copy_(0, cameras, torch.lerp(rm[cameras], mean.to(rm.dtype), factor))
            rv.index_copy_(0, cameras, torch.lerp(rv[cameras], unbiased.to(rv.dtype), factor))
        return y.reshape(x.shape)

    def _eval_forward(self, x: Tensor, context: CameraContext) -> Tensor:
        if context.camera is not None:
            k = context.camera
            return F.batch_norm(x, self.running_mean[k], self.running_var[k], self.weight, self.bias, False, 0.0,
                                self.eps)
        groups, cameras, _ = context.on(x.device)
        slots = cameras[groups]
        scale = torch.rsqrt(self.running_var[slots] + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean[slots] * scale
        if self.bias is not None:
            shift = shift + self.bias
        x3 = x.reshape(x.shape[0], x.shape[1], -1)
        return torch.addcmul(shift.unsqueeze(2).to(x.dtype), x3, scale.unsqueeze(2).to(x.dtype)).reshape(x.shape)

    def _collect(self, x: Tensor, context: CameraContext | None) -> Tensor:
        """Normalise with per-camera batch statistics and add exact per-camera sums to the collection."""
        if context is None:
            raise RuntimeError("collecting camera statistics needs the images' camera: wrap every forward in "
                               "`with use_camera(model, camera_ids):` inside collect_camera_statistics(model)")
        positions = x[0, 0].numel()
        groups, _, _ = context.on(x.device)
        if groups is None:
            groups = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x3 = x.detach().reshape(x.shape[0], x.shape[1], -1).to(_compute_dtype(x))
        mean, var = grouped_batch_statistics(x3, groups, len(context.cameras))
        counts = context.counts or (x.shape[0],)
        num = torch.tensor(counts, dtype=torch.float64, device=x.device)[:, None] * positions
        rows = torch.cat([num, torch.ones_like(num), mean.double() * num,
                          (var.double() + mean.double().square()) * num], dim=1).cpu()
        for camera, row in zip(context.cameras, rows):
            previous = self._collected.get(camera)  # type: ignore[union-attr]
            self._collected[camera] = row if previous is None else previous + row  # type: ignore[index]
        invstd = torch.rsqrt(var + self.eps)
        scale = invstd if self.weight is None else invstd * self.weight.detach().to(invstd.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().to(shift.dtype)
        y = torch.addcmul(shift[groups].unsqueeze(2), x3, scale[groups].unsqueeze(2))
        return y.to(x.dtype).reshape(x.shape)

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """Resize to the checkpoint's number of camera slots; a plain BN's ``(C,)`` statistics fill every slot."""
        mean = state_dict.get(prefix + "running_mean")
        if isinstance(mean, Tensor):
            if mean.ndim == 1:
                for name in ("running_mean", "running_var"):
                    if isinstance(state_dict.get(prefix + name), Tensor):
                        state_dict[prefix + name] = state_dict[prefix + name].expand(self.num_cameras, -1)
                tracked = state_dict.get(prefix + "num_batches_tracked")
                if isinstance(tracked, Tensor) and tracked.ndim == 0:
                    state_dict[prefix + "num_batches_tracked"] = tracked.expand(self.num_cameras)
            elif mean.ndim == 2 and mean.shape[0] != self.num_cameras:
                self._resize(mean.shape[0])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_cameras={self.num_cameras}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}")


class CameraBatchNorm2d(_CameraBatchNorm):
    """CamBN for ``[N, C, H, W]`` feature maps (arXiv:2001.08680); see the module docstring.

    Args:
        num_features: channels ``C``.
        num_cameras: camera slots (more can be added with :meth:`add_cameras`).
        eps / momentum / affine: as ``nn.BatchNorm2d`` (``momentum=None``: cumulative average per camera).
    """

    _expected_dims = (4,)


class CameraBatchNorm1d(_CameraBatchNorm):
    """CamBN for ``[N, C]`` or ``[N, C, L]`` features, e.g. the BNNeck of a re-id model (arXiv:2001.08680)."""

    _expected_dims = (2, 3)


# ---------------------------------------------------------------------------------------------- model helpers
def camera_bn_layers(model: nn.Module) -> list[tuple[str, _CameraBatchNorm]]:
    """``(qualified name, layer)`` of every camera BN layer of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _CameraBatchNorm)]


def _require_layers(model: nn.Module) -> list[_CameraBatchNorm]:
    layers = [m for _, m in camera_bn_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no camera BN layers: convert its BN layers first with "
                         "lightning_effnets.convert.to_camera_bn(model, num_cameras)")
    return layers


def set_camera(model: nn.Module, camera_ids: int | Tensor | Sequence[int] | CameraContext | None) -> None:
    """Set (or clear, with ``None``) the camera context of every camera BN layer of ``model``.

    :func:`use_camera` is the scoped form; this one serves hooks that open and close the context separately.
    """
    layers = _require_layers(model)
    context = camera_ids if isinstance(camera_ids, CameraContext) or camera_ids is None \
        else CameraContext.build(camera_ids)
    if context is not None:
        for layer in layers:
            if layer._collected is None:
                layer._check_range(context)
    for layer in layers:
        layer.context = context


@contextmanager
def use_camera(model: nn.Module, camera_ids: int | Tensor | Sequence[int]) -> Iterator[CameraContext]:
    """Run the forwards inside the block as images of camera ``camera_ids``.

    ``camera_ids`` is one camera slot for the whole batch, or a 1-D integer tensor of per-sample slots: each
    camera's samples are then normalised with that camera's own statistics (batch statistics in training, its
    running statistics in eval mode). Ids are checked against every layer's slots once, here. Inside
    :func:`collect_camera_statistics` the ids are arbitrary non-negative keys (e.g. dataset camera ids).
    """
    layers = _require_layers(model)
    previous = [layer.context for layer in layers]
    context = CameraContext.build(camera_ids)
    set_camera(model, context)
    try:
        yield context
    finally:
        for layer, ctx in zip(layers, previous):
            layer.context = ctx


# ---------------------------------------------------------------------------------------------- adaptation
class CameraStatistics:
    """Exact per-camera sums of every camera BN layer's inputs, collected by :func:`collect_camera_statistics`.

    Per layer and camera: element count, number of forwards, sum and sum of squares (float64). They add up
    across forwards and across DDP ranks (:meth:`to_tensor` / :meth:`from_tensor` with an all-reduce in between),
    and :meth:`apply` turns them into running statistics.
    """

    def __init__(self, layers: Sequence[_CameraBatchNorm]) -> None:
        self.layers = list(layers)
        self.sums: list[dict[int, Tensor]] = [{} for _ in self.layers]

    def cameras(self) -> list[int]:
        """Camera keys seen by the collection (ascending)."""
        return sorted(set().union(*(s.keys() for s in self.sums)))

    def to_tensor(self, cameras: Sequence[int]) -> Tensor:
        """All sums for ``cameras`` (zeros for unseen ones) as one flat float64 tensor, in a fixed order."""
        parts = []
        for layer, sums in zip(self.layers, self.sums):
            width = 2 + 2 * layer.num_features
            for camera in cameras:
                parts.append(sums.get(camera, torch.zeros(width, dtype=torch.float64)))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def from_tensor(self, cameras: Sequence[int], flat: Tensor) -> None:
        """Replace the sums by those of :meth:`to_tensor`'s layout (e.g. after an all-reduce)."""
        flat = flat.detach().to("cpu", torch.float64)
        offset = 0
        for i, layer in enumerate(self.layers):
            width = 2 + 2 * layer.num_features
            self.sums[i] = {}
            for camera in cameras:
                row = flat[offset:offset + width]
                offset += width
                if row[0] > 0:
                    self.sums[i][camera] = row.clone()
        if offset != flat.numel():
            raise ValueError(f"statistics tensor has {flat.numel()} values, expected {offset}")

    def apply(self, slots: Mapping[int, int], cameras: Sequence[int] | None = None) -> list[int]:
        """Write every collected camera's mean and unbiased variance into its slot ``slots[camera]``.

        Layers get more slots if a slot index is beyond their size. Returns the cameras written.
        """
        cameras = self.cameras() if cameras is None else list(cameras)
        missing = [c for c in cameras if c not in slots]
        if missing:
            raise KeyError(f"no slot given for camera(s) {missing}")
        if cameras:
            needed = max(slots[c] for c in cameras) + 1
            for layer in self.layers:
                if layer.num_cameras < needed:
                    layer.add_cameras(needed - layer.num_cameras)
        with torch.inference_mode(False), torch.no_grad():
            for layer, sums in zip(self.layers, self.sums):
                c = layer.num_features
                for camera in cameras:
                    row = sums.get(camera)
                    if row is None or row[0] < 2:
                        continue
                    n, forwards, s1, s2 = row[0], row[1], row[2:2 + c], row[2 + c:]
                    mean = s1 / n
                    var = ((s2 - n * mean.square()) / (n - 1)).clamp(min=0)  # unbiased, as BN's running_var
                    layer.set_camera_statistics(slots[camera], mean, var, int(forwards))
        return cameras


@contextmanager
def collect_camera_statistics(model: nn.Module) -> Iterator[CameraStatistics]:
    """Collect per-camera statistics of every camera BN layer over the forwards inside the block.

    Each forward must run inside :func:`use_camera` (the ids are keys, e.g. dataset camera ids). Layers normalise
    each camera's samples with its batch statistics, as in training (so run the model in eval mode: dropout
    off), and leave their running statistics untouched; call :meth:`CameraStatistics.apply` afterwards::

        with collect_camera_statistics(model) as stats, torch.no_grad():
            for images in camera_batches:
                with use_camera(model, 3):
                    model(images)
        stats.apply({3: 3})
    """
    layers = _require_layers(model)
    stats = CameraStatistics(layers)
    for layer, sums in zip(layers, stats.sums):
        layer._collected = sums
    try:
        yield stats
    finally:
        for layer in layers:
            layer._collected = None
