"""Dependency graph and pruning groups: a thin layer over Torch-Pruning's ``DependencyGraph`` (arXiv:2301.12900).

Torch-Pruning traces the model once and, for any channel of any layer, returns the *group* of coupled slices
that must go with it (the BN after a conv, the next conv's input columns, every branch of a residual add, the
inputs of a concatenation, depthwise convs). This module builds that graph with the project's layer registry,
restores the train/eval mode that tracing changes, and turns Torch-Pruning groups into plain
:class:`ChannelItem` lists that importance criteria read without touching Torch-Pruning internals.

GroupNorm (arXiv:1803.08494) can be pruned two ways (``group_norm``):

* ``"keep_groups"`` (Torch-Pruning's convention, the default): ``num_groups`` stays and every group loses the same
  number of channels, so the group size shrinks. Halving GroupNorm(32, 64) gives GroupNorm(32, 32), one channel
  per group: instance normalisation, which discards each channel's per-image scale.
* ``"keep_group_size"``: whole groups are removed, so ``num_groups`` shrinks and the group size (the statistic
  each channel is normalised with) stays: GroupNorm(32, 64) halved is GroupNorm(16, 32). The unit ranked and
  removed is a block of ``C/num_groups`` contiguous channels (:attr:`PrunableGroup.block`); a GroupNorm with a
  single group (layer norm over channels) therefore keeps all its channels.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_effnets.pruning.layers import GroupNormPruner, layer_kind, registered_layers

__all__ = ["GROUP_NORM_MODES", "ChannelItem", "PrunableGroup", "build_graph", "check_group_norm_mode", "forward",
           "prunable_groups", "resolve_modules", "root_module_types"]

#: how pruning treats GroupNorm (see module docstring)
GROUP_NORM_MODES = ("keep_groups", "keep_group_size")


def check_group_norm_mode(value: Any) -> str:
    """``value`` if it is one of :data:`GROUP_NORM_MODES`, else a ValueError naming the choices."""
    if value not in GROUP_NORM_MODES:
        raise ValueError(f"group_norm must be 'keep_groups' (num_groups stays, every group loses channels evenly; "
                         f"Torch-Pruning's convention) or 'keep_group_size' (whole groups are removed, channels per "
                         f"group stay), got {value!r}")
    return str(value)


def forward(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on ``example_input`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def root_module_types() -> tuple[type[nn.Module], ...]:
    """Layer types whose output channels start a pruning group: convolutions, linear layers, registered ones."""
    extra = tuple(t for t, s in registered_layers().items() if s.kind in ("conv", "linear"))
    return (nn.modules.conv._ConvNd, nn.Linear) + extra


def build_graph(model: nn.Module, example_input: Any) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning ``DependencyGraph`` that knows the registered layers.

    Tracing runs one forward in eval mode with autograd on (Torch-Pruning reads the autograd graph); the
    model's train/eval mode is restored afterwards. ``nn.GroupNorm`` gets :class:`GroupNormPruner`, which
    updates ``num_groups`` when whole groups are removed (both GroupNorm conventions, see module docstring).
    """
    customized: dict[type[nn.Module], Any] = {nn.GroupNorm: GroupNormPruner()}
    customized.update({t: s.pruner for t, s in registered_layers().items() if s.pruner is not None})
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=forward, customized_pruners=customized,
                verbose=False)
    finally:
        for module, training in modes.items():
            module.training = training
    return graph


@dataclass(frozen=True)
class ChannelItem:
    """One layer's share of a pruning group: removing root channel ``root_idxs[j]`` removes this layer's
    output (``is_out``) or input channel ``idxs[j]``."""

    name: str
    module: nn.Module
    is_out: bool
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass
class PrunableGroup:
    """A group of coupled channels, identified by its root layer (the layer whose output channels define it)."""

    root: str
    channels: int  # current output channels of the root
    channel_groups: int  # >1 for grouped convs / GroupNorm: channels are removed evenly from every group
    items: list[ChannelItem]
    members: list[str]  # layers whose output channels the group removes
    #: contiguous slots removed together (GroupNorm group size with ``group_norm="keep_group_size"``, else 1)
    block: int = 1

    @property
    def slots(self) -> int:
        """Channels per channel group."""
        return self.channels // self.channel_groups

    @property
    def units(self) -> int:
        """What importance is ranked over: blocks of ``block`` contiguous slots (one slot when ``block == 1``).
        Unit ``u`` is channels ``g * slots + u * block + j`` for every channel group ``g`` and ``j < block``."""
        return self.slots // self.block


def _head_counts(graph: tp.DependencyGraph) -> dict[int, int]:
    """``id(layer) -> num_heads`` for the direct child layers of every module with an integer ``num_heads``
    attribute (multi-head attention blocks such as timm's ``Attention`` or the referring task's GARAN unit).

    Such a block reshapes its projections' channels into ``num_heads`` equal heads, so pruning must remove the
    same number of channels from every head: heads are treated as channel groups (as Torch-Pruning does for
    ``num_heads`` in its own pruner), which keeps the width divisible by ``num_heads``.
    """
    counts: dict[int, int] = {}
    for parent in graph.model.modules():
        heads = getattr(parent, "num_heads", None)
        if isinstance(heads, int) and heads > 1:
            for child in parent.children():
                counts[id(child)] = math.lcm(counts.get(id(child), 1), heads)
    return counts


def _channel_groups(graph: tp.DependencyGraph, group: Any, heads: dict[int, int] | None = None,
                    group_norm: str = "keep_groups") -> int:
    """Channel grouping the group's layers need (Torch-Pruning's convention; depthwise excluded): the largest
    grouped-layer count, combined (lcm) with the head count of attention projections (:func:`_head_counts`).
    With ``group_norm="keep_group_size"`` GroupNorm layers add no grouping here (see :func:`_group_norm_block`)."""
    result = 1
    for dep, _ in group:
        module = dep.target.module
        if not isinstance(module, nn.Module):
            continue
        if group_norm == "keep_group_size" and isinstance(module, nn.GroupNorm):
            continue
        if heads and id(module) in heads:
            result = math.lcm(result, heads[id(module)])
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            count = pruner.get_out_channel_groups(module)
        else:
            count = pruner.get_in_channel_groups(module)
        result = math.lcm(result, int(count or 1))
    return result


def _group_norm_block(group: Any, slots: int) -> int | None:
    """Slots removed together so that every GroupNorm of the group loses whole groups (``"keep_group_size"``):
    the lcm of their group sizes. None when a GroupNorm's groups do not line up with the root's units: its channels
    are not the root's shifted by a multiple of the group size (e.g. a concatenation at an unaligned offset), or
    the group size does not divide the channels per channel group."""
    block = 1
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, nn.GroupNorm):
            continue
        size = int(module.num_channels) // int(module.num_groups)
        root_idxs = item.root_idxs
        if root_idxs is None or any(r is None for r in root_idxs):
            return None
        offsets = {int(i) - int(r) for i, r in zip(item.idxs, root_idxs)}
        if len(offsets) != 1 or next(iter(offsets)) % size:
            return None
        block = math.lcm(block, size)
    return block if slots % block == 0 else None


def _items(graph: tp.DependencyGraph, group: Any) -> list[ChannelItem]:
    names = graph._module2name
    items = []
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or layer_kind(module) is None:
            continue
        root_idxs = item.root_idxs
        if root_idxs is None or any(r is None for r in root_idxs):
            continue
        items.append(ChannelItem(name=names.get(module, ""), module=module,
                                 is_out=graph.is_out_channel_pruning_fn(item.dep.handler),
                                 idxs=tuple(int(i) for i in item.idxs), root_idxs=tuple(int(r) for r in root_idxs)))
    return items


def _root_groups(graph: tp.DependencyGraph, ignored: list[nn.Module]) -> Iterator[Any]:
    """Torch-Pruning's ``get_all_groups`` (same root order, ignored layers and visited-layer rule), made robust.

    Two differences, both about roots that cannot lose a channel anyway:

    * roots with a single output channel are skipped (nothing can be removed from them);
    * a root whose group Torch-Pruning cannot build is skipped with a warning naming it, instead of aborting the
      whole traversal. This happens when the group's propagation reaches operations whose channel index mapping
      Torch-Pruning cannot infer, e.g. the per-time-step gate ``chunk`` ops that a CPU ``nn.GRU``/``nn.LSTM`` is
      unrolled into under autograd: their split sizes are unknown, so the split's offset list is ``[0]`` and the
      mapping raises ``IndexError``. Such layers' channels cannot be pruned consistently (Torch-Pruning has no
      pruner for the recurrent weights either), so leaving the root alone is the only correct choice.
    """
    names = graph._module2name
    ignored_ids = {id(m) for m in ignored + list(graph.IGNORED_LAYERS_IN_TRACING)}
    root_types = root_module_types()
    visited: set[int] = set()
    for module in list(graph.module2node):
        if not isinstance(module, root_types) or id(module) in ignored_ids or id(module) in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if not channels or channels <= 1:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except (IndexError, KeyError, ValueError) as error:
            warnings.warn(f"channel pruning leaves {names.get(module, type(module).__name__)!r} unpruned: "
                          f"Torch-Pruning cannot map its channels through the graph ({type(error).__name__}: "
                          f"{error}); typical cause: a layer it cannot trace into (e.g. a recurrent layer) consumes "
                          "them. Add it to ignored_layers to silence this.", stacklevel=3)
            continue
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                if id(dep.target.module) in ignored_ids:
                    prunable = False
        if prunable:
            yield group


def prunable_groups(graph: tp.DependencyGraph, ignored: Iterable[nn.Module] = (), group_norm: str = "keep_groups"
                    ) -> Iterator[PrunableGroup]:
    """Every group whose root is a conv/linear layer and that changes no ignored layer's output channels.

    ``group_norm`` (:data:`GROUP_NORM_MODES`) chooses how GroupNorm layers constrain the removed channels; with
    ``"keep_group_size"`` a group whose GroupNorm groups cannot be removed whole is left unpruned with a warning.
    """
    group_norm = check_group_norm_mode(group_norm)
    ignored_list = list(ignored)
    names = graph._module2name
    custom = tuple(t for t, s in registered_layers().items() if s.pruner is not None)
    heads = _head_counts(graph)
    for group in _root_groups(graph, ignored_list):
        if any(isinstance(dep.target.module, custom) and int(getattr(dep.target.module, "groups", 1)) > 1
               for dep, _ in group):
            continue  # grouped custom layers: no depthwise coupling in Torch-Pruning for them
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        if not channels:
            continue
        members = [names[dep.target.module] for dep, _ in group
                   if isinstance(dep.target.module, nn.Module) and graph.is_out_channel_pruning_fn(dep.handler)
                   and dep.target.module in names]
        ch_groups = _channel_groups(graph, group, heads, group_norm)
        if channels % ch_groups:
            continue
        block = 1
        if group_norm == "keep_group_size":
            found = _group_norm_block(group, int(channels) // ch_groups)
            if found is None:
                warnings.warn(f"channel pruning leaves {names[root]!r} unpruned: with group_norm='keep_group_size' "
                              "the GroupNorm groups its channels reach cannot be removed whole (they are not aligned "
                              "with its channels); use group_norm='keep_groups' or add it to ignored_layers",
                              stacklevel=2)
                continue
            block = found
        yield PrunableGroup(root=names[root], channels=int(channels), channel_groups=ch_groups,
                            items=_items(graph, group), members=members, block=block)


def resolve_modules(model: nn.Module, layers: Iterable[str | nn.Module | type] | None) -> list[nn.Module]:
    """Modules named by ``layers``: qualified names or glob patterns (``"layer4.*"``), module instances, or
    layer types. Every submodule of a match is included. A pattern that matches nothing is an error (typos
    would otherwise silently prune a layer that was meant to be kept)."""
    if not layers:
        return []
    named = dict(model.named_modules())
    found: dict[int, nn.Module] = {}
    for spec in layers:
        if isinstance(spec, nn.Module):
            matches = [spec]
        elif isinstance(spec, type):
            matches = [m for m in named.values() if isinstance(m, spec)]
        elif isinstance(spec, str):
            matches = [m for name, m in named.items() if name and (name == spec or fnmatch.fnmatchcase(name, spec))]
        else:
            raise TypeError(f"ignored layer {spec!r} must be a module name/pattern, a module or a module type")
        if not matches:
            examples = ", ".join(n for n in list(named)[1:6])
            raise ValueError(f"ignored layer {spec!r} matches no module of {type(model).__name__} "
                             f"(names look like: {examples}, ...)")
        for match in matches:
            for sub in match.modules():
                found[id(sub)] = sub
    return list(found.values())
