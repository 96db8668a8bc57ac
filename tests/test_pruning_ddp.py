"""ChannelPruning under 2-process CPU DDP (ddp_fork, gloo): identical structure and weights on both ranks after
pruning *and* further training steps (the ranks see different data, so weights only stay equal if the pruned
model was re-wrapped and its gradients are synchronised). ``ddp_fork`` rather than ``ddp_spawn``: the workers
inherit the imported modules instead of importing torch and Lightning again (about 1.5 s instead of 45 s on two
cores); an assertion failing inside a worker fails the test either way."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.callbacks import ChannelPruning
from lightning_effnets.pruning import get_record, restore_on_load
from lightning_effnets.tasks.base import EffnetsTaskMixin


class DDPTask(EffnetsTaskMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        self.init_optimization(optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9), lr_schedule="constant")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        return loss + self.pop_auxiliary_loss(loss)


class CheckRanksAgree(pl.Callback):
    """Asserts inside every worker (a failure fails the spawn and so the test)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # right after the pruning step (ChannelPruning runs first)
            self.after_pruning = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_end(self, trainer, pl_module):
        record = get_record(pl_module.model).to_dict()
        records = [None, None]
        torch.distributed.all_gather_object(records, record)
        assert records[0] == records[1] and len(record["steps"]) == 1
        assert pl_module.model[0].out_channels == 8
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert gathered.shape[0] == 2
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=1e-6)
        for before, p in zip(self.after_pruning, pl_module.parameters()):
            assert not torch.equal(before, p.detach())  # training went on after the step


def test_ddp_ranks_prune_identically_and_stay_in_sync():
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ChannelPruning(criterion="l1", ratio=0.5, start_epoch=1, latency_repeats=0,
                                                   print_table=False), CheckRanksAgree()])
    task = DDPTask()
    restore_on_load(task.model)  # ddp_fork/ddp_spawn copy the workers' final (pruned) weights back into this module
    trainer.fit(task, DataLoader(data, batch_size=8, shuffle=True))
    assert task.model[0].out_channels == 8 and get_record(task.model).steps
