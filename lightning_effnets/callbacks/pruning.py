"""``ChannelPruning``: structural channel pruning inside ``Trainer.fit`` that really removes channels.

Masks (``torch.nn.utils.prune``, Lightning's ``ModelPruning``) make nothing faster; Torch-Pruning removes
channels but breaks the loop around it (the optimizer keeps the old tensors, checkpoints no longer load). This
callback removes channels with Torch-Pruning's dependency graph at the start of scheduled epochs and keeps
training correct afterwards:

* the optimizer holds the new parameters, and momentum / Adam moments are sliced like the weights;
* under DDP every rank applies rank 0's decisions, and the model is re-wrapped (DDP only synchronises the
  parameters that existed when it was wrapped);
* the pruned structure is recorded: ``Trainer.fit(ckpt_path=...)`` resumes mid-schedule, and
  ``TaskClass.load_from_checkpoint(path)`` / ``Trainer.test(ckpt_path=...)`` rebuild it in a fresh task module
  (``lightning_effnets.pruning.load_pruned(ModuleClass, path)`` for LightningModules outside this project);
* MACs, parameters and measured latency before/after each step go to the loggers and to a rich table.

Under ``ddp_spawn``/``ddp_fork`` Lightning copies the final weights back into the main process's module, which
the callback never sees: call ``lightning_effnets.pruning.restore_on_load(task.model)`` before ``fit`` there.

Network slimming (arXiv:1708.06519): ``sparsity=s`` adds ``s * sign(gamma)`` to the gradient of every BN-like
scale of a prunable group once per optimizer step (after accumulation and all-reduce) until the last pruning
step; use it with ``criterion="bn_scale"``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_effnets.cost import profile
from lightning_effnets.pruning.importance import Criterion
from lightning_effnets.pruning.layers import layer_kind
from lightning_effnets.pruning.optim import remap_optimizer
from lightning_effnets.pruning.pruner import LayerSpec, StructuredPruner, default_output_modules
from lightning_effnets.pruning.record import PruningRecord, get_record, restore_on_load
from lightning_effnets.pruning.schedule import PruningSchedule

__all__ = ["ChannelPruning"]


class ChannelPruning(pl.Callback):
    """Remove channels of ``pl_module.model`` on a schedule and keep training correct (see module docstring).

    Args:
        criterion: ``"magnitude"`` (L1, also ``"l1"``/``"l2"``), ``"bn_scale"``/``"slimming"``, ``"taylor"``,
            ``"filter_sketch"`` (FilterSketch, arXiv:2001.08514), or a
            :class:`~lightning_effnets.pruning.Criterion` instance.
        ratio: fraction of channels removed from every prunable group by the end of the schedule, in [0, 1)
            (of all prunable channels with ``global_pruning``).
        macs_target: alternative to ``ratio``: the fraction of the original MACs to keep, in (0, 1]; the ratio is
            found by bisection at every step.
        start_epoch: epoch at whose start the (first) pruning step happens.
        end_epoch: epoch of the last step when ``steps > 1`` (steps evenly spaced in [start_epoch, end_epoch]).
        steps: number of pruning steps; step ``k`` reaches ``k/steps`` of the target.
        ignored_layers: names or glob patterns relative to ``pl_module.model`` (``"layer4.*"``), whose output
            channels are kept. The task's ``output_modules()`` are always kept.
        round_to: keep channel counts multiples of ``round_to``.
        sparsity: network-slimming L1 strength ``s`` on BN scales (1e-4 VGG, 1e-5 ResNet in the paper); 0 = off.
        layer_ratios: ``{name or pattern: ratio}`` overrides.
        global_pruning: rank all groups together (default: True for slimming, False otherwise).
        max_layer_ratio: largest fraction removed from one group in global mode / MACs search.
        group_norm: how GroupNorm layers (arXiv:1803.08494) are pruned. ``"keep_groups"`` (default, Torch-Pruning's
            convention): ``num_groups`` stays and channels leave every group evenly, so groups get smaller
            (GroupNorm(32, 64) halved is GroupNorm(32, 32), i.e. instance norm). ``"keep_group_size"``: whole groups
            of ``C/num_groups`` contiguous channels are ranked (mean score of their channels) and removed, so
            ``num_groups`` shrinks and each channel keeps the statistics it was trained with (GroupNorm(16, 32));
            widths become multiples of ``lcm(round_to, group size)``.
        latency_repeats: forwards timed for the before/after latency (0 = do not measure).
        print_table: print a rich table after every step (rank 0).
    """

    def __init__(
        self,
        criterion: str | Criterion = "magnitude",
        ratio: float = 0.5,
        macs_target: float | None = None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        steps: int = 1,
        ignored_layers: Sequence[str] | None = None,
        round_to: int | None = None,
        sparsity: float = 0.0,
        layer_ratios: Mapping[str, float] | None = None,
        global_pruning: bool | None = None,
        max_layer_ratio: float = 0.9,
        group_norm: str = "keep_groups",
        latency_repeats: int = 10,
        print_table: bool = True,
    ) -> None:
        self.pruner = StructuredPruner(criterion, ratio, macs_target, ignored_layers, round_to, layer_ratios,
                                       global_pruning, max_layer_ratio, group_norm)
        self.schedule = PruningSchedule(start_epoch, end_epoch, steps)
        if not isinstance(sparsity, (int, float)) or sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {sparsity!r}")
        if latency_repeats < 0:
            raise ValueError(f"latency_repeats must be >= 0, got {latency_repeats}")
        self.sparsity = float(sparsity)
        self.latency_repeats = latency_repeats
        self.print_table = print_table
        self.done = 0  # pruning steps applied
        self.history: list[dict[str, float]] = []  # figures after each step
        self.initial: dict[str, float] = {}  # figures before the first step
        self._model: nn.Module | None = None
        self._scales: list[nn.Module] = []  # BN-like layers that slimming regularises

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ratio=self.pruner.ratio, macs_target=self.pruner.macs_target,
                                        steps=self.schedule.steps)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _network(pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"ChannelPruning prunes the task's network in {type(pl_module).__name__}.model, which "
                             "is missing (see lightning_effnets.tasks.base.EffnetsTaskMixin)")
        return model

    @staticmethod
    def _example(pl_module: pl.LightningModule, model: nn.Module) -> Any:
        example = pl_module.example_input_array
        if example is None:
            raise ValueError(f"ChannelPruning traces the model with {type(pl_module).__name__}.example_input_array; "
                             "set it in the task's __init__")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return move_data_to_device(example, device)

    @staticmethod
    def _outputs(pl_module: pl.LightningModule, model: nn.Module) -> list[nn.Module]:
        outputs = getattr(pl_module, "output_modules", None)
        return list(outputs()) if callable(outputs) else default_output_modules(model)

    @property
    def finished(self) -> bool:
        return self.done >= self.schedule.steps

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = self._network(pl_module)
        self._model = model
        example = self._example(pl_module, model)
        restore_on_load(model)  # a checkpoint's pruned structure is re-applied before its weights load
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(f"ChannelPruning supports single-device and DDP strategies, not "
                             f"{type(trainer.strategy).__name__} (sharded strategies own the parameters)")
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.schedule.last_epoch >= max_epochs and not self.finished:
            raise ValueError(f"ChannelPruning's last step is at epoch {self.schedule.last_epoch} but the Trainer stops "
                             f"after max_epochs={max_epochs}; lower start_epoch/end_epoch or raise max_epochs")
        groups = self.pruner.check(model, example, self._outputs(pl_module, model))
        self._scales = list({id(i.module): i.module for g in groups for i in g.items
                             if layer_kind(i.module) == "norm"}.values())
        if self.sparsity > 0 and not self._scales:
            raise ValueError("sparsity > 0 (network slimming) needs BatchNorm-like layers in prunable groups; "
                             f"{type(model).__name__} has none")
        self.pruner.criterion.setup(model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.initial:
            self.initial = self._figures(pl_module)

    # ------------------------------------------------------------------ training-time behaviour
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.finished:
            return
        if self.sparsity > 0:
            optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
            with torch.no_grad():
                for module in self._scales:
                    gamma = module.weight
                    if id(gamma) not in optimized:
                        continue
                    penalty = torch.sign(gamma) * self.sparsity
                    if gamma.grad is None:
                        gamma.grad = penalty
                    else:
                        gamma.grad.add_(penalty)
        if trainer.optimizers and optimizer is trainer.optimizers[0]:
            self.pruner.criterion.on_before_optimizer_step(self._network(pl_module))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        while self.done < self.schedule.steps_due(trainer.current_epoch):
            self._step(trainer, pl_module)

    # ------------------------------------------------------------------ one pruning step
    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._network(pl_module)
        example = self._example(pl_module, model)
        start = time.perf_counter()
        decisions = self.pruner.plan(model, example, self.schedule.fraction(self.done + 1),
                                     self._outputs(pl_module, model))
        decisions = trainer.strategy.broadcast(decisions, src=0)  # identical on every rank
        surgery = self.pruner.apply(model, example, decisions)
        changes = surgery.changes
        for optimizer in trainer.optimizers:
            remap_optimizer(optimizer, changes)
        replaced = {id(c.old): c.name for c in changes.values()}
        stale = [replaced[id(p)] for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
                 if id(p) in replaced]
        if stale:
            raise RuntimeError(f"optimizer still holds pruned-away parameters {stale[:5]}")
        self._rewrap_ddp(trainer, pl_module)
        self.pruner.criterion.setup(model)
        seconds = time.perf_counter() - start
        self.done += 1
        figures = self._figures(pl_module)
        figures.update(step=float(self.done), seconds=seconds, ratio=float(self.pruner.last_ratio or 0.0),
                       removed_channels=float(sum(len(idxs) for _, idxs in surgery.applied)))
        self.history.append(figures)
        self._log(pl_module, figures)
        if self.print_table:
            self._print(figures, trainer.current_epoch)

    @staticmethod
    def _rewrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """DDP registered its gradient hooks on the old parameters: wrap the pruned module again."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = pl_module
            strategy.configure_ddp()
            strategy.model.train(pl_module.training)

    # ------------------------------------------------------------------ reporting
    def _figures(self, pl_module: pl.LightningModule) -> dict[str, float]:
        model = self._network(pl_module)
        report = profile(model, self._example(pl_module, model), latency_repeats=max(self.latency_repeats, 1),
                         measure_latency=self.latency_repeats > 0)
        return {"macs": float(report.macs), "params": float(report.params), "latency_ms": float(report.latency_ms)}

    def _log(self, pl_module: pl.LightningModule, figures: dict[str, float]) -> None:
        metrics = dict(figures)
        for key in ("macs", "params", "latency_ms"):
            before = self.initial.get(key, float("nan"))
            if before == before and before > 0 and figures[key] == figures[key]:
                metrics[f"{key}_ratio"] = figures[key] / before
        metrics = {f"effnets/pruning/{k}": v for k, v in metrics.items() if v == v}
        if pl_module._trainer is not None:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    @rank_zero_only
    def _print(self, figures: dict[str, float], epoch: int) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"channel pruning step {self.done}/{self.schedule.steps} (epoch {epoch}, "
                            f"{figures['removed_channels']:.0f} channels removed in {figures['seconds']:.2f}s)")
        for column, justify in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for key, label, scale in (("macs", "MACs [M]", 1e-6), ("params", "params [M]", 1e-6),
                                  ("latency_ms", "latency [ms]", 1.0)):
            before, after = self.initial.get(key, float("nan")), figures[key]
            ratio = after / before if before == before and before > 0 else float("nan")
            table.add_row(label, f"{before * scale:,.3f}", f"{after * scale:,.3f}", f"{ratio:.3f}")
        Console().print(table)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        record = get_record(self._model) if self._model is not None else None
        return {"done": self.done, "history": [dict(h) for h in self.history], "initial": dict(self.initial),
                "pruner": self.pruner.state_dict(),
                "record": record.to_dict() if record is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = int(state_dict.get("done", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.initial = dict(state_dict.get("initial", {}))
        self.pruner.load_state_dict(state_dict.get("pruner", {}))
        saved = state_dict.get("record")
        if self._model is not None and saved is not None:
            current = get_record(self._model)
            if (current.steps if current is not None else []) != PruningRecord.from_dict(saved).steps:
                raise RuntimeError("ChannelPruning: the model's pruned structure does not match the checkpoint's "
                                   "record; was the model's state dict loaded without its pruning metadata?")
