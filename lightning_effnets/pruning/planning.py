"""From importance scores to the channels one pruning step removes.

Targets are always relative to the *original* width of each group, so iterative pruning (and a resumed run)
reaches exactly the width a one-shot run would: after step ``k`` of ``n`` a group with ``C0`` original channels
keeps ``floor(C0 * (1 - ratio * k/n))``, rounded up to a multiple of ``round_to``. Local pruning ranks channels
within each group; global pruning ranks all groups together (network slimming's single threshold). A MACs budget
is met by bisection on the ratio, each trial pruning a copy of the model and counting its MACs.
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
    importance: Tensor  # one score per slot (channels / channel_groups), higher = keep
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
        per_slot = scores.view(group.channel_groups, group.slots).mean(0)
        scored.append(ScoredGroup(group=group, initial=int(initial_channels.get(group.root, group.channels)),
                                  importance=per_slot, ratio=layer_ratio(group, layer_ratios)))
    return scored


def _kept_slots(initial_slots: int, ratio: float, round_to: int | None) -> int:
    """Width after removing ``ratio`` of ``initial_slots``; with ``round_to`` rounded *up* to a multiple of it
    (never removing more than asked, as Torch-Pruning and the global path do), capped at the original width."""
    keep = math.floor(initial_slots * (1.0 - ratio) + 1e-6)
    if round_to and initial_slots >= round_to:
        keep = min(initial_slots, math.ceil(keep / round_to) * round_to)
    return max(keep, 1)


def _indices(scored: ScoredGroup, n_remove: int) -> list[int]:
    if n_remove <= 0:
        return []
    order = torch.argsort(scored.importance, stable=True)[:n_remove].tolist()
    slots = scored.group.slots
    return sorted(s + g * slots for g in range(scored.group.channel_groups) for s in order)


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
        keep = _kept_slots(s.initial // s.group.channel_groups, target, round_to)
        idxs = _indices(s, s.group.slots - min(keep, s.group.slots))
        if idxs:
            decisions.append((s.group.root, idxs))
    if not pooled:
        return decisions

    initial_total = sum(s.initial // s.group.channel_groups for s in pooled)
    current_total = sum(s.group.slots for s in pooled)
    to_remove = current_total - math.floor(initial_total * (1.0 - ratio * fraction) + 1e-6)
    floors = [max(1, math.ceil((s.initial // s.group.channel_groups) * (1.0 - max_layer_ratio) - 1e-6)) for s in pooled]
    candidates = []
    for gi, s in enumerate(pooled):
        imp = s.importance / s.importance.mean().clamp(min=1e-12) if normalize else s.importance
        candidates += [(float(v), gi, slot) for slot, v in enumerate(imp.tolist())]
    candidates.sort()
    removed: list[list[int]] = [[] for _ in pooled]
    for _, gi, slot in candidates:
        if to_remove <= 0:
            break
        if pooled[gi].group.slots - len(removed[gi]) > floors[gi]:
            removed[gi].append(slot)
            to_remove -= 1
    for gi, s in enumerate(pooled):
        n = len(removed[gi])
        if round_to and n:  # round the kept width up to a multiple of round_to (never prune more than ranked)
            kept = min(s.group.slots, math.ceil((s.group.slots - n) / round_to) * round_to)
            n = s.group.slots - kept
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

