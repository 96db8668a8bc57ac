"""PersonReID task: evaluation through the trainer against brute force, camera ids end to end, clear errors,
and the bundled recipe (fast_dev_run and a short logged run)."""

import numpy as np
import lightning.pytorch as pl
import pytest
import torch
from helpers import read_wandb_history
from test_reid_metrics import brute_force
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_effnets.cli import main
from lightning_effnets.cost import profile
from lightning_effnets.data import MultiCameraReIDDataModule
from lightning_effnets.tasks import PersonReID
from lightning_effnets.tasks.reid import ReIDOutput

TINY_DATA = ["--data.init_args.num_train_ids=6", "--data.init_args.num_val_ids=3", "--data.init_args.num_test_ids=3",
             "--data.init_args.num_cameras=4", "--data.init_args.held_out_cameras=2",
             "--data.init_args.train_images_per_camera=2", "--data.init_args.eval_images_per_camera=2",
             "--data.init_args.p=3", "--data.init_args.k=2", "--data.init_args.image_size=[32, 16]",
             "--model.init_args.image_size=[32, 16]", "--model.init_args.num_classes=6"]


def _trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


class _Passthrough(nn.Module):
    """Stands in for the network: the 'images' [B, D, 1, 1] are the embeddings themselves."""

    def forward(self, images):
        f = images.flatten(1)
        return ReIDOutput(f, f, torch.zeros(len(f), 2))


class _DictDataset(Dataset):
    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def _retrieval_problem(seed=0, n=90, dim=5):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    pids, cams, query = rng.integers(1, 10, n), rng.integers(0, 4, n), rng.random(n) < 0.3
    return feats, pids, cams, query


def _expected(feats, pids, cams, query, mask):
    qi, gi = np.flatnonzero(mask & query), np.flatnonzero(mask & ~query)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    return brute_force(1 - unit[qi] @ unit[gi].T, pids[qi], pids[gi], cams[qi], cams[gi])


def test_validation_metrics_match_brute_force_per_camera_group():
    feats, pids, cams, query = _retrieval_problem()
    task = PersonReID(backbone="resnet10t", num_classes=2, image_size=(16, 8), log_samples=0,
                      camera_groups={"seen": [0, 1], "held_out": [2, 3]})
    task.model = _Passthrough()
    data = _DictDataset(images=torch.from_numpy(feats)[:, :, None, None], person_ids=torch.from_numpy(pids),
                        camera_ids=torch.from_numpy(cams), is_query=torch.from_numpy(query),
                        indices=torch.arange(len(pids)))
    result = _trainer().validate(task, DataLoader(data, batch_size=16), verbose=False)[0]
    for prefix, mask in (("", np.ones(len(pids), bool)), ("seen/", cams <= 1), ("held_out/", cams >= 2)):
        mAP, cmc, valid = _expected(feats, pids, cams, query, mask)
        assert result[f"val/{prefix}mAP"] == pytest.approx(mAP, abs=1e-5)
        assert result[f"val/{prefix}rank1"] == pytest.approx(cmc[0], abs=1e-6)
        assert result[f"val/{prefix}rank5"] == pytest.approx(cmc[4], abs=1e-6)
        assert result[f"val/{prefix}num_queries"] == valid


def test_bnneck_structure_and_outputs():
    task = PersonReID(backbone="resnet10t", num_classes=7, image_size=(32, 16))
    out = task(torch.randn(4, 3, 32, 16))
    assert out.features.shape == out.embeddings.shape == (4, 512) and out.logits.shape == (4, 7)
    assert task.model.bottleneck.bias.requires_grad is False  # BNNeck: BN bias frozen
    assert task.model.classifier.bias is None
    assert task.output_modules() == [task.model.classifier]
    optimized = {id(p) for g in task.optimizer_param_groups() for p in g["params"]}
    assert id(task.model.bottleneck.bias) not in optimized
    # BN normalises the features: in training mode each embedding dimension has ~zero mean over the batch
    task.train()
    emb = task(torch.randn(8, 3, 32, 16)).embeddings
    assert emb.mean(dim=0).abs().max() < 1e-4
    assert profile(task.model, task.example_input_array, latency_repeats=0, measure_latency=False).macs > 0


def test_camera_ids_flow_to_the_module_and_missing_ones_are_clear_errors():
    dm = MultiCameraReIDDataModule(num_cameras=3, held_out_cameras=1, num_train_ids=4, num_val_ids=2,
                                   num_test_ids=2, train_images_per_camera=2, eval_images_per_camera=2,
                                   image_size=(32, 16), p=2, k=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    task = PersonReID(backbone="resnet10t", num_classes=4, image_size=(32, 16))
    side = task.side_information(batch)
    assert torch.equal(side["camera_ids"], batch["camera_ids"]) and side["camera_ids"].dtype == torch.long
    assert set(side["camera_ids"].tolist()) <= {0, 1}

    no_cameras = {k: v for k, v in batch.items() if k != "camera_ids"}
    with pytest.raises(ValueError, match="no 'camera_ids'.*Make the dataset return 'camera_ids'"):
        task.side_information(no_cameras)
    with pytest.raises(ValueError, match="expects dict batches"):
        task.side_information((batch["images"], batch["person_ids"]))
    with pytest.raises(ValueError, match="no 'camera_ids'"):
        task.training_step(no_cameras, 0)
    with pytest.raises(ValueError, match="must be integers >= 0"):
        task.side_information({**batch, "camera_ids": batch["camera_ids"] - 5})
    with pytest.raises(ValueError, match=r"person id 1\d is outside \[0, num_classes=4\)"):
        task.training_step({**batch, "person_ids": batch["person_ids"] + 10}, 0)


def test_empty_gallery_is_a_clear_error():
    feats, pids, cams, _ = _retrieval_problem(n=20)
    task = PersonReID(backbone="resnet10t", num_classes=2, image_size=(16, 8), log_samples=0)
    task.model = _Passthrough()
    data = _DictDataset(images=torch.from_numpy(feats)[:, :, None, None], person_ids=torch.from_numpy(pids),
                        camera_ids=torch.from_numpy(cams), is_query=torch.ones(20, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty gallery"):
        _trainer().validate(task, DataLoader(data, batch_size=8), verbose=False)


def test_num_classes_mismatch_names_the_fix():
    dm = MultiCameraReIDDataModule(num_train_ids=5, num_val_ids=2, num_test_ids=2, num_cameras=3,
                                   held_out_cameras=1, image_size=(32, 16), p=2, k=2)
    task = PersonReID(backbone="resnet10t", num_classes=9, image_size=(32, 16))
    with pytest.raises(ValueError, match=r"num_classes=9.*MultiCameraReIDDataModule.num_classes = 5.*"
                                         r"model.init_args.num_classes"):
        _trainer(max_steps=1).fit(task, datamodule=dm)


def test_recipe_runs_with_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "reid/baseline", "--trainer.fast_dev_run=true", "--trainer.logger=false",
                "--trainer.callbacks=[]",
                *TINY_DATA])
    assert cli.trainer.global_step == 1 and cli.trainer.state.finished
    assert "val/mAP" in cli.trainer.callback_metrics


def test_recipe_logs_seen_and_held_out_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "reid/baseline", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1", *TINY_DATA])
    assert cli.trainer.global_step == 3
    history = read_wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))
    for key in ("train/loss_step", "train/triplet_loss", "val/mAP", "val/rank1", "test/mAP",
                "test/rank10", "test/seen/mAP", "test/seen/rank1", "test/held_out/mAP", "test/held_out/rank1",
                "effnets/cost/end/macs"):
        assert key in history, f"{key} not logged; logged: {sorted(history)}"
    assert "val/held_out/mAP" not in history  # validation never sees the held-out cameras
    assert 0.0 <= history["test/held_out/mAP"][-1] <= 1.0
    retrievals = history.get("val/retrievals") or [{"count": c} for c in history.get("val/retrievals/count", [])]
    assert retrievals and retrievals[-1]["count"] >= 1, sorted(history)
