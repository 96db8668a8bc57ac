"""Removing channels, and knowing afterwards where every surviving weight came from.

Torch-Pruning replaces each pruned parameter by a *new* ``nn.Parameter`` holding the surviving entries, which
is why a training loop around it breaks: the optimizer still holds the old tensors (and their momentum / Adam
moments). Surgery here is pure index selection, so :func:`apply_decisions` runs it on *index tensors*: every
parameter temporarily holds ``arange(numel)`` (float64, exact up to 2**53 entries), and afterwards each new
parameter's content is the flat position, in the old parameter, of each surviving entry. That mapping
(:class:`ParamChange`) restores the real values and slices any tensor shaped like the old parameter (gradients,
optimizer state) exactly as the weights were sliced, for every layer type and pruner, including chains such as
grouped convolutions or the project's own layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_effnets.pruning.planning import Decision

__all__ = ["ParamChange", "Surgery", "apply_decisions"]


@dataclass
class ParamChange:
    """``new`` replaced ``old``; ``index[j]`` is the flat position in ``old`` of flat entry ``j`` of ``new``."""

    name: str
    old: nn.Parameter
    new: nn.Parameter
    index: Tensor

    def slice(self, tensor: Tensor) -> Tensor:
        """``tensor`` (shaped like the old parameter) sliced the way the parameter was."""
        if tensor.shape != self.old.shape:
            raise ValueError(f"cannot slice a tensor of shape {tuple(tensor.shape)} like parameter {self.name!r} "
                             f"of shape {tuple(self.old.shape)}")
        return tensor.reshape(-1)[self.index.to(tensor.device)].view(self.new.shape)


_EXACT_FLOAT32 = 2**24  # float32 represents every integer up to this exactly


class _IndexTags:
    """Context manager: parameters hold their flat indices inside, real values are restored on exit.

    With ``track=False`` the real values are pruned directly (no index map; only requires_grad and parameter
    attributes are carried over), which is all a Trainer-free one-shot prune needs."""

    def __init__(self, model: nn.Module, track: bool = True) -> None:
        self.model = model
        self.track = track
        self.changes: dict[nn.Parameter, ParamChange] = {}

    def __enter__(self) -> _IndexTags:
        self.saved: list[tuple[list[str], nn.Parameter, Tensor, Tensor | None]] = []
        by_id: dict[int, int] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in by_id:
                self.saved[by_id[id(p)]][0].append(name)
                continue
            by_id[id(p)] = len(self.saved)
            self.saved.append(([name], p, p.data, p.grad))
        if self.track:
            with torch.no_grad():
                for _, p, data, _ in self.saved:
                    p.grad = None
                    dtype = torch.float32 if p.numel() <= _EXACT_FLOAT32 else torch.float64
                    p.data = torch.arange(p.numel(), dtype=dtype, device=data.device).view(data.shape)
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for names, old, data, grad in self.saved:
                replacements = {id(p): p for p in (self._get(n) for n in names) if p is not None and p is not old}
                if len(replacements) > 1:
                    raise RuntimeError(f"tied parameter {names} was replaced by different tensors during pruning")
                new = next(iter(replacements.values())) if replacements else None
                if not self.track:
                    if new is not None:
                        self._carry(old, new)
                    continue
                old.data = data
                old.grad = grad
                if new is None:
                    continue
                index = new.data.to(torch.long).reshape(-1)
                new.data = data.reshape(-1)[index].view(new.shape).clone()
                self._carry(old, new)
                new.grad = None if grad is None else grad.reshape(-1)[index].view(new.shape).clone()
                self.changes[old] = ParamChange(name=names[0], old=old, new=new, index=index)

    @staticmethod
    def _carry(old: nn.Parameter, new: nn.Parameter) -> None:
        new.requires_grad_(old.requires_grad)  # Torch-Pruning's new parameters always require grad
        for attr, value in vars(old).items():  # markers such as a binary layer's "is ±1" flag
            if not hasattr(new, attr):
                setattr(new, attr, value)

    def _get(self, name: str) -> nn.Parameter | None:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            return None


@dataclass
class Surgery:
    """What :func:`apply_decisions` did: replaced parameters, and the decisions actually applied."""

    changes: dict[nn.Parameter, ParamChange]
    applied: list[Decision]
    skipped: list[Decision]


def apply_decisions(model: nn.Module, graph: tp.DependencyGraph, decisions: Sequence[Decision],
                    skip_invalid: bool = False, track: bool = True) -> Surgery:
    """Remove the decided output channels of each root layer (and everything coupled to them), in order.

    ``graph`` must have been built on ``model``. A decision that would empty a coupled layer (possible when
    split/concat index mappings couple a group to a narrower layer) is skipped with ``skip_invalid``, as
    Torch-Pruning's own pruners do, and is an error otherwise (replaying a record must apply every step).
    ``track=False`` skips the index map (``Surgery.changes`` stays empty): for pruning without an optimizer.
    """
    names = {name: module for name, module in model.named_modules()}
    applied: list[Decision] = []
    skipped: list[Decision] = []
    if not decisions:
        return Surgery({}, applied, skipped)
    with _IndexTags(model, track) as tags:
        for root, idxs in decisions:
            if root not in names:
                raise KeyError(f"pruning decision names layer {root!r}, which {type(model).__name__} does not have")
            module = names[root]
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(idxs))
            if not graph.check_pruning_group(group):
                if skip_invalid:
                    skipped.append((root, list(idxs)))
                    continue
                raise RuntimeError(f"removing {len(idxs)} channels of {root!r} would remove every channel of a "
                                   "coupled layer")
            group.prune(record_history=False)
            applied.append((root, list(idxs)))
    return Surgery(tags.changes, applied, skipped)
