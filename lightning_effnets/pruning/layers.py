"""Which layers channel pruning understands, and how: one registry for the project's own layers.

Torch-Pruning knows the standard ``torch.nn`` layers. A layer it does not know is traced as an element-wise
op, so its channels would silently never be pruned (or, worse, its parameters would go out of shape).
:func:`register_layer` tells both sides about such a layer at once:

* the *pruner* (a ``torch_pruning.pruner.BasePruningFunc``) that slices its parameters and buffers, handed to
  Torch-Pruning's ``DependencyGraph`` as a customised pruner;
* its *kind* (``"conv"``, ``"linear"`` or ``"norm"``), which tells the importance criteria how to read a
  channel's weights (:func:`channel_rows`) and tells network slimming which layers carry a per-channel scale.

Pruners must only *select* entries (``index_select``): :mod:`lightning_effnets.pruning.surgery` runs them on
index tensors to learn which entries survived, so that optimizer state can be sliced the same way.

The project's layers (``Adder2d``, ``BinaryConv2d``/``BinaryLinear``, ``CameraBatchNorm2d``/``1d``) are registered
at the bottom of this module. Groups that touch a *grouped* registered layer are not pruned (Torch-Pruning's
depthwise coupling only exists for its own conv pruner).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch_pruning.pruner.function import BasePruningFunc, ConvPruner, LinearPruner

__all__ = ["LayerKind", "LayerSupport", "register_layer", "registered_layers", "layer_kind", "channel_rows",
           "ConvLikePruner", "ScaledConvPruner", "ScaledLinearPruner",
           "CameraBatchNormPruner", "GroupNormPruner"]

LayerKind = Literal["conv", "linear", "norm"]


@dataclass(frozen=True)
class LayerSupport:
    """How pruning handles one layer type (see module docstring)."""

    kind: LayerKind
    pruner: BasePruningFunc | None = None  # None: Torch-Pruning's built-in pruner for the base class is right


_REGISTRY: dict[type[nn.Module], LayerSupport] = {}


def register_layer(layer_type: type[nn.Module], kind: LayerKind, pruner: BasePruningFunc | None = None) -> None:
    """Teach channel pruning a layer type: its ``kind`` and, if Torch-Pruning cannot slice it, a ``pruner``."""
    if kind not in ("conv", "linear", "norm"):
        raise ValueError(f"kind must be 'conv', 'linear' or 'norm', got {kind!r}")
    if pruner is not None and not isinstance(pruner, BasePruningFunc):
        raise TypeError(f"pruner must be a torch_pruning BasePruningFunc, got {type(pruner).__name__}")
    _REGISTRY[layer_type] = LayerSupport(kind=kind, pruner=pruner)


def registered_layers() -> dict[type[nn.Module], LayerSupport]:
    """A copy of the registry (layer type -> support)."""
    return dict(_REGISTRY)


def _support(module: nn.Module) -> LayerSupport | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """``"conv"``, ``"linear"``, ``"norm"`` (a per-channel affine scale) or None for anything else."""
    support = _support(module)
    if support is not None:
        return support.kind
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _NORMS) and getattr(module, "weight", None) is not None and module.weight.ndim == 1:
        return "norm"
    return None


def channel_rows(module: nn.Module, is_out: bool, tensor: Tensor) -> Tensor | None:
    """View ``tensor`` (shaped like ``module.weight``) as one row per output (or input) channel.

    Row ``c`` holds every weight that disappears when channel ``c`` is removed. Grouped convolutions map input
    channel ``c`` to column ``c % (C_in/groups)`` of the filters of group ``c // (C_in/groups)``; depthwise
    convolutions have one filter per channel in both directions. Returns None where no row view exists.
    """
    kind = layer_kind(module)
    if kind == "norm":
        return tensor.reshape(-1, 1)
    if kind == "linear":
        return tensor.flatten(1) if is_out else tensor.reshape(tensor.shape[0], -1).transpose(0, 1)
    if kind != "conv" or tensor.ndim < 2:
        return None
    groups = int(getattr(module, "groups", 1))
    if getattr(module, "transposed", False):
        if groups != 1:
            return None
        tensor = tensor.transpose(0, 1)  # (C_in, C_out, k...) -> (C_out, C_in, k...)
    c_out, c_in_per_group = tensor.shape[0], tensor.shape[1]
    if is_out or (groups > 1 and groups == c_out and c_in_per_group == 1):  # outputs, or depthwise inputs
        return tensor.reshape(c_out, -1)
    if groups == 1:
        return tensor.transpose(0, 1).reshape(c_in_per_group, -1)
    per_group = tensor.reshape(groups, c_out // groups, c_in_per_group, -1)  # (g, O/g, I/g, k)
    return per_group.permute(0, 2, 1, 3).reshape(groups * c_in_per_group, -1)


# --------------------------------------------------------------------------- pruners for our layers
def _keep(n: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


class ConvLikePruner(BasePruningFunc):
    """Pruner for convolution-like layers that are not ``nn.Conv2d`` subclasses (``weight`` of shape
    ``(C_out, C_in/groups, *k)``, optional ``bias``, ``in_channels``/``out_channels``/``groups`` attributes),
    such as adder layers. Extra per-output-channel parameters (e.g. a binary layer's scale ``alpha``) are sliced
    along with the filters when their first dimension is ``C_out``. Grouped layers are left alone (``get_*``
    return None for them), so Torch-Pruning never selects their channels."""

    def _select(self, layer: nn.Module, name: str, keep: list[int], dim: int) -> None:
        tensor = getattr(layer, name)
        index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(layer, name, self._prune_parameter_and_grad(tensor, keep, dim))
        else:
            setattr(layer, name, torch.index_select(tensor, dim, index))

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        out = int(layer.out_channels)
        keep = _keep(out, idxs)
        for name, tensor in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
            if tensor is not None and tensor.ndim >= 1 and tensor.shape[0] == out:
                self._select(layer, name, keep, 0)
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(int(layer.in_channels), idxs)
        self._select(layer, "weight", keep, 1)
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return None if int(getattr(layer, "groups", 1)) != 1 else int(layer.out_channels)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return None if int(getattr(layer, "groups", 1)) != 1 else int(layer.in_channels)


class CameraBatchNormPruner(BasePruningFunc):
    """Camera-based batch norm (arXiv:2001.08680): shared affine ``weight``/``bias`` of shape ``(C,)`` and
    per-camera running statistics of shape ``(num_cameras, C)``: channels are the last dimension of every
    tensor."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(int(layer.num_features), idxs)
        for name in ("weight", "bias", "running_mean", "running_var"):  # not num_batches_tracked (per camera)
            tensor = getattr(layer, name, None)
            if tensor is None:
                continue
            if isinstance(tensor, nn.Parameter):
                setattr(layer, name, self._prune_parameter_and_grad(tensor, keep, tensor.ndim - 1))
            else:
                index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
                setattr(layer, name, torch.index_select(tensor, tensor.ndim - 1, index))
        layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.num_features)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.num_features)


class GroupNormPruner(BasePruningFunc):
    """``nn.GroupNorm`` whose ``num_groups`` follows the channels that were removed.

    Torch-Pruning's own GroupNorm pruner keeps ``num_groups`` and only shrinks ``num_channels``, which is right
    only when every group loses the same number of channels. This one reads which convention the removed
    channels follow (they are root-channel decisions of :mod:`lightning_effnets.pruning.planning`, so it is
    always one of the two) and sets ``num_groups`` accordingly:

    * every group loses the same number of channels (``group_norm="keep_groups"``): ``num_groups`` stays;
    * whole groups (blocks of ``C/num_groups`` contiguous channels) are removed (``group_norm="keep_group_size"``):
      ``num_groups`` shrinks by the number of removed groups, so the group size stays.

    No removal is both (that would empty the layer), so a recorded step replays to the same ``num_groups``
    without knowing the option it was planned with. Any other removal would leave channels that do not divide
    into groups and is an error.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        channels, groups = int(layer.num_channels), int(layer.num_groups)
        size = channels // groups
        removed = sorted(set(int(i) for i in idxs))
        per_group: dict[int, int] = {}
        for i in removed:
            per_group[i // size] = per_group.get(i // size, 0) + 1
        if removed and all(n == size for n in per_group.values()):
            new_groups = groups - len(per_group)
        elif not removed or (len(per_group) == groups and len(set(per_group.values())) == 1):
            new_groups = groups
        else:
            raise ValueError(f"GroupNorm({groups}, {channels}): removing channels {removed[:16]} neither removes "
                             f"whole groups of {size} channels nor the same number from every group, so the "
                             "remaining channels cannot be grouped; prune it with group_norm='keep_groups' or "
                             "'keep_group_size'")
        keep = _keep(channels, removed)
        if layer.affine:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.num_channels = len(keep)
        layer.num_groups = new_groups
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.num_channels)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.num_channels)

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return int(layer.num_groups)

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return int(layer.num_groups)


class ScaledConvPruner(ConvPruner):
    """``nn.Conv2d`` subclasses with a per-output-channel ``scale`` parameter (the binary layers' alpha)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        scale = getattr(layer, "scale", None)
        keep = _keep(int(layer.out_channels), idxs)
        super().prune_out_channels(layer, idxs)
        if isinstance(scale, nn.Parameter):
            layer.scale = self._prune_parameter_and_grad(scale, keep, 0)
        return layer


class ScaledLinearPruner(LinearPruner):
    """``nn.Linear`` subclasses with a per-output ``scale`` parameter."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        scale = getattr(layer, "scale", None)
        keep = _keep(int(layer.out_features), idxs)
        super().prune_out_channels(layer, idxs)
        if isinstance(scale, nn.Parameter):
            layer.scale = self._prune_parameter_and_grad(scale, keep, 0)
        return layer


def _import(module: str, name: str) -> type[nn.Module] | None:
    """The class, or None when its module is not part of this installation."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        if error.name == module:
            return None
        raise


def _register_project_layers() -> None:
    """Register the project's own layers (the single place that knows how to prune them)."""
    adder = _import("lightning_effnets.layers.adder", "Adder2d")
    if adder is not None:
        register_layer(adder, "conv", ConvLikePruner())
    binary_conv = _import("lightning_effnets.layers.binary", "BinaryConv2d")
    if binary_conv is not None:
        register_layer(binary_conv, "conv", ScaledConvPruner())
    binary_linear = _import("lightning_effnets.layers.binary", "BinaryLinear")
    if binary_linear is not None:
        register_layer(binary_linear, "linear", ScaledLinearPruner())
    camera_bn = _import("lightning_effnets.layers.camera_bn", "CameraBatchNorm2d")
    if camera_bn is not None:
        register_layer(camera_bn, "norm", CameraBatchNormPruner())
    camera_bn1d = _import("lightning_effnets.layers.camera_bn", "CameraBatchNorm1d")
    if camera_bn1d is not None:
        register_layer(camera_bn1d, "norm", CameraBatchNormPruner())


_register_project_layers()
