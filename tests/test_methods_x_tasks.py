"""Every method attaches to every task unchanged: each task recipe, plus a method callback from the CLI,
trains one step and the method has really acted on the task's network."""

import copy
import math

import pytest
import torch

from lightning_effnets.callbacks import ProgressiveKernelDistillation
from lightning_effnets.cli import main
from lightning_effnets.layers import Adder2d, BinaryConv2d

SMALL_DATA = {
    "classification/baseline": ["--model.init_args.backbone=resnet10t"],
    "detection/baseline": ["--data.init_args.num_train=32", "--data.init_args.num_val=8",
                           "--data.init_args.num_test=8", "--data.init_args.batch_size=8"],
    "super_resolution/baseline": ["--data.init_args.patches_per_epoch=16", "--data.init_args.batch_size=4",
                                  "--model.init_args.n_resblocks=2"],
    "referring/baseline": ["--data.init_args.train_size=64", "--data.init_args.val_size=16",
                           "--data.init_args.test_size=16", "--data.init_args.batch_size=16"],
    "reid/baseline": ["--data.init_args.num_train_ids=16", "--data.init_args.num_val_ids=6",
                      "--data.init_args.num_test_ids=6", "--data.init_args.p=4", "--data.init_args.k=2",
                      "--model.init_args.num_classes=16"],
}

METHODS = {
    "adder": ["--trainer.callbacks+=lightning_effnets.callbacks.AdderConversion"],
    "binary_bop": ["--trainer.callbacks+=lightning_effnets.callbacks.Binarization",
                   "--trainer.callbacks+=lightning_effnets.callbacks.BopOptimizer"],
    "pruning": ["--trainer.callbacks+=lightning_effnets.callbacks.ChannelPruning",
                "--trainer.callbacks.ratio=0.3", "--trainer.callbacks.latency_repeats=0",
                "--trainer.callbacks.print_table=false"],
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("recipe", sorted(SMALL_DATA))
def test_method_attaches_to_task(recipe, method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", recipe, "--trainer.fast_dev_run=true", *SMALL_DATA[recipe], *METHODS[method]])
    trainer, model = cli.trainer, cli.model.model
    assert trainer.global_step == 1 and trainer.state.finished
    loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
    assert loss is not None and math.isfinite(float(loss))
    if method == "adder":
        assert any(isinstance(m, Adder2d) for m in model.modules())
    elif method == "binary_bop":
        assert any(isinstance(m, BinaryConv2d) for m in model.modules())
        binary = [m.weight for m in model.modules() if isinstance(m, BinaryConv2d)]
        assert all(torch.equal(w.abs(), torch.ones_like(w)) for w in binary)
    else:
        hparams = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}
        unpruned = type(cli.model)(**hparams).model
        assert _params(model) < _params(unpruned)
        cli.model.model.eval()
        with torch.no_grad():
            example = cli.model.example_input_array
            out = model(*example) if isinstance(example, tuple) else model(example)
        assert out is not None


PKKD = ["--trainer.callbacks+=lightning_effnets.callbacks.AdderConversion",
        "--trainer.callbacks+=lightning_effnets.callbacks.ProgressiveKernelDistillation",
        "--trainer.callbacks.schedule=constant"]  # full distillation weight at the only step


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in module.state_dict().values()])


@pytest.mark.parametrize("recipe", ["detection/baseline", "referring/baseline", "reid/baseline"])
def test_pkkd_trains_its_teacher_jointly_with_the_task_loss(recipe, tmp_path, monkeypatch):
    """PKKD's default teacher loss is the task's own (``task_loss``): the CNN teacher trains next to the adder
    student on tasks whose batches say nothing about the loss (box lists, dict batches, several outputs)."""
    seen = {}
    cls = ProgressiveKernelDistillation
    start, batch_start, batch_end = cls.on_train_start, cls.on_train_batch_start, cls.on_train_batch_end

    def on_train_start(self, trainer, pl_module):
        seen["teacher"] = copy.deepcopy(self.teacher)  # before the first optimizer step
        self.teacher.register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
        start(self, trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seen["batch"] = batch
        batch_start(self, trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seen["loss"] = float(outputs["loss"])  # what the task's training_step returned
        batch_end(self, trainer, pl_module, outputs, batch, batch_idx)

    for hook in (on_train_start, on_train_batch_start, on_train_batch_end):
        monkeypatch.setattr(cls, hook.__name__, hook)
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", recipe, "--trainer.fast_dev_run=true", *SMALL_DATA[recipe], *PKKD])
    trainer, task = cli.trainer, cli.model
    pkkd = next(cb for cb in trainer.callbacks if isinstance(cb, ProgressiveKernelDistillation))
    assert trainer.global_step == 1 and pkkd.pairs and any(isinstance(m, Adder2d) for m in task.model.modules())
    # the teacher trained: its weights moved, and its loss was the task's loss of its own output on the batch
    assert not torch.equal(_flat(pkkd.teacher), _flat(seen["teacher"])), "teacher weights did not change"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with torch.no_grad():
        expected = float(task.task_loss(seen["teacher"](*seen["args"]), seen["batch"]))
    assert metrics["effnets/pkkd/teacher_loss_step"] == pytest.approx(expected, rel=1e-5)
    # the distillation terms (weight 1) were added to the task's loss: aux = teacher + feature (+ output KD)
    aux = metrics["train/aux/pkkd_step"]
    parts = sum(metrics.get(f"effnets/pkkd/{k}_step", 0.0) for k in ("teacher_loss", "feature_loss", "output_loss"))
    assert metrics["effnets/pkkd/feature_loss_step"] > 0 and aux == pytest.approx(parts, rel=1e-5)
    assert seen["loss"] == pytest.approx(metrics["train/loss_step"] + aux, rel=1e-5)
    assert not hasattr(task, "effnets_pkkd")  # the student leaves fit without its teacher
