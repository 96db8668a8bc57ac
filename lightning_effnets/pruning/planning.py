"""From importance scores to the channels one pruning step removes.

Targets are always relative to the *original* width of each group, so iterative pruning (and a resumed run)
reaches exactly the width a one-shot run would: after step ``k`` of ``n`` a group with ``C0`` original channels
keeps ``floor(C0 * (1 - ratio * k/n))``, rounded up to a multiple of ``round_to``. Local pruning ranks channels
within each group; global pruning ranks all groups together (network slimming's single threshold). A MACs budget
is met by bisection on the ratio, each trial pruning a copy of the model and counting its MACs.

Widths are counted in *slots* (channels per channel group; a channel for ungrouped layers). With
``group_norm="keep_group_size"`` a group's ranked unit is a block of ``PrunableGroup.block`` contiguous slots
(one GroupNorm group); its importance is the *mean* of its channels' scores, and kept widths are rounded up to a
multiple of ``lcm(round_to, block)`` (to ``block`` alone for a layer narrower than that), so they stay whole
groups and multiples of ``round_to``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_effnets.pruning.graph import PrunableGroup

__all__ = ["ScoredGroup", "Decision", "score_groups", "select_channels", "layer_ratio", "solve_ratio"]

#: one pruning decision: remove these output channels of the root layer (and everything coupled to them)
Decision = tuple[str, list[int]]


@dataclass
class ScoredGroup:
    group: PrunableGroup
    initial: int  # root channels before any pruning
    importance: Tensor  # one score per unit (group.units blocks of group.block slots), higher = keep
    ratio: float | None  # per-layer override of the ratio (at the final step), None = default


def layer_ratio(group: PrunableGroup, layer_ratios: Mapping[str, float] | None) -> float | None:
    """The first ``layer_ratios`` entry (name or glob pattern) that matches a layer of the group."""
    if not layer_ratios:
        return None
    for pattern, value in layer_ratios.items():
        if any(m == pattern or fnmatch.fnmatchcase(m, pattern) for m in group.members):
            return float(value)
    return None


def score_groups(groups: Sequence[PrunableGroup], score: Callable[[PrunableGroup], Tensor | None],
                 initial_channels: Mapping[str, int], layer_ratios: Mapping[str, float] | None = None,
                 ) -> list[ScoredGroup]:
    """Score every group; groups the criterion cannot score are left out."""
    scored = []
    for group in groups:
        scores = score(group)
        if scores is None:
            continue
        if scores.numel() != group.channels:
            raise RuntimeError(f"criterion returned {scores.numel()} scores for group {group.root!r} with "
                               f"{group.channels} channels")
        scores = torch.nan_to_num(scores.detach().float().cpu(), nan=0.0)
        per_unit = scores.view(group.channel_groups, group.units, group.block).mean((0, 2))
        scored.append(ScoredGroup(group=group, initial=int(initial_channels.get(group.root, group.channels)),
                                  importance=per_unit, ratio=layer_ratio(group, layer_ratios)))
    return scored


def _kept_slots(initial_slots: int, ratio: float, round_to: int | None, block: int = 1) -> int:
    """Width after removing ``ratio`` of ``initial_slots``; rounded *up* (never removing more than asked, as
    Torch-Pruning and the global path do) to a multiple of ``lcm(round_to, block)``, or of ``block`` alone when
    the layer is narrower than that, and capped at the original width."""
    keep = math.floor(initial_slots * (1.0 - ratio) + 1e-6)
    step = math.lcm(round_to or 1, block)
    if initial_slots < step:
        step = block
    if step > 1:
        keep = min(initial_slots, math.ceil(keep / step) * step)
    return max(keep, block)


def _indices(scored: ScoredGroup, n_remove: int) -> list[int]:
    """Channels of the ``n_remove`` least important units, in every channel group."""
    if n_remove <= 0:
        return []
    order = torch.argsort(scored.importance, stable=True)[:n_remove].tolist()
    slots, block = scored.group.slots, scored.group.block
    return sorted(g * slots + u * block + j for g in range(scored.group.channel_groups) for u in order
                  for j in range(block))


def select_channels(scored: Sequence[ScoredGroup], ratio: float, *, fraction: float = 1.0,
                    global_pruning: bool = False, normalize: bool = True, round_to: int | None = None,
                    max_layer_ratio: float = 0.9) -> list[Decision]:
    """Which channels to remove so that every group is at its target width after this step.

    ``ratio`` is the final fraction of channels removed (per group, or over all groups when ``global_pruning``);
    ``fraction`` in (0, 1] is how far along the schedule this step is (``k/n``). Layer-specific ratios always
    apply per group. In global mode no group loses more than ``max_layer_ratio`` of its original channels.
    """
    decisions: list[Decision] = []
    pooled: list[ScoredGroup] = []
    for s in scored:
        if s.ratio is None and global_pruning:
            pooled.append(s)
            continue
        target = (s.ratio if s.ratio is not None else ratio) * fraction
        keep = _kept_slots(s.initial // s.group.channel_groups, target, round_to, s.group.block)
        idxs = _indices(s, (s.group.slots - min(keep, s.group.slots)) // s.group.block)
        if idxs:
            decisions.append((s.group.root, idxs))
    if not pooled:
        return decisions

    initial_total = sum(s.initial // s.group.channel_groups for s in pooled)
    current_total = sum(s.group.slots for s in pooled)
    to_remove = current_total - math.floor(initial_total * (1.0 - ratio * fraction) + 1e-6)
    floors = [s.group.block * max(1, math.ceil((s.initial // s.group.channel_groups) * (1.0 - max_layer_ratio)
                                                / s.group.block - 1e-6)) for s in pooled]
    candidates = []
    for gi, s in enumerate(pooled):
        imp = s.importance / s.importance.mean().clamp(min=1e-12) if normalize else s.importance
        candidates += [(float(v), gi, unit) for unit, v in enumerate(imp.tolist())]
    candidates.sort()
    removed = [0 for _ in pooled]  # units removed per group; a unit is `block` slots
    for _, gi, _ in candidates:
        if to_remove <= 0:
            break
        block = pooled[gi].group.block
        if block > to_remove:  # a whole group would overshoot the budget (kept widths round up, as locally)
            continue
        if pooled[gi].group.slots - (removed[gi] + 1) * block >= floors[gi]:
            removed[gi] += 1
            to_remove -= block
    for gi, s in enumerate(pooled):
        n, block = removed[gi], s.group.block
        if round_to and n:  # round the kept width up to a multiple of round_to (never prune more than ranked)
            step = math.lcm(round_to, block)
            kept = min(s.group.slots, math.ceil((s.group.slots - n * block) / step) * step)
            n = (s.group.slots - kept) // block
        idxs = _indices(s, n)
        if idxs:
            decisions.append((s.group.root, idxs))
    return decisions


def solve_ratio(model: nn.Module, macs_fraction: float, initial_macs: float, decide: Callable[[float], list[Decision]],
                apply: Callable[[nn.Module, list[Decision]], None], count_macs: Callable[[nn.Module], float],
                max_ratio: float = 0.95, iterations: int = 12) -> tuple[float, float]:
    """Smallest ratio (within ``2**-iterations``) whose pruned copy keeps at most ``macs_fraction`` of
    ``initial_macs``; returns ``(ratio, achieved_fraction)``. Raises ValueError when even ``max_ratio`` cannot
    meet the budget (the unprunable layers alone cost more)."""
    cache: dict[float, float] = {}

    def trial(r: float) -> float:
        if r not in cache:
            clone = copy.deepcopy(model)
            apply(clone, decide(r))
            cache[r] = count_macs(clone) / initial_macs
        return cache[r]

    if trial(max_ratio) > macs_fraction + 1e-9:
        raise ValueError(f"macs_target={macs_fraction:.4g} cannot be met: removing {max_ratio:.0%} of every prunable "
                         f"group still keeps {trial(max_ratio):.4g} of the MACs (protected layers such as the stem "
                         f"and the output layers are not pruned). Raise macs_target to at least "
                         f"{math.ceil(trial(max_ratio) * 1000) / 1000:.3f}, or prune more layers.")
    low, high = 0.0, max_ratio
    if trial(low) <= macs_fraction + 1e-9:
        return low, trial(low)
    for _ in range(iterations):
        mid = (low + high) / 2
        if trial(mid) <= macs_fraction + 1e-9:
            high = mid
        else:
            low = mid
    return high, trial(high)

