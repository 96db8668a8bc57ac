"""One pruning step end to end, with or without a Trainer: score, decide, cut, record.

:class:`StructuredPruner` holds what a step needs (criterion, targets, protected layers) and what must persist
between steps (original widths, original MACs, the record). :func:`prune` is the Trainer-free entry point;
the :class:`~lightning_effnets.callbacks.ChannelPruning` callback drives the same object on a schedule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_effnets.cost import profile
from lightning_effnets.pruning.graph import (PrunableGroup, build_graph, check_group_norm_mode, forward,
                                             prunable_groups, resolve_modules)
from lightning_effnets.pruning.importance import Criterion, build_criterion
from lightning_effnets.pruning.planning import Decision, score_groups, select_channels, solve_ratio
from lightning_effnets.pruning.record import PruningRecord, attach_record, get_record, input_spec
from lightning_effnets.pruning.surgery import Surgery, apply_decisions

__all__ = ["StructuredPruner", "prune", "default_output_modules", "LayerSpec"]

LayerSpec = str | nn.Module | type


def default_output_modules(model: nn.Module) -> list[nn.Module]:
    """The last ``nn.Linear``/``nn.Conv2d`` in registration order (the classifier of timm-style models), the same
    default as :meth:`EffnetsTaskMixin.output_modules`."""
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = module
    return [last] if last is not None else []


def _check_ratio(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of channels removed), got {value!r}")
    return float(value)


class StructuredPruner:
    """Dependency-aware channel pruning of one model (see :func:`prune` for the arguments)."""

    def __init__(
        self,
        criterion: str | Criterion = "magnitude",
        ratio: float = 0.5,
        macs_target: float | None = None,
        ignored_layers: Sequence[LayerSpec] | None = None,
        round_to: int | None = None,
        layer_ratios: Mapping[str, float] | None = None,
        global_pruning: bool | None = None,
        max_layer_ratio: float = 0.9,
        group_norm: str = "keep_groups",
    ) -> None:
        self.criterion = build_criterion(criterion)
        self.group_norm = check_group_norm_mode(group_norm)
        self.ratio = _check_ratio("ratio", ratio)
        if macs_target is not None and not (isinstance(macs_target, (int, float)) and 0.0 < macs_target <= 1.0):
            raise ValueError(f"macs_target must be in (0, 1] (the fraction of MACs to keep), got {macs_target!r}")
        self.macs_target = None if macs_target is None else float(macs_target)
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        self.round_to = round_to
        self.layer_ratios = {str(k): _check_ratio(f"layer_ratios[{k!r}]", v) for k, v in (layer_ratios or {}).items()}
        self.global_pruning = self.criterion.prefers_global if global_pruning is None else bool(global_pruning)
        self.max_layer_ratio = _check_ratio("max_layer_ratio", max_layer_ratio)
        self.ignored_layers = list(ignored_layers or [])
        self.initial_channels: dict[str, int] = {}
        self.initial_macs: float | None = None
        self.last_ratio: float | None = None
        self._graph: tuple[nn.Module, tp.DependencyGraph] | None = None  # traced by plan(), reused by apply()

    # ------------------------------------------------------------------ groups
    def protected_modules(self, model: nn.Module, output_modules: Iterable[nn.Module]) -> list[nn.Module]:
        outputs = [m for m in output_modules if m is not None]
        return resolve_modules(model, self.ignored_layers) + resolve_modules(model, outputs)

    def groups(self, model: nn.Module, graph: tp.DependencyGraph, protected: Sequence[nn.Module]
               ) -> list[PrunableGroup]:
        """Prunable groups the criterion can score; an error if there is none."""
        groups = [g for g in prunable_groups(graph, protected, self.group_norm) if self.criterion.can_score(g)]
        if not groups:
            raise ValueError(
                f"nothing to prune in {type(model).__name__}: no conv/linear layer has output channels that are "
                f"neither protected (output layers, ignored_layers) nor unscorable by the "
                f"{type(self.criterion).__name__} criterion (network slimming needs BatchNorm-like layers). "
                "Check ignored_layers, or use criterion='magnitude'.")
        return groups

    def remember_initial(self, model: nn.Module, example_input: Any, graph: tp.DependencyGraph | None = None) -> None:
        """Record original widths (and MACs when a MACs budget is used) once, before the first step."""
        if not self.initial_channels:
            graph = graph or build_graph(model, example_input)
            names = graph._module2name
            for module in graph.module2node:
                if isinstance(module, nn.Module) and module in names:
                    channels = graph.get_out_channels(module)
                    if channels:
                        self.initial_channels[names[module]] = int(channels)
        if self.macs_target is not None and self.initial_macs is None:
            self.initial_macs = float(profile(model, example_input, measure_latency=False).macs)

    def check(self, model: nn.Module, example_input: Any, output_modules: Iterable[nn.Module] | None = None
              ) -> list[PrunableGroup]:
        """Fail early with a clear message: nothing prunable, unknown ignored layers, an unreachable MACs
        budget. Returns the prunable groups."""
        outputs = default_output_modules(model) if output_modules is None else list(output_modules)
        graph = build_graph(model, example_input)
        groups = self.groups(model, graph, self.protected_modules(model, outputs))
        if self.macs_target is not None:
            self.remember_initial(model, example_input, graph)
            uniform = score_groups(groups, lambda g: torch.zeros(g.channels), self.initial_channels, self.layer_ratios)
            solve_ratio(model, self.macs_target, float(self.initial_macs or 1.0),
                        lambda r: select_channels(uniform, r, round_to=self.round_to,
                                                  max_layer_ratio=self.max_layer_ratio),
                        apply=lambda clone, d: apply_decisions(clone, build_graph(clone, example_input), d, True,
                                                               False),
                        count_macs=lambda clone: float(profile(clone, example_input, measure_latency=False).macs),
                        max_ratio=max(self.max_layer_ratio, 0.5), iterations=0)
        return groups

    # ------------------------------------------------------------------ one step
    def plan(self, model: nn.Module, example_input: Any, fraction: float = 1.0,
             output_modules: Iterable[nn.Module] | None = None) -> list[Decision]:
        """Decisions that bring every group to its target width at ``fraction`` of the schedule."""
        outputs = default_output_modules(model) if output_modules is None else list(output_modules)
        protected = self.protected_modules(model, outputs)
        graph = build_graph(model, example_input)
        self._graph = (model, graph)
        self.remember_initial(model, example_input, graph)
        scored = score_groups(self.groups(model, graph, protected), self.criterion.score, self.initial_channels,
                              self.layer_ratios)

        def decide(ratio: float) -> list[Decision]:
            return select_channels(scored, ratio, fraction=1.0 if self.macs_target is not None else fraction,
                                   global_pruning=self.global_pruning, normalize=self.criterion.normalize_globally,
                                   round_to=self.round_to, max_layer_ratio=self.max_layer_ratio)

        if self.macs_target is None:
            self.last_ratio = self.ratio * fraction
            return decide(self.ratio)
        keep = 1.0 - (1.0 - self.macs_target) * fraction
        ratio, _ = solve_ratio(
            model, keep, float(self.initial_macs or 1.0), decide,
            apply=lambda clone, decisions: apply_decisions(clone, build_graph(clone, example_input), decisions,
                                                          skip_invalid=True, track=False),
            count_macs=lambda clone: float(profile(clone, example_input, measure_latency=False).macs),
            max_ratio=max(self.max_layer_ratio, 0.5))
        self.last_ratio = ratio
        return decide(ratio)

    def apply(self, model: nn.Module, example_input: Any, decisions: Sequence[Decision], track: bool = True
              ) -> Surgery:
        """Cut ``decisions`` out of ``model`` (skipping any that would empty a coupled layer), append the applied
        ones to its record, check that it still runs. ``track`` computes the old -> new parameter index maps
        that optimizer state needs."""
        cached, self._graph = self._graph, None
        graph = cached[1] if cached is not None and cached[0] is model else build_graph(model, example_input)
        surgery = apply_decisions(model, graph, decisions, skip_invalid=True,
                                  track=track or self.criterion.needs_changes)
        record = get_record(model) or PruningRecord(input=input_spec(example_input))
        record.steps.append(surgery.applied)
        attach_record(model, record)
        self.criterion.on_pruned(model, surgery.changes)
        check_forward(model, example_input)
        return surgery

    def state_dict(self) -> dict[str, Any]:
        return {"initial_channels": dict(self.initial_channels), "initial_macs": self.initial_macs,
                "last_ratio": self.last_ratio, "criterion": self.criterion.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial_channels = {str(k): int(v) for k, v in state.get("initial_channels", {}).items()}
        self.initial_macs = state.get("initial_macs")
        self.last_ratio = state.get("last_ratio")
        self.criterion.load_state_dict(state.get("criterion", {}))


@torch.no_grad()
def check_forward(model: nn.Module, example_input: Any) -> None:
    """Run one eval-mode forward (train/eval mode restored) so a broken structure fails here, with context."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        forward(model, example_input)
    except Exception as error:  # re-raised with what happened
        raise RuntimeError(f"{type(model).__name__} no longer runs after channel pruning ({error}); protect the layer "
                           "involved with ignored_layers") from error
    finally:
        for module, training in modes.items():
            module.training = training


def prune(
    model: nn.Module,
    example_input: Any,
    criterion: str | Criterion = "magnitude",
    ratio: float = 0.5,
    *,
    macs_target: float | None = None,
    ignored_layers: Sequence[LayerSpec] | None = None,
    output_modules: Sequence[nn.Module] | None = None,
    round_to: int | None = None,
    layer_ratios: Mapping[str, float] | None = None,
    global_pruning: bool | None = None,
    max_layer_ratio: float = 0.9,
    group_norm: str = "keep_groups",
) -> tuple[nn.Module, PruningRecord]:
    """Remove channels from ``model`` in place; return it and the replayable :class:`PruningRecord`.

    Args:
        model: any traceable network (its output layers' output channels are kept).
        example_input: a tensor, tuple or dict that ``model`` accepts (shape matters, values do not).
        criterion: ``"magnitude"``/``"l1"``/``"l2"``, ``"bn_scale"``/``"slimming"``, ``"taylor"``,
            ``"filter_sketch"`` or a
            :class:`~lightning_effnets.pruning.importance.Criterion`.
        ratio: fraction of channels removed from every prunable group (of all prunable channels with
            ``global_pruning``), in [0, 1).
        macs_target: instead of ``ratio``, the fraction of MACs to keep, in (0, 1].
        ignored_layers: names / glob patterns (``"layer4.*"``), modules or types whose output channels stay.
        output_modules: layers defining the output (default: the last conv/linear layer); never narrowed.
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly widths); with
            ``group_norm="keep_group_size"`` multiples of ``lcm(round_to, group size)``.
        layer_ratios: ``{name or pattern: ratio}`` overrides per layer.
        global_pruning: rank all groups together (default: the criterion's preference; slimming is global).
        max_layer_ratio: in global mode, the largest fraction removed from any one group.
        group_norm: ``"keep_groups"`` (Torch-Pruning's convention: ``num_groups`` stays, every group loses
            channels evenly) or ``"keep_group_size"`` (whole GroupNorm groups are removed, ranked by the mean
            score of their channels; ``num_groups`` shrinks, channels per group stay; arXiv:1803.08494).
    """
    pruner = StructuredPruner(criterion, ratio, macs_target, ignored_layers, round_to, layer_ratios,
                              global_pruning, max_layer_ratio, group_norm)
    existing = get_record(model)
    if existing is not None and existing.steps:
        raise ValueError(f"{type(model).__name__} is already pruned ({len(existing.steps)} step(s)); ratios are "
                         "relative to the original width, so prune the original model once, or use the "
                         "ChannelPruning callback for iterative pruning")
    decisions = pruner.plan(model, example_input, 1.0, output_modules)
    pruner.apply(model, example_input, decisions, track=False)
    return model, get_record(model)  # type: ignore[return-value]
