"""Channel importance criteria: which channels of a pruning group matter least.

A :class:`Criterion` scores the root channels of one :class:`~lightning_effnets.pruning.graph.PrunableGroup`
(higher = more important) and may observe training: :meth:`Criterion.on_before_optimizer_step` runs once per
optimizer step, after backward, gradient accumulation and DDP's all-reduce (so statistics and regularisers are
identical on every rank). That is enough for the seeds' criteria:

* ``"magnitude"`` / ``"l1"`` / ``"l2"``: norm of the weights a channel owns (Li et al., arXiv:1608.08710;
  group-level as in DepGraph, arXiv:2301.12900).
* ``"bn_scale"`` / ``"slimming"``: |gamma| of the channel's batch-norm scale (network slimming, arXiv:1708.06519),
  ranked globally by default. The L1 sparsity term ``gamma.grad += s*sign(gamma)`` is the callback's
  ``sparsity`` argument and works with any criterion.
* ``"taylor"``: first-order Taylor estimate of the loss change ``|sum_channel w * dL/dw|`` with the gradient
  averaged over the optimizer steps since the last pruning step (Molchanov et al., arXiv:1906.10771).

* ``"filter_sketch"``: FilterSketch (arXiv:2001.08514), in :mod:`lightning_effnets.pruning.sketch`: ranks by
  filter norm, then ``on_pruned`` (with the surgery's index maps) rewrites the surviving filters with a Frequent
  Directions sketch of the original ones.

Extending: a criterion that learns its scores during training, such as SCOP's knockoff factors
(arXiv:2010.10732), uses the same hooks (``setup`` to add what it trains, ``on_before_optimizer_step`` to observe
every step, ``score`` to read the learned factors, ``state_dict`` to resume). Register a new criterion with
:func:`register_criterion`.
"""

from __future__ import annotations

import abc

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_effnets.pruning.graph import ChannelItem, PrunableGroup
from lightning_effnets.pruning.layers import channel_rows, layer_kind
from lightning_effnets.pruning.surgery import ParamChange

__all__ = ["Criterion", "MagnitudeCriterion", "BNScaleCriterion", "TaylorCriterion", "register_criterion",
           "build_criterion", "available_criteria"]


class Criterion(abc.ABC):
    """Base class of importance criteria (see module docstring). Hooks default to doing nothing."""

    #: divide each group's scores by their mean before ranking groups against each other (global pruning);
    #: network slimming compares raw |gamma| across layers, so it sets this to False.
    normalize_globally: ClassVar[bool] = True
    #: whether the callback should rank all groups together by default (the paper's setting)
    prefers_global: ClassVar[bool] = False

    def setup(self, model: nn.Module) -> None:
        """Called once before training (and after every pruning step, with the pruned model)."""

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        """Called once per optimizer step with final gradients (after accumulation and all-reduce)."""

    #: whether :meth:`on_pruned` needs the old -> new parameter index maps of the surgery (costs one extra pass)
    needs_changes: ClassVar[bool] = False

    def on_pruned(self, model: nn.Module, changes: Mapping[nn.Parameter, ParamChange] | None = None) -> None:
        """Called after channels were removed: drop statistics tied to the old parameters. ``changes`` (old
        parameter -> :class:`~lightning_effnets.pruning.surgery.ParamChange`) is given when the surgery tracked
        index maps (always when :attr:`needs_changes`)."""

    def can_score(self, group: PrunableGroup) -> bool:
        """Whether this criterion can score ``group`` at all (e.g. slimming needs a normalisation layer)."""
        return any(layer_kind(item.module) in ("conv", "linear") for item in group.items)

    @abc.abstractmethod
    def score(self, group: PrunableGroup) -> Tensor | None:
        """Importance of each of the group's ``channels`` root channels (1-D float tensor), or None."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _accumulate(group: PrunableGroup, items: Sequence[ChannelItem],
                local: Callable[[ChannelItem], Tensor | None]) -> Tensor | None:
    """Mean over the group's layers of each layer's per-channel score, indexed by root channel."""
    total = torch.zeros(group.channels, dtype=torch.float64)
    count = torch.zeros(group.channels, dtype=torch.float64)
    for item in items:
        scores = local(item)
        if scores is None:
            continue
        root = torch.tensor(item.root_idxs, dtype=torch.long)
        total.index_add_(0, root, scores.detach().to("cpu", torch.float64))
        count.index_add_(0, root, torch.ones(len(root), dtype=torch.float64))
    if not bool((count > 0).any()):
        return None
    return (total / count.clamp(min=1)).float()


def _per_channel(item: ChannelItem, tensor: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor | None:
    """``reduce`` (rows -> one value per row) over the channel rows of ``tensor``, at the item's channels."""
    rows = channel_rows(item.module, item.is_out, tensor)
    if rows is None or not item.idxs or rows.shape[0] <= max(item.idxs):
        return None
    values = reduce(rows)
    if len(item.idxs) == values.numel() and item.idxs == tuple(range(values.numel())):
        return values
    return values[torch.tensor(item.idxs, dtype=torch.long, device=values.device)]


class MagnitudeCriterion(Criterion):
    """Norm of the weights each channel owns: ``sum |w|^p`` over the filter (and, with ``reduction="mean"``,
    the coupled input columns of consumer layers, averaged over the group's conv/linear layers).

    Args:
        p: 1 (L1, Li et al.) or 2 (L2).
        reduction: ``"mean"`` over every conv/linear layer of the group (group magnitude, DepGraph) or
            ``"first"``: the root layer's filters only (classic filter pruning).
    """

    def __init__(self, p: int = 1, reduction: Literal["mean", "first"] = "mean") -> None:
        if p not in (1, 2):
            raise ValueError(f"magnitude criterion p must be 1 or 2, got {p}")
        if reduction not in ("mean", "first"):
            raise ValueError(f"reduction must be 'mean' or 'first', got {reduction!r}")
        self.p, self.reduction = p, reduction

    @torch.no_grad()
    def score(self, group: PrunableGroup) -> Tensor | None:
        items = [i for i in group.items if layer_kind(i.module) in ("conv", "linear")]
        if self.reduction == "first":
            items = [i for i in items if i.name == group.root and i.is_out][:1]

        def norm(rows: Tensor) -> Tensor:
            return torch.linalg.vector_norm(rows, ord=self.p, dim=1).pow(self.p)

        def local(item: ChannelItem) -> Tensor | None:
            return _per_channel(item, item.module.weight, norm)

        return _accumulate(group, items, local)


class BNScaleCriterion(Criterion):
    """Network slimming (arXiv:1708.06519): a channel's importance is |gamma| of its normalisation layer(s)."""

    normalize_globally = False
    prefers_global = True

    def can_score(self, group: PrunableGroup) -> bool:
        return any(layer_kind(item.module) == "norm" for item in group.items)

    @torch.no_grad()
    def score(self, group: PrunableGroup) -> Tensor | None:
        items = [i for i in group.items if layer_kind(i.module) == "norm"]

        def local(item: ChannelItem) -> Tensor | None:
            return _per_channel(item, item.module.weight, lambda rows: torch.linalg.vector_norm(rows, ord=1, dim=1))

        return _accumulate(group, items, local)


class TaylorCriterion(Criterion):
    """First-order Taylor importance ``|sum_{w in channel} w * g|`` (Molchanov et al., arXiv:1906.10771).

    ``g`` is the gradient averaged over the optimizer steps observed since the last pruning step (call
    :meth:`accumulate` yourself outside a Trainer); without any observed step the current ``.grad`` is used.
    """

    def __init__(self) -> None:
        self._sums: dict[nn.Parameter, Tensor] = {}
        self._steps = 0
        self._model: nn.Module | None = None
        self._pending: dict[str, Tensor] = {}  # loaded from a checkpoint, matched to parameters by name

    def setup(self, model: nn.Module) -> None:
        self._model = model

    def _resolve(self) -> None:
        if self._pending and self._model is not None:
            params = dict(self._model.named_parameters())
            for name, value in self._pending.items():
                if name in params and params[name].shape == value.shape:
                    self._sums[params[name]] = value.to(params[name].device)
            self._pending = {}

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        """Add the current gradients of ``model`` to the running sums."""
        self._resolve()
        for p in model.parameters():
            if p.grad is None:
                continue
            if p in self._sums:
                self._sums[p].add_(p.grad)
            else:
                self._sums[p] = p.grad.detach().clone()
        self._steps += 1

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        self.accumulate(model)

    def on_pruned(self, model: nn.Module, changes: Mapping[nn.Parameter, ParamChange] | None = None) -> None:
        self._sums.clear()
        self._pending = {}
        self._steps = 0

    def state_dict(self) -> dict[str, Any]:
        """Gradient sums by parameter name, so a resumed run scores exactly like an uninterrupted one."""
        self._resolve()
        names = {p: n for n, p in self._model.named_parameters()} if self._model is not None else {}
        sums = {names[p]: v.detach().cpu() for p, v in self._sums.items() if p in names}
        return {"steps": self._steps, "sums": sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state.get("steps", 0))
        self._sums = {}
        self._pending = dict(state.get("sums", {}))

    @property
    def steps(self) -> int:
        """Optimizer steps accumulated since the last pruning step."""
        return self._steps

    def _gradient(self, p: nn.Parameter) -> Tensor | None:
        self._resolve()
        if p in self._sums:
            return self._sums[p] / max(self._steps, 1)
        return p.grad

    @torch.no_grad()
    def score(self, group: PrunableGroup) -> Tensor | None:
        items = [i for i in group.items if layer_kind(i.module) in ("conv", "linear", "norm")]

        def local(item: ChannelItem) -> Tensor | None:
            weight = item.module.weight
            grad = self._gradient(weight)
            if grad is None:
                return None
            return _per_channel(item, weight * grad, lambda rows: rows.sum(1).abs())

        scores = _accumulate(group, items, local)
        if scores is None and not any(self._gradient(i.module.weight) is not None for i in items):
            raise RuntimeError("the taylor criterion has no gradients to score with: prune after at least one "
                               "training epoch (ChannelPruning(start_epoch>=1)), or call backward (or "
                               "TaylorCriterion.accumulate(model)) before lightning_effnets.pruning.prune()")
        return scores


_CRITERIA: dict[str, Callable[..., Criterion]] = {}


def register_criterion(name: str, factory: Callable[..., Criterion]) -> None:
    """Make ``factory`` available as ``ChannelPruning(criterion=name)``."""
    _CRITERIA[name] = factory


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def build_criterion(criterion: str | Criterion, **kwargs: Any) -> Criterion:
    """A criterion from its name (see :func:`available_criteria`) or an instance (returned as is)."""
    if isinstance(criterion, Criterion):
        if kwargs:
            raise ValueError("criterion keyword arguments are only accepted together with a criterion name")
        return criterion
    if not isinstance(criterion, str) or criterion not in _CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; available: {', '.join(available_criteria())} "
                         "(or pass a lightning_effnets.pruning.Criterion instance)")
    return _CRITERIA[criterion](**kwargs)


register_criterion("magnitude", MagnitudeCriterion)
register_criterion("l1", lambda **kw: MagnitudeCriterion(p=1, **kw))
register_criterion("l2", lambda **kw: MagnitudeCriterion(p=2, **kw))
register_criterion("bn_scale", BNScaleCriterion)
register_criterion("slimming", BNScaleCriterion)
register_criterion("taylor", TaylorCriterion)
