"""Every method attaches to every task unchanged: each task recipe, plus a method callback from the CLI,
trains one step and the method has really acted on the task's network."""

import math

import pytest
import torch

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
