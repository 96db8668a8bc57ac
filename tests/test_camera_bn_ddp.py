"""CamBN adaptation under DDP (2 CPU processes, gloo, ``ddp_spawn``): every rank adapts from its own shard of the
evaluation data and the per-camera sums are all-reduced, so both ranks end with identical statistics, equal to
the statistics over the union of both shards. Assertions run inside the workers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_effnets.callbacks import CameraBN
from lightning_effnets.layers import camera_bn_layers
from lightning_effnets.tasks.base import EffnetsTaskMixin


class _CameraImages(Dataset):
    def __init__(self, images: Tensor, cameras: Tensor) -> None:
        self.images, self.cameras = images, cameras

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"images": self.images[i], "camera_ids": self.cameras[i]}


class _CheckedTask(EffnetsTaskMixin, pl.LightningModule):
    """Checks, on every rank at the first validation batch, the adapted statistics against ``expected``."""

    def __init__(self, images: Tensor, cameras: Tensor) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                   nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4))
        self.example_input_array = torch.zeros(2, 3, 8, 8)
        self.init_optimization(lr_schedule="constant")
        with torch.no_grad():  # the union of both ranks' images, computed directly in the parent process
            self.expected = {c: (self.model[0](images[cameras == c]).mean(dim=(0, 2, 3)),
                                 self.model[0](images[cameras == c]).var(dim=(0, 2, 3)))
                             for c in cameras.unique().tolist()}
        self.checked = False

    def side_information(self, batch: Any) -> dict[str, Any]:
        return {"camera_ids": batch["camera_ids"]}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.model(batch["images"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx:
            return
        assert self.trainer.world_size == 2
        callback = next(c for c in self.trainer.callbacks if isinstance(c, CameraBN))
        first = self.model[1]
        for camera, (mean, var) in self.expected.items():
            slot = callback.camera_map[camera]
            torch.testing.assert_close(first.running_mean[slot], mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(first.running_var[slot], var, rtol=1e-5, atol=1e-5)
        assert callback.camera_map == {0: 0, 1: 1, 5: 2}  # camera 5 met only here: a new slot on both ranks
        for _, layer in camera_bn_layers(self.model):  # every layer identical on both ranks
            local = torch.cat([layer.running_mean.flatten(), layer.running_var.flatten()])
            gathered = self.all_gather(local)
            torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
        self.checked = True

    def on_validation_epoch_end(self) -> None:
        assert self.checked, "the adapted statistics were not checked"


def test_ddp_adaptation_combines_camera_statistics_across_ranks():
    g = torch.Generator().manual_seed(0)
    cameras = torch.tensor([0, 0, 1, 1, 5, 5] * 4)  # the DistributedSampler gives each rank half of every camera
    scale = cameras.view(-1, 1, 1, 1).float()
    images = torch.randn(len(cameras), 3, 8, 8, generator=g) * (1 + scale) + scale
    task = _CheckedTask(images, cameras)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[CameraBN(num_cameras=2, adapt_batch_size=3)])
    trainer.validate(task, DataLoader(_CameraImages(images, cameras), batch_size=4))
