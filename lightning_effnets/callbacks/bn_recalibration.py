"""Re-estimate batch-norm statistics from training batches before every validation.

BatchNorm's running statistics are an exponential average over past batches (momentum 0.1: about the last ten).
When the layer before a BN changes faster than that average follows, evaluation normalises with stale
statistics. Adder layers are the extreme case: their outputs are large negative distances (``-sum|x - w|``) with
a small spread, so a drift of the mean that is small in absolute terms is many standard deviations; mid-training
validation of an AdderNet then sits near chance although train-mode accuracy is high, and ``ModelCheckpoint``
picks its "best" epoch from noise. Binary networks and freshly pruned networks show the same effect, milder.

The fix is the one ``torch.optim.swa_utils.update_bn`` applies after weight averaging (and "precise BN" in
detection codebases): reset the statistics and recompute them as an exact average over a few training batches
in train mode, without gradients. Batches go through the task's ``predict_step`` (the forward contract every
task of this package has, also used by :class:`~lightning_effnets.callbacks.CameraBN`), so the callback works on
any task. Under DDP the per-rank statistics are pooled, so every rank evaluates (and checkpoints) the same
statistics. Camera BN layers are left alone: ``CameraBN`` re-estimates them per camera itself.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["BatchNormRecalibration", "batch_norm_layers"]


def batch_norm_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, layer)`` of every BatchNorm (1d/2d/3d, SyncBatchNorm) that tracks running statistics."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class BatchNormRecalibration(pl.Callback):
    """Recompute BN running statistics from ``num_batches`` training batches before each validation in ``fit``.

    Args:
        num_batches: training batches to average over (forward only, no gradients; fewer if the loader is
            shorter). About ``num_batches / len(train_loader)`` of an epoch's forward cost per validation.
            ``None`` uses the batches of one training epoch (the whole loader, within ``limit_train_batches``;
            "precise BN"): the model is then evaluated with an average over every training image instead of a
            random few batches, which matters when one test image is a visible fraction of a point.

    Logs ``effnets/bn_recalibration/mean_shift``: the mean over BN channels of ``|new - old running mean| /
    sqrt(new running var)``, i.e. how many standard deviations the stale statistics were off.
    """

    def __init__(self, num_batches: int | None = 10) -> None:
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError("BatchNormRecalibration(num_batches=...) must be a positive integer, or None for the "
                             f"whole training loader; got {num_batches!r}")
        self.num_batches = num_batches
        #: validations recalibrated so far (saved in checkpoints, for the record)
        self.recalibrations = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not batch_norm_layers(pl_module):
            raise ValueError(f"BatchNormRecalibration: {type(pl_module).__name__} has no BatchNorm layer with running "
                             "statistics to recalibrate; remove the callback")
        if not is_overridden("predict_step", pl_module):
            raise ValueError(f"BatchNormRecalibration forwards training batches through the task's "
                             f"predict_step(batch), which {type(pl_module).__name__} does not define")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(f"BatchNormRecalibration needs a single training DataLoader, got {type(loader).__name__}")
        limit = trainer.num_training_batches if self.num_batches is None else self.num_batches
        batches = loader if limit == float("inf") else islice(loader, int(limit))  # None: one training epoch
        shift = self.recalibrate(trainer, pl_module, batches)
        self.recalibrations += 1
        pl_module.log("effnets/bn_recalibration/mean_shift", shift, on_step=False, on_epoch=True, sync_dist=False)

    @torch.no_grad()
    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Any) -> float:
        """Reset the statistics, average them exactly over ``batches``, pool them across ranks; returns the shift."""
        layers = [m for _, m in batch_norm_layers(pl_module)]
        old = [m.running_mean.clone() for m in layers]  # type: ignore[union-attr]
        momenta = [m.momentum for m in layers]
        was_training = pl_module.training
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the exact mean over the batches seen
        pl_module.train()
        seen = 0
        try:
            for index, batch in enumerate(batches):
                batch = trainer.strategy.batch_to_device(batch)
                pl_module.predict_step(batch, index)
                seen += 1
        finally:
            for m, momentum in zip(layers, momenta):
                m.momentum = momentum
            pl_module.train(was_training)
        if seen == 0:
            raise ValueError("BatchNormRecalibration: the training loader yielded no batch")
        if trainer.world_size > 1:  # pool per-rank statistics: E[x] and E[x^2] average over equal batch counts
            for m in layers:
                mean = trainer.strategy.reduce(m.running_mean, reduce_op="mean")
                square = trainer.strategy.reduce(m.running_var + m.running_mean ** 2, reduce_op="mean")
                m.running_mean.copy_(mean)  # type: ignore[union-attr]
                m.running_var.copy_(square - mean ** 2)  # type: ignore[union-attr]
        shifts = [((m.running_mean - o).abs() / (m.running_var + m.eps).sqrt()).mean()  # type: ignore[operator]
                  for m, o in zip(layers, old)]
        return float(torch.stack(shifts).mean())

    def state_dict(self) -> dict[str, Any]:
        return {"recalibrations": self.recalibrations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recalibrations = int(state_dict.get("recalibrations", 0))
