"""Binarization + BopOptimizer inside Lightning: training, exactness of the real optimizer, resume, errors, DDP."""

import functools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from helpers import read_wandb_history
from lightning.pytorch.loggers import WandbLogger

from lightning_effnets.callbacks import Binarization, BopOptimizer
from lightning_effnets.layers import binary_parameters
from lightning_effnets.optim import HybridOptimizer
from lightning_effnets.tasks import ImageClassifier

TINY = dict(channels=(8, 8, 8, 8), stem_width=8, zero_init_last=False)


def _task(**kw):
    defaults = dict(backbone="resnet10t", num_classes=10, in_chans=1, image_size=8, log_samples=0,
                    backbone_kwargs=TINY, optimizer=functools.partial(torch.optim.Adam, lr=0.01),
                    lr_schedule="constant")
    defaults.update(kw)
    return ImageClassifier(**defaults)


def _loader(n=128, batch_size=32):
    digits = load_digits()
    x = torch.from_numpy(digits.images[:n].astype(np.float32) / 16.0).unsqueeze(1)
    return DataLoader(TensorDataset(x, torch.from_numpy(digits.target[:n]).long()), batch_size=batch_size)


def _trainer(**kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=1, log_every_n_steps=1)
    defaults.update(kw)
    return pl.Trainer(**defaults)


class _Recorder(pl.Callback):
    """Checks after every step that binary weights are ±1; records learning rates and the initial weights."""

    def __init__(self):
        self.lrs, self.initial = [], None

    def on_train_start(self, trainer, pl_module):
        self.initial = [p.detach().clone() for p in binary_parameters(pl_module)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for p in binary_parameters(pl_module):
            assert set(p.unique().tolist()) <= {-1.0, 1.0}


def test_training_keeps_weights_binary_logs_flips_and_keeps_the_task_scheduler(tmp_path):
    pl.seed_everything(0)
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    task = _task(optimizer=None, scheduler=scheduler)  # the task's default AdamW with weight decay
    recorder = _Recorder()
    logger = WandbLogger(project="effnets-test", offline=True, save_dir=str(tmp_path))
    trainer = _trainer(max_epochs=2, logger=logger, log_every_n_steps=2,
                       callbacks=[Binarization(), BopOptimizer(gamma=1e-2, threshold=1e-6), recorder])
    trainer.fit(task, _loader())
    hybrid = trainer.optimizers[0]
    assert isinstance(hybrid, HybridOptimizer) and isinstance(hybrid.real, torch.optim.AdamW)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is hybrid.real  # the task's own optimizer
    assert recorder.lrs == [1e-3] * 4 + [5e-4] * 4  # StepLR still halves the task's learning rate
    binary_ids = {id(p) for p in binary_parameters(task)}
    assert not any(id(p) in binary_ids for g in hybrid.real.param_groups for p in g["params"])  # no weight decay
    flipped = sum(int((a != b).sum()) for a, b in zip(recorder.initial, binary_parameters(task)))
    assert flipped > 0
    history = read_wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))
    ratios = history["effnets/bop/flip_ratio"]
    assert len(ratios) == 4 and all(0 < r < 1 for r in ratios)  # logged on every 2nd of 8 steps
    assert history["effnets/bop/gamma"] == pytest.approx([1e-2] * 4)
    assert history["effnets/binary/converted_layers"] == [14]


class _FreezeBinary(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        for p in binary_parameters(pl_module):
            p.requires_grad_(False)


def test_real_parameters_follow_the_real_optimizer_exactly_as_if_alone():
    def run(callbacks):
        pl.seed_everything(0)
        task = _task(optimizer=None)  # AdamW(weight_decay=0.05): binary weights must not be decayed either
        _trainer(max_steps=3, callbacks=[Binarization(), *callbacks]).fit(task, _loader())
        return task

    with_bop = run([BopOptimizer(threshold=1e9)])  # Bop never flips: the binary weights are constant
    alone = run([_FreezeBinary()])  # AdamW alone on the real parameters, binary weights frozen
    for (name, a), (_, b) in zip(with_bop.named_parameters(), alone.named_parameters()):
        assert torch.equal(a, b), name


def test_resume_from_checkpoint_continues_bit_identically(tmp_path):
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)

    def callbacks():
        return [Binarization(scale=True), BopOptimizer(gamma=1e-2, threshold=1e-5)]

    pl.seed_everything(0)
    full = _task(scheduler=scheduler)
    _trainer(max_epochs=2, callbacks=callbacks()).fit(full, _loader())

    pl.seed_everything(0)
    first = _task(scheduler=scheduler)
    trainer = _trainer(max_epochs=1, callbacks=callbacks())
    trainer.fit(first, _loader())
    halfway = [p.detach().clone() for p in binary_parameters(first)]
    trainer.save_checkpoint(tmp_path / "half.ckpt")

    pl.seed_everything(1)  # a different init: everything must come from the checkpoint
    resumed = _task(scheduler=scheduler)
    _trainer(max_epochs=2, callbacks=callbacks()).fit(resumed, _loader(), ckpt_path=tmp_path / "half.ckpt")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(halfway, binary_parameters(resumed)))  # epoch 2 flipped

    # outside the Trainer: rebuild the binary structure from the checkpoint, then load the weights
    checkpoint = torch.load(tmp_path / "half.ckpt", weights_only=False)
    fresh = _task()
    Binarization.restore(fresh.model, checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    x = next(iter(_loader()))[0]
    assert torch.equal(fresh.eval()(x), first.eval()(x))
    # plain Lightning loading does the same from the checkpoint alone (EffnetsTaskMixin.on_load_checkpoint)
    plain = ImageClassifier.load_from_checkpoint(tmp_path / "half.ckpt")
    assert torch.equal(plain.eval()(x), first.eval()(x))


class _PartialOptimizer(ImageClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.ndim > 1], lr=0.01)  # forgets BN/bias


@pytest.mark.parametrize("case, match", [
    ("no_binary", r"no binary \(±1\) parameters.*Binarization"),
    ("latent", r"latent real weights"),
    ("claimed_twice", r"claimed by two optimizers"),
    ("claimed_by_none", r"claimed by no optimizer: model\.conv1\.1\.weight"),
    ("replaced_with_scheduler", r"scheduler \(StepLR\) is bound to it"),
])
def test_bad_set_ups_fail_at_fit_start_with_the_fix(case, match):
    task = _task()
    callbacks = [Binarization(), BopOptimizer()]
    if case == "no_binary":
        callbacks = [BopOptimizer()]
    elif case == "latent":
        callbacks = [Binarization(latent=True), BopOptimizer()]
    elif case == "claimed_twice":
        callbacks = [Binarization(), BopOptimizer(real_optimizer=lambda params: torch.optim.Adam(task.parameters()))]
    elif case == "claimed_by_none":
        task = _PartialOptimizer(backbone="resnet10t", num_classes=10, in_chans=1, image_size=8, log_samples=0,
                                 backbone_kwargs=TINY)
    elif case == "replaced_with_scheduler":
        task = _task(scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1))
        callbacks = [Binarization(), BopOptimizer(real_optimizer=functools.partial(torch.optim.SGD, lr=0.1))]
    with pytest.raises(ValueError, match=match):
        _trainer(max_steps=1, callbacks=callbacks).fit(task, _loader())


def test_option_errors_and_missing_model():
    with pytest.raises(ValueError, match="latent=True"):
        Binarization(balanced=True)
    with pytest.raises(ValueError, match="activation"):
        Binarization(activation="sigmoid")
    with pytest.raises(ValueError, match="gamma"):
        BopOptimizer(gamma=0)

    class NoModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0].flatten(1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match=r"\.model"):
        _trainer(max_steps=1, callbacks=[Binarization()]).fit(NoModel(), _loader())


def test_binarization_keeps_every_output_head_real_and_converts_once():
    task = _task()
    task.output_modules = lambda: [task.model.fc, task.model.layer4[0].conv2]  # e.g. a second head
    callback = Binarization()
    callback.setup(None, task, "fit")
    assert type(task.model.layer4[0].conv2) is torch.nn.Conv2d and type(task.model.fc) is torch.nn.Linear
    assert callback.record["kept"]["layer4.0.conv2"] == "excluded"
    record = dict(callback.record)
    callback.setup(None, task, "test")  # a second stage does not convert again
    assert callback.record == record
    with pytest.raises(ValueError, match="converted differently"):
        callback.load_state_dict({**record, "converted": record["converted"][:-1]})


def test_recipe_parses_and_trains_through_the_cli(tmp_path, monkeypatch):
    from lightning_effnets.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "classification/binary_bop", "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.max_epochs=1",
                "--trainer.log_every_n_steps=1", "--model.init_args.backbone=resnet10t",
                "--data.init_args.image_size=16", "--model.init_args.image_size=16"])
    assert cli.trainer.global_step == 2
    hybrid = cli.trainer.optimizers[0]
    assert isinstance(hybrid, HybridOptimizer) and type(hybrid.real) is torch.optim.Adam
    assert hybrid.binary.param_groups[0]["gamma"] == 1e-3 and hybrid.binary.param_groups[0]["threshold"] == 1e-6
    history = read_wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))
    assert len(history["effnets/bop/flip_ratio"]) == 2 and history["effnets/cost/start/binary_ops"][0] > 0


class _SameWeightsOnAllRanks(pl.Callback):
    """Runs in every DDP worker: binary weights must be identical across ranks, and must have moved."""

    def on_train_start(self, trainer, pl_module):
        self.initial = torch.cat([p.detach().flatten() for p in binary_parameters(pl_module)])

    def on_train_end(self, trainer, pl_module):
        final = torch.cat([p.detach().flatten() for p in binary_parameters(pl_module)])
        gathered = trainer.strategy.all_gather(final)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1]), "binary weights differ between ranks"
        assert not torch.equal(final, self.initial), "Bop flipped nothing"
        assert set(final.unique().tolist()) <= {-1.0, 1.0}


def test_ddp_two_processes_end_with_identical_binary_weights():
    pl.seed_everything(0)
    task = _task()
    trainer = _trainer(devices=2, strategy="ddp_spawn", max_steps=3,
                       callbacks=[Binarization(), BopOptimizer(gamma=1e-2, threshold=1e-6), _SameWeightsOnAllRanks()])
    trainer.fit(task, _loader(n=192))
    assert trainer.state.finished
