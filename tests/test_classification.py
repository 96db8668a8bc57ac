import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_effnets.data import DigitsDataModule
from lightning_effnets.tasks import ImageClassifier


def _trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


def test_accuracy_metrics_match_hand_computation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 7, generator=g)
    targets = torch.randint(0, 7, (37,), generator=g)
    # hand computation: is the target among the k largest logits?
    order = np.argsort(-logits.numpy(), axis=1)
    top1 = float(np.mean(order[:, 0] == targets.numpy()))
    top5 = float(np.mean([t in row[:5] for t, row in zip(targets.numpy(), order)]))

    task = ImageClassifier(backbone="resnet10t", num_classes=7, in_chans=1, image_size=8, log_samples=0)
    task.model = nn.Identity()  # the "images" are the logits themselves
    loader = DataLoader(TensorDataset(logits, targets), batch_size=10)
    result = _trainer().validate(task, dataloaders=loader, verbose=False)[0]
    assert result["val/acc"] == pytest.approx(top1, abs=1e-6)
    assert result["val/acc_top5"] == pytest.approx(top5, abs=1e-6)
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert result["val/loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ValueError, match="resnet18") as info:
        ImageClassifier(backbone="resnet_18")
    assert "Close matches" in str(info.value)


def test_pretrained_is_refused():
    with pytest.raises(ValueError, match="pretrained=False"):
        ImageClassifier(backbone="resnet10t", backbone_kwargs={"pretrained": True})


def test_num_classes_mismatch_fails_before_training():
    task = ImageClassifier(backbone="resnet10t", num_classes=5, in_chans=1)
    steps = []
    task.on_train_batch_start = lambda *a: steps.append(1)
    with pytest.raises(ValueError, match=r"num_classes=5.*DigitsDataModule.num_classes = 10"):
        _trainer(max_steps=2).fit(task, datamodule=DigitsDataModule(in_chans=1))
    assert steps == []


def test_in_chans_mismatch_names_the_fix():
    task = ImageClassifier(backbone="resnet10t", num_classes=10, in_chans=3)
    with pytest.raises(ValueError, match="model.init_args.in_chans"):
        _trainer(max_steps=1).fit(task, datamodule=DigitsDataModule(in_chans=1))


def test_auxiliary_losses_are_added_and_logged():
    task = ImageClassifier(backbone="resnet10t", num_classes=10, in_chans=1, image_size=16)
    seen = {}

    class AddConstant(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.add_auxiliary_loss("const", torch.tensor(5.0))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["total"] = float(outputs["loss"])
            seen["task"] = float(trainer.callback_metrics["train/loss_step"])
            seen["aux"] = float(trainer.callback_metrics["train/aux/const_step"])

    _trainer(max_steps=1, callbacks=[AddConstant()]).fit(
        task, datamodule=DigitsDataModule(in_chans=1, image_size=16, batch_size=8))
    assert seen["aux"] == 5.0
    assert seen["total"] == pytest.approx(seen["task"] + 5.0, rel=1e-5)
    assert task.auxiliary_losses == {}


def test_checkpoint_resume_continues_training(tmp_path):
    dm = DigitsDataModule(in_chans=1, image_size=16, batch_size=64)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    task = ImageClassifier(backbone="resnet10t", num_classes=10, in_chans=1, image_size=16)
    trainer = _trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[ckpt_cb],
                       enable_checkpointing=True)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved_steps = state["optimizer_states"][0]["state"][0]["step"]
    assert int(saved_steps) == 3

    resumed = ImageClassifier(backbone="resnet10t", num_classes=10, in_chans=1, image_size=16)
    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            first = opt.param_groups[0]["params"][0]
            seen["step"] = int(opt.state[first]["step"])
            seen["weights_equal"] = all(torch.equal(a, b) for a, b in zip(
                pl_module.state_dict().values(), state["state_dict"].values()))
            seen["lr"] = opt.param_groups[0]["lr"]

    trainer2 = _trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[Spy()])
    trainer2.fit(resumed, datamodule=dm, ckpt_path=tmp_path / "last.ckpt")
    assert seen["step"] == 3 and seen["weights_equal"]
    assert seen["lr"] == pytest.approx(state["lr_schedulers"][0]["_last_lr"][0])
    assert trainer2.global_step == 6 and trainer2.current_epoch == 2
