"""Keeping an optimizer consistent with a pruned model.

After surgery the optimizer's ``param_groups`` still reference the replaced parameters (so pruned layers would
silently stop training) and its per-parameter state (SGD momentum, Adam's ``exp_avg``/``exp_avg_sq``) has the old
shapes. :func:`remap_optimizer` swaps in the new parameters in place, keeping their position in their param group
(so learning-rate schedulers, which address groups by index, keep working), and slices every state tensor shaped
like the old parameter with the same index map as the weights. Scalars such as Adam's ``step`` are kept.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_effnets.pruning.surgery import ParamChange

__all__ = ["remap_optimizer"]


def remap_optimizer(optimizer: torch.optim.Optimizer, changes: Mapping[nn.Parameter, ParamChange]) -> int:
    """Replace pruned parameters (and slice their state) in ``optimizer``; returns how many were replaced."""
    replaced = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            change = changes.get(p)
            if change is None:
                continue
            params[i] = change.new
            replaced += 1
            state = optimizer.state.pop(p, None)
            if not state:
                continue
            new_state = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == change.old.shape and value.ndim > 0:
                    new_state[key] = change.slice(value)
                elif isinstance(value, torch.Tensor) and value.numel() > 1:
                    raise ValueError(f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} "
                                     f"for parameter {change.name!r} of shape {tuple(change.old.shape)}; channel "
                                     "pruning can only slice state shaped like its parameter (SGD, Adam, AdamW, "
                                     "RMSprop, ...)")
                else:
                    new_state[key] = value
            optimizer.state[change.new] = new_state
    return replaced
