"""AdderConversion and AdaptiveAdderLR inside Trainer.fit: scaling, accumulation, checkpoints, DDP."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.callbacks import AdaptiveAdderLR, AdderConversion
from lightning_effnets.data import DigitsDataModule
from lightning_effnets.layers import Adder2d
from lightning_effnets.tasks import ImageClassifier


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


class TinyAdderNet(pl.LightningModule):
    """conv -> adder -> BN -> adder (with bias) -> BN -> pool -> linear; SGD with momentum and weight decay."""

    def __init__(self, convert: bool = True) -> None:
        super().__init__()
        conv = Adder2d if convert else nn.Conv2d
        self.model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            conv(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            conv(6, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class GradSpy(pl.Callback):
    """Records parameter gradients in on_before_optimizer_step (placed before/after AdaptiveAdderLR)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})


def test_adaptive_lr_scales_adder_weights_to_eta_sqrt_numel_and_nothing_else() -> None:
    module = TinyAdderNet()
    before, after = GradSpy(), GradSpy()
    _trainer(max_steps=3, callbacks=[before, AdaptiveAdderLR(eta=0.2), after]).fit(module, _loader())
    adder_weights = {"model.3.weight", "model.6.weight"}
    assert len(before.grads) == len(after.grads) == 3
    for pre, post in zip(before.grads, after.grads):
        for name, g in pre.items():
            if name in adder_weights:
                target = 0.2 * math.sqrt(g.numel())
                assert torch.linalg.vector_norm(post[name]).item() == pytest.approx(target, rel=1e-5)
                torch.testing.assert_close(post[name], g * (target / torch.linalg.vector_norm(g)))
            else:  # adder bias, first conv, BN, classifier: untouched
                torch.testing.assert_close(post[name], g, rtol=0, atol=0)


def test_adaptive_lr_normalises_the_accumulated_gradient_once() -> None:
    torch.manual_seed(1)
    module = TinyAdderNet()
    reference = copy.deepcopy(module)
    after = GradSpy()
    loader = _loader(n=16, batch_size=8)
    _trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[AdaptiveAdderLR(eta=0.3), after]).fit(module, loader)
    # Independent computation: the sum of both micro-batches' (mean-loss / 2) gradients, then normalised once.
    reference.train()
    for x, y in loader:
        (F.cross_entropy(reference(x), y) / 2).backward()
    for name in ("model.3.weight", "model.6.weight"):
        g = dict(reference.named_parameters())[name].grad
        expected = g * (0.3 * math.sqrt(g.numel()) / torch.linalg.vector_norm(g))
        torch.testing.assert_close(after.grads[0][name], expected, rtol=1e-4, atol=1e-6)


def test_adaptive_lr_logs_norms_and_rejects_models_without_adders() -> None:
    module = TinyAdderNet()
    logged = {}

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    _trainer(max_steps=1, callbacks=[AdaptiveAdderLR(), Capture()]).fit(module, _loader())
    assert {"effnets/adder/grad_norm/model.3", "effnets/adder/grad_norm/model.6"} <= set(logged)
    assert all(v > 0 for k, v in logged.items() if k.startswith("effnets/adder/grad_norm/"))
    with pytest.raises(ValueError, match="no Adder2d layers.*AdderConversion"):
        _trainer(max_steps=1, callbacks=[AdaptiveAdderLR()]).fit(TinyAdderNet(convert=False), _loader())
    with pytest.raises(ValueError, match="positive"):
        AdaptiveAdderLR(eta=0.0)


def test_conversion_checkpoint_round_trip(tmp_path) -> None:
    dm = DigitsDataModule(in_chans=1, image_size=16, batch_size=32)

    def task() -> ImageClassifier:
        return ImageClassifier(backbone="resnet10t", num_classes=10, in_chans=1, image_size=16, log_samples=0)

    first = task()
    conversion = AdderConversion()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    # AdaptiveAdderLR listed first: its check runs in on_fit_start, after AdderConversion's setup.
    trainer = _trainer(max_steps=2, limit_val_batches=1, enable_checkpointing=True,
                       callbacks=[AdaptiveAdderLR(), conversion, ckpt])
    trainer.fit(first, datamodule=dm)
    adders = [n for n, m in first.model.named_modules() if isinstance(m, Adder2d)]
    assert adders == conversion.record["converted"] and len(adders) == 13
    assert isinstance(first.model.conv1[0], nn.Conv2d)  # the stem stays multiplicative
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)

    # Resume: a fresh (unconverted) task; the callback converts in setup, then Lightning restores the weights.
    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            state = pl_module.state_dict()
            seen["equal"] = all(torch.equal(state[k], v) for k, v in saved["state_dict"].items())
            seen["adders"] = [n for n, m in pl_module.model.named_modules() if isinstance(m, Adder2d)]

    resumed = task()
    trainer2 = _trainer(max_steps=4, limit_val_batches=1, callbacks=[AdderConversion(), AdaptiveAdderLR(), Spy()])
    trainer2.fit(resumed, datamodule=dm, ckpt_path=tmp_path / "last.ckpt")
    assert seen == {"equal": True, "adders": adders}
    assert trainer2.global_step == 4

    # Outside the Trainer: the documented one-liner rebuilds the structure and loads strictly.
    loaded = AdderConversion.load_from_checkpoint(ImageClassifier, tmp_path / "last.ckpt")
    assert [n for n, m in loaded.model.named_modules() if isinstance(m, Adder2d)] == adders
    loaded.eval(), first.eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(loaded.model(x), first.model(x))
    # ... and so does plain Lightning loading, from the checkpoint alone (EffnetsTaskMixin.on_load_checkpoint)
    plain = ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt").eval()
    assert [n for n, m in plain.model.named_modules() if isinstance(m, Adder2d)] == adders
    torch.testing.assert_close(plain.model(x), first.model(x))

    # Resuming with a different conversion is refused with the reason.
    with pytest.raises(ValueError, match="converted differently"):
        _trainer(max_steps=4, callbacks=[AdderConversion(exclude="layer4.*")]).fit(
            task(), datamodule=dm, ckpt_path=tmp_path / "last.ckpt")


class SameWeightsOnEveryRank(pl.Callback):
    """Runs inside each DDP worker: adder gradients are scaled after all-reduce, so ranks never drift apart."""

    def on_train_start(self, trainer, pl_module):
        self.initial = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for m in pl_module.modules():
            if isinstance(m, Adder2d):
                norm = torch.linalg.vector_norm(m.weight.grad).item()
                assert norm == pytest.approx(0.2 * math.sqrt(m.weight.numel()), rel=1e-5)

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1]), "weights differ between ranks"
        assert not torch.equal(flat, self.initial)


def test_ddp_two_processes_keep_identical_weights() -> None:
    torch.manual_seed(0)
    module = TinyAdderNet()
    # Each rank sees different batches (DistributedSampler), so only the all-reduced gradient is shared.
    trainer = _trainer(max_steps=3, strategy="ddp_spawn", devices=2, accumulate_grad_batches=2,
                       callbacks=[AdaptiveAdderLR(), SameWeightsOnEveryRank()])
    trainer.fit(module, _loader(n=64, batch_size=4))


def test_adder_recipe_runs(tmp_path, monkeypatch) -> None:
    from lightning_effnets.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "classification/adder", "--trainer.fast_dev_run=true",
                "--model.init_args.backbone=resnet10t"])
    assert cli.trainer.global_step == 1
    converted = [n for n, m in cli.model.model.named_modules() if isinstance(m, Adder2d)]
    assert len(converted) == 13 and isinstance(cli.model.model.conv1[0], nn.Conv2d)


def test_lr_scale_multiplies_the_task_learning_rate_on_adder_weights_only() -> None:
    """One Adam step moves each element by ~lr; adder weights must move lr_scale times as far, nothing else."""
    import functools

    task = ImageClassifier(backbone="resnet10t", num_classes=10, in_chans=1, image_size=16, log_samples=0,
                           optimizer=functools.partial(torch.optim.Adam, lr=1e-3), lr_schedule="constant")
    conversion = AdderConversion(lr_scale=10.0)
    conversion.setup(None, task, "fit")  # type: ignore[arg-type]
    optimizer = task.configure_optimizers()
    adder_ids = {id(m.weight) for m in task.modules() if isinstance(m, Adder2d)}
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lrs) == sum(1 for p in task.parameters() if p.requires_grad)  # every parameter, once
    assert adder_ids and all(lrs[i] == pytest.approx(1e-2) for i in adder_ids)
    assert all(lr == pytest.approx(1e-3) for i, lr in lrs.items() if i not in adder_ids)
    before = {id(p): p.detach().clone() for p in task.parameters()}
    task(torch.randn(4, 1, 16, 16)).logsumexp(1).mean().backward()
    optimizer.step()
    for p in task.parameters():  # Adam's first step is lr * sign(grad) (up to eps) wherever grad != 0
        if p.grad is None or not p.grad.abs().gt(1e-6).any():
            continue
        moved = (p.detach() - before[id(p)]).abs()[p.grad.abs() > 1e-6]
        expected = 1e-2 if id(p) in adder_ids else 1e-3
        torch.testing.assert_close(moved.max().item(), expected, rtol=1e-2, atol=0)  # eps: |g| >> 1e-8
    with pytest.raises(ValueError, match="lr_scale"):
        AdderConversion(lr_scale=0)
