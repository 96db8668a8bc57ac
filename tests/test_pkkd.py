"""PKKD (arXiv:2009.13044): kernels against brute force, the callback inside Trainer.fit (joint teacher training,
clean checkpoints, exact resume, DDP), bad-input errors and the recipes through the CLI."""

from __future__ import annotations

import copy
import math
from functools import partial

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.callbacks import AdderConversion, ProgressiveKernelDistillation
from lightning_effnets.convert import to_adder
from lightning_effnets.distill import (KernelFeatureLoss, adder_units, cnn_twin, gaussian_kernel, laplace_kernel,
                                       progressive_weight, soft_logit_loss)
from lightning_effnets.layers import Adder2d, PowerActivation, SelfShortcut, adder2d
from lightning_effnets.tasks.base import EffnetsTaskMixin


# ----------------------------------------------------------------------------------------------- kernels
def _patches(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, groups: int) -> Tensor:
    """(N, groups, K, L) input patches, the brute-force view of a convolution."""
    cols = F.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    return cols.view(x.shape[0], groups, -1, cols.shape[-1])


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 2), (2, 1, 1, 3)])
def test_gaussian_kernel_via_convolutions_equals_brute_force(stride, padding, dilation, groups) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 6 // groups, 3, 3, generator=g, dtype=torch.float64) * 0.5
    sigma = 2.5
    got = gaussian_kernel(x, weight, sigma, stride, padding, dilation, groups)
    cols = _patches(x, weight, stride, padding, dilation, groups)  # (N, G, K, L)
    w = weight.view(groups, 6 // groups, -1)  # (G, Og, K)
    sq = ((cols[:, :, None] - w[None, :, :, :, None]) ** 2).sum(3)  # (N, G, Og, L)
    expected = torch.exp(-sq / (2 * sigma**2)).reshape(2, 6, *got.shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the shortcut through a precomputed conv output gives the same
    conv = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    torch.testing.assert_close(gaussian_kernel(x, weight, sigma, stride, padding, dilation, groups, conv_out=conv),
                               expected, rtol=1e-9, atol=1e-12)


def test_laplace_kernel_is_exp_of_the_adder_output_and_the_l1_distance() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    sigma = 30.0
    out = adder2d(x, weight, stride=1, padding=1)
    got = laplace_kernel(out, sigma)
    torch.testing.assert_close(got, torch.exp(out / sigma))
    cols = _patches(x, weight, 1, 1, 1, 1)[:, 0]  # (N, K, L)
    l1 = (cols[:, None] - weight.view(1, 5, -1, 1)).abs().sum(2)  # (N, O, L)
    torch.testing.assert_close(got, torch.exp(-l1 / sigma).view_as(got), rtol=1e-9, atol=1e-12)


def test_soft_logit_loss_matches_kl_times_t_squared_and_vanishes_on_equal_logits() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    expected = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean") * 9
    torch.testing.assert_close(soft_logit_loss(s, t, 3.0), expected)
    assert soft_logit_loss(t, t, 3.0).abs().item() < 1e-6


def test_kernel_feature_loss_starts_as_plain_l2_and_progressive_weight_ramps() -> None:
    a, b = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(KernelFeatureLoss(3, 3)(a, b), ((a - b) ** 2).mean())
    assert KernelFeatureLoss(3, 5)(a, torch.rand(2, 5, 4, 4)).ndim == 0
    assert [progressive_weight(s, 100, "linear", 0.5) for s in (0, 25, 50, 90)] == [0.0, 0.5, 1.0, 1.0]
    assert progressive_weight(25, 100, "cosine", 0.5) == pytest.approx(0.5)
    assert progressive_weight(0, 100, "constant") == 1.0


def test_cnn_twin_undoes_adder_sr_wrappers_and_keeps_the_rest() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(6, 2, 1))
    to_adder(model, self_shortcut=True, power_activation=True)
    assert isinstance(model[1][0], SelfShortcut) and isinstance(model[1][1], PowerActivation)
    assert adder_units(model) == {"1.0.body": "1", "3.0": "3"}
    twin = cnn_twin(model)
    assert [type(m) for m in twin] == [nn.Conv2d, nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Conv2d]
    assert (twin[3].in_channels, twin[3].out_channels, twin[3].stride) == (4, 6, (2, 2))
    assert torch.equal(twin[0].weight, model[0].weight) and twin[0].weight is not model[0].weight
    # the AdderSR recipe's P(BN(adder(x))) (norm, no self-shortcut): with the conversion record, the whole wrapper
    # (including the BatchNorm2d that norm=True added) goes back to one conv
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    report = to_adder(model, norm=True, self_shortcut=False, power_activation=True)
    assert isinstance(model[1][0][1], nn.BatchNorm2d) and isinstance(model[1][1], PowerActivation)
    twin = cnn_twin(model, report.converted)
    assert [type(m) for m in twin.modules()] == [nn.Sequential, nn.Conv2d, nn.Conv2d, nn.ReLU, nn.Conv2d]


# ----------------------------------------------------------------------------------------------- training
class TinyTask(EffnetsTaskMixin, pl.LightningModule):
    """Follows the task contract: stem conv -> two convs (converted to adders) -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
        self.example_input_array = torch.zeros(1, 1, 6, 6)
        self.init_optimization(partial(torch.optim.SGD, lr=0.05, momentum=0.9), lr_schedule="constant")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def task_loss(self, output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(output, batch[1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.task_loss(self(batch[0]), batch)
        return loss + self.pop_auxiliary_loss(loss)


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0)
    defaults.update(kw)
    return pl.Trainer(**defaults)


def _flat(module: nn.Module) -> Tensor:
    return torch.cat([t.detach().flatten().float() for t in module.state_dict().values()])


class Spy(pl.Callback):
    """Teacher state when training starts (after any checkpoint restore) and the losses the task received."""

    def __init__(self, pkkd: ProgressiveKernelDistillation) -> None:
        self.pkkd = pkkd
        self.start: Tensor | None = None
        self.aux: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.start = _flat(self.pkkd.teacher).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.aux.append(float(trainer.callback_metrics.get("train/aux/pkkd", float("nan"))))


@pytest.mark.parametrize("pkkd_first", [True, False])
def test_teacher_trains_jointly_and_never_enters_the_student_or_its_checkpoint(tmp_path, pkkd_first) -> None:
    torch.manual_seed(0)
    task = TinyTask()
    pkkd = ProgressiveKernelDistillation(ramp=0.5)
    spy = Spy(pkkd)
    callbacks = [pkkd, AdderConversion()] if pkkd_first else [AdderConversion(), pkkd]
    trainer = _trainer(max_steps=4, callbacks=[*callbacks, spy])
    trainer.fit(task, _loader())
    teacher = pkkd.teacher
    # either order gives the pre-conversion CNN architecture, matched at the converted layers' places
    assert isinstance(task.model[3], Adder2d)
    assert isinstance(teacher[3], nn.Conv2d) and isinstance(teacher[6], nn.Conv2d)
    assert pkkd.pairs == [("3", "3"), ("6", "6")]
    assert pkkd.teacher_source.startswith("copy" if pkkd_first else "cnn twin")
    assert not torch.equal(_flat(teacher), spy.start), "teacher parameters did not change"
    assert all(math.isfinite(v) and v > 0 for v in spy.aux)
    metrics = trainer.callback_metrics
    for key in ("teacher_loss", "teacher_acc", "feature_loss", "output_loss"):
        assert f"effnets/pkkd/{key}" in metrics, key
    # the student leaves fit without the teacher; its checkpoint state_dict is the student's alone
    assert not hasattr(task, "effnets_pkkd")
    assert not any("teacher" in k or "pkkd" in k for k in task.state_dict())
    trainer.save_checkpoint(tmp_path / "pkkd.ckpt")
    ckpt = torch.load(tmp_path / "pkkd.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == set(task.state_dict())
    saved = ckpt["callbacks"]["ProgressiveKernelDistillation"]["modules"]["teacher"]
    torch.testing.assert_close(saved, teacher.state_dict())
    fresh = TinyTask()
    to_adder(fresh.model)
    fresh.load_state_dict(ckpt["state_dict"])  # strict: a plain adder task loads it


def _run(tmp_path, ckpt_path=None) -> tuple[TinyTask, ProgressiveKernelDistillation, Spy]:
    """6 steps of one full batch each (one batch per epoch, so Lightning's choice of the batch to resume with cannot
    matter), saving a checkpoint at the end of every epoch."""
    torch.manual_seed(0)
    task = TinyTask()
    pkkd = ProgressiveKernelDistillation(ramp=0.5)
    spy = Spy(pkkd)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                            save_on_train_epoch_end=True)
    trainer = _trainer(max_steps=6, callbacks=[pkkd, AdderConversion(), spy, saver], enable_checkpointing=True)
    trainer.fit(task, _loader(n=8, batch_size=8), ckpt_path=ckpt_path)
    return task, pkkd, spy


def test_resume_restores_the_teacher_and_continues_exactly(tmp_path) -> None:
    straight_task, straight, _ = _run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "epoch=2.ckpt"  # after 3 of the 6 steps
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]["ProgressiveKernelDistillation"]
    resumed_task, resumed, spy = _run(tmp_path / "b", ckpt_path=checkpoint)
    # the resumed run starts from the checkpoint's teacher (not a fresh copy), then continues exactly
    assert spy.start is not None
    saved_teacher = torch.cat([t.flatten().float() for t in saved["modules"]["teacher"].values()])
    torch.testing.assert_close(spy.start, saved_teacher, rtol=0, atol=0)
    assert not torch.equal(spy.start, _flat(straight.teacher))
    torch.testing.assert_close(_flat(resumed.teacher), _flat(straight.teacher), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_flat(resumed.distillation.feature_losses),
                               _flat(straight.distillation.feature_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_flat(resumed_task), _flat(straight_task), rtol=1e-5, atol=1e-6)


class PlainSGDTask(TinyTask):
    """TinyTask with SGD without momentum or weight decay: one step moves a parameter by exactly ``-lr * grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.init_optimization(partial(torch.optim.SGD, lr=0.05), lr_schedule="constant")


class StepRecorder(pl.Callback):
    """Every parameter with its value and gradient right before the first optimizer step, and its value after."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer = optimizer
        self.before = {n: (p, p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters()
                       if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after = {n: p.detach().clone() for n, (p, _, _) in self.before.items()}


def test_teacher_lr_scale_gives_the_teacher_its_own_learning_rate() -> None:
    torch.manual_seed(0)
    task, recorder = PlainSGDTask(), StepRecorder()
    pkkd = ProgressiveKernelDistillation(ramp=0.0, teacher_lr_scale=0.5)
    # AdderConversion's own scale on the adder weights must survive next to the teacher's
    _trainer(max_steps=1, callbacks=[pkkd, AdderConversion(lr_scale=3.0), recorder]).fit(task, _loader())
    base = 0.05
    teacher = {id(p) for p in pkkd.teacher.parameters()}
    adder = {id(m.weight) for m in task.model.modules() if isinstance(m, Adder2d)}
    mappings = {id(p) for p in pkkd.distillation.feature_losses.parameters()}
    assert (len(teacher), len(adder), len(mappings)) == (14, 2, 4)

    def expected_lr(p: nn.Parameter) -> float:
        return base * (0.5 if id(p) in teacher else 3.0 if id(p) in adder else 1.0)

    for group in recorder.optimizer.param_groups:
        assert len({expected_lr(p) for p in group["params"]}) == 1, "a param group mixes learning rates"
        assert group["lr"] == pytest.approx(expected_lr(group["params"][0]))
    # independent of the param groups: the SGD step itself moved every parameter (teacher, mappings, student) by
    # its own rate x its gradient
    kinds = set()
    for name, (p, value, grad) in recorder.before.items():
        kinds.add(name.split(".")[1] if name.startswith("effnets_pkkd.") else "student")
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(recorder.after[name], value - expected_lr(p) * grad, rtol=0, atol=1e-7,
                                   msg=f"{name}: expected a step of {expected_lr(p)} x grad")
    assert kinds == {"teacher", "feature_losses", "student"}


class SameTeacherOnEveryRank(pl.Callback):
    """Runs inside each DDP worker: the teacher is a submodule of the wrapped module, so DDP keeps it in sync."""

    def __init__(self, pkkd: ProgressiveKernelDistillation) -> None:
        self.pkkd = pkkd

    def on_train_start(self, trainer, pl_module):
        assert pl_module.effnets_pkkd.teacher is self.pkkd.teacher
        self.initial = _flat(self.pkkd.teacher).clone()

    def on_train_end(self, trainer, pl_module):
        for module in (self.pkkd.teacher, self.pkkd.distillation.feature_losses, pl_module.model):
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            gathered = trainer.strategy.all_gather(flat)
            assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1]), "ranks differ"
        assert not torch.equal(_flat(self.pkkd.teacher), self.initial)


def test_ddp_two_processes_train_the_same_teacher() -> None:
    torch.manual_seed(0)
    pkkd = ProgressiveKernelDistillation()
    trainer = _trainer(max_steps=3, strategy="ddp_spawn", devices=2,
                       callbacks=[pkkd, AdderConversion(), SameTeacherOnEveryRank(pkkd)])
    trainer.fit(TinyTask(), _loader(n=48, batch_size=4))  # each rank sees its own batches
    assert trainer.state.finished


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="has no Adder2d layer"):  # no AdderConversion
        _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation()]).fit(TinyTask(), _loader())
    with pytest.raises(ValueError, match=r"'4' is not an adder layer of the student; candidates: 3, 6"):
        _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation(layers=["4"]), AdderConversion()]).fit(
            TinyTask(), _loader())
    with pytest.raises(ValueError, match=r"no Conv2d layer 'head'.*teacher conv layers: 0, 3, 6"):
        _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation(layers={"3": "head"}),
                                         AdderConversion()]).fit(TinyTask(), _loader())
    with pytest.raises(ValueError, match=r"spatial sizes differ.*spatial size \(6, 6\): 0, 3"):
        _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation(layers={"3": "6"}),
                                         AdderConversion()]).fit(TinyTask(), _loader())
    with pytest.raises(ValueError, match="sigma_adder must be a positive number"):
        ProgressiveKernelDistillation(sigma_adder=0)
    with pytest.raises(ValueError, match="teacher_lr_scale must be a positive number"):
        ProgressiveKernelDistillation(teacher_lr_scale=0.0)
    with pytest.raises(ValueError, match="needs a trained one"):
        ProgressiveKernelDistillation(train_teacher=False)


class SmoothedLossTask(TinyTask):
    """A task whose loss no batch inference would guess (label smoothing 0.3): the teacher must learn with it."""

    def task_loss(self, output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(output, batch[1], label_smoothing=0.3)


class NoLossTask(TinyTask):
    """Trains with its own loss but keeps the contract's default ``task_loss``: it exposes no loss."""

    task_loss = EffnetsTaskMixin.task_loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        return loss + self.pop_auxiliary_loss(loss)


class NoLossForThisBatchTask(NoLossTask):
    def task_loss(self, output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor | None:
        return None


class TeacherSnapshot(pl.Callback):
    def __init__(self, pkkd: ProgressiveKernelDistillation) -> None:
        self.pkkd = pkkd

    def on_train_start(self, trainer, pl_module):
        self.teacher = copy.deepcopy(self.pkkd.teacher)


def test_teacher_learns_with_the_task_loss() -> None:
    torch.manual_seed(0)
    pkkd = ProgressiveKernelDistillation()
    snapshot = TeacherSnapshot(pkkd)
    trainer = _trainer(max_steps=1, callbacks=[pkkd, AdderConversion(), snapshot])
    trainer.fit(SmoothedLossTask(), _loader(n=8))
    x, y = next(iter(_loader(n=8)))
    with torch.no_grad():  # the teacher in train mode as in the step (batch statistics): the same output
        logits = snapshot.teacher(x).double()
    log_p = logits.log_softmax(dim=1)
    expected = (-(0.7 * log_p.gather(1, y[:, None])[:, 0] + 0.3 / 3 * log_p.sum(dim=1))).mean()
    metrics = trainer.callback_metrics
    assert float(metrics["effnets/pkkd/teacher_loss_step"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["effnets/pkkd/teacher_acc_step"]) == pytest.approx(float((logits.argmax(1) == y).double()
                                                                                  .mean()))


def test_a_task_without_a_loss_gets_a_clear_error_naming_the_fixes() -> None:
    with pytest.raises(ValueError, match=r"NoLossTask.task_loss\(output, batch\), but it does not implement it.*"
                                         r"teacher_loss='cross_entropy' \| 'l1' \| 'mse' \| callable"):
        _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation(), AdderConversion()]).fit(
            NoLossTask(), _loader())
    with pytest.raises(ValueError, match="but it returned None for this batch. Implement NoLossForThisBatchTask"):
        _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation(), AdderConversion()]).fit(
            NoLossForThisBatchTask(), _loader())
    # the fixes the message names work: a fixed loss, or a frozen trained teacher (no teacher loss at all)
    trainer = _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation(teacher_loss="cross_entropy"),
                                               AdderConversion()])
    trainer.fit(NoLossTask(), _loader())
    assert "effnets/pkkd/teacher_loss" in trainer.callback_metrics
    trainer = _trainer(max_steps=1, callbacks=[ProgressiveKernelDistillation(teacher=TinyTask().model,
                                                                             train_teacher=False),
                                               AdderConversion()])
    trainer.fit(NoLossTask(), _loader())
    assert "effnets/pkkd/feature_loss" in trainer.callback_metrics


# ----------------------------------------------------------------------------------------------- recipes
def test_classification_recipe_runs_through_the_cli(tmp_path, monkeypatch) -> None:
    from lightning_effnets.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "classification/adder_pkkd", "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert not hasattr(cli.model, "effnets_pkkd")
    assert any(isinstance(m, Adder2d) for m in cli.model.model.modules())
    metrics = cli.trainer.callback_metrics
    assert {"effnets/pkkd/teacher_acc", "effnets/pkkd/feature_loss", "effnets/pkkd/output_loss"} <= set(metrics)


def test_super_resolution_recipe_distils_features_and_output(tmp_path, monkeypatch) -> None:
    from lightning_effnets.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "super_resolution/adder_pkkd", "--trainer.fast_dev_run=true",
                "--model.init_args.n_resblocks=1", "--data.init_args.batch_size=2"])
    assert cli.trainer.global_step == 1
    pkkd = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ProgressiveKernelDistillation))
    # one residual block (2 convs) + the body's closing conv, each wrapped by the conversion (norm, power act.)
    assert [t for _, t in pkkd.pairs] == ["body.0.conv1", "body.0.conv2", "body.1"]
    assert all(isinstance(pkkd.teacher.get_submodule(t), nn.Conv2d) for _, t in pkkd.pairs)
    # the teacher is the plain EDSR CNN (no BN / power-activation wrappers), at the task's learning rate, while
    # AdderConversion(lr_scale=30) speeds up the student's adder weights only
    assert not any(isinstance(m, (Adder2d, nn.BatchNorm2d, PowerActivation)) for m in pkkd.teacher.modules())
    lr = {id(p): g["lr"] for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    base = lr[id(cli.model.model.head.weight)]  # a student conv that stays multiplicative (after 1 warm-up step)
    assert all(math.isclose(lr[id(p)], base) for p in pkkd.teacher.parameters())
    adders = [m.weight for m in cli.model.model.modules() if isinstance(m, Adder2d)]
    assert len(adders) == 3 and all(math.isclose(lr[id(w)], 30 * base) for w in adders)
    metrics = cli.trainer.callback_metrics
    assert {"effnets/pkkd/teacher_loss", "effnets/pkkd/feature_loss", "effnets/pkkd/output_loss"} <= set(metrics)


def test_detection_feature_distillation_from_a_given_frozen_teacher() -> None:
    import copy

    from lightning_effnets.data import ShapesDetectionDataModule
    from lightning_effnets.tasks import ObjectDetector

    torch.manual_seed(0)
    task = ObjectDetector(backbone="resnet10t", num_classes=4, in_chans=3, image_size=64, strides=[4, 8, 16],
                          p6p7=False, fpn_channels=16, head_convs=1, level_boundaries=[10, 20], log_samples=0)
    teacher = copy.deepcopy(task.model)  # stands for a trained CNN detector
    frozen = _flat(teacher).clone()
    pkkd = ProgressiveKernelDistillation(teacher=teacher, train_teacher=False)
    trainer = _trainer(max_steps=1, callbacks=[pkkd, AdderConversion()])
    trainer.fit(task, ShapesDetectionDataModule(batch_size=2, image_size=64, num_train=4, num_val=2, num_test=2))
    assert len(pkkd.pairs) > 10 and torch.equal(_flat(teacher), frozen)
    metrics = trainer.callback_metrics
    assert "effnets/pkkd/feature_loss" in metrics and "effnets/pkkd/output_loss" not in metrics  # list outputs
    assert "effnets/pkkd/teacher_loss" not in metrics
