"""BatchNormRecalibration: statistics recomputed exactly from training batches, pooled across DDP ranks."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.callbacks import BatchNormRecalibration
from lightning_effnets.layers import Adder2d


class _Tiny(pl.LightningModule):
    def __init__(self, adder: bool = False) -> None:
        super().__init__()
        conv = Adder2d(3, 4, 3) if adder else nn.Conv2d(3, 4, 3)
        self.model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4, 2))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader(n: int = 48, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, torch.randint(0, 2, (n,), generator=g)), batch_size=8, shuffle=False)


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_epochs=2)
    return pl.Trainer(**{**defaults, **kw})


def test_statistics_equal_the_average_over_the_first_training_batches():
    task, loader = _Tiny(), _loader()
    _trainer(callbacks=[BatchNormRecalibration(num_batches=3)]).fit(task, loader, _loader(16, seed=1))
    bn = task.model[1]
    # brute force with the final weights: the BN input of each of the first 3 batches, averaged batch by batch
    means, variances = [], []
    with torch.no_grad():
        for x, _ in list(loader)[:3]:
            h = task.model[0](x)
            means.append(h.mean((0, 2, 3)))
            variances.append(h.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0))
    assert bn.momentum == 0.1  # restored after recalibrating


def test_none_averages_over_the_whole_training_loader():
    """``num_batches=None`` ("precise BN"): with equal batches the mean is the exact mean over every training image."""
    task, loader = _Tiny(), _loader(n=40)
    _trainer(callbacks=[BatchNormRecalibration(num_batches=None)], max_epochs=1).fit(task, loader, _loader(16, seed=1))
    x = loader.dataset.tensors[0]
    with torch.no_grad():
        h = task.model[0](x)  # all 40 images at once, with the final weights
    torch.testing.assert_close(task.model[1].running_mean, h.mean((0, 2, 3)))
    # within limit_train_batches: the first 2 batches (16 images) of the unshuffled loader
    task = _Tiny()
    _trainer(callbacks=[BatchNormRecalibration(num_batches=None)], max_epochs=1,
             limit_train_batches=2).fit(task, loader, _loader(16, seed=1))
    with torch.no_grad():
        h = task.model[0](x[:16])
    torch.testing.assert_close(task.model[1].running_mean, h.mean((0, 2, 3)))


def test_adder_statistics_lag_and_the_shift_is_logged():
    """Adder outputs drift by many standard deviations per epoch: the logged shift shows how stale BN was."""
    task = _Tiny(adder=True)
    logged = {}

    class Spy(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    callback = BatchNormRecalibration(num_batches=2)
    _trainer(callbacks=[callback, Spy()], max_epochs=1).fit(task, _loader(), _loader(16, seed=1))
    assert callback.recalibrations == 1 and callback.state_dict() == {"recalibrations": 1}
    assert logged["effnets/bn_recalibration/mean_shift"] > 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="positive integer"):
        BatchNormRecalibration(num_batches=0)
    with pytest.raises(ValueError, match="whole training loader"):
        BatchNormRecalibration(num_batches=True)

    class NoBN(_Tiny):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

    with pytest.raises(ValueError, match="no BatchNorm layer"):
        _trainer(callbacks=[BatchNormRecalibration()]).fit(NoBN(), _loader(), _loader(16))


class _RankCheck(pl.Callback):
    """Inside each DDP worker: after recalibration both ranks hold the same (pooled) statistics."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        bn = pl_module.model[1]
        gathered = trainer.strategy.all_gather(torch.cat([bn.running_mean, bn.running_var]))
        assert torch.equal(gathered[0], gathered[1]), "BN statistics differ between ranks"


def test_ddp_ranks_pool_their_statistics():
    task = _Tiny()
    trainer = _trainer(strategy="ddp_spawn", devices=2, max_epochs=1,
                       callbacks=[BatchNormRecalibration(num_batches=2), _RankCheck()])
    trainer.fit(task, _loader(), _loader(16, seed=1))
