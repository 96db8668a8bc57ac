"""A user's own folder of images, in torchvision's ImageFolder layout (one sub-folder per class)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

__all__ = ["ImageFolderDataModule"]


class ImageFolderDataModule(pl.LightningDataModule):
    """Classify a folder of images: ``root/train/<class>/*.jpg`` (+ ``root/val``, ``root/test``).

    If ``root`` has no ``train`` sub-folder it is itself the class-folder tree, and a seeded
    ``val_fraction`` of it is held out for validation (and reused for test). Images are resized to
    ``image_size`` and returned as float tensors in [0, 1]; training images get random resized crops
    and horizontal flips (``augment=True``).

    Args:
        root: dataset folder (its absence is reported with the path).
        batch_size: samples per batch.
        image_size: side of the square network input.
        in_chans: 3 (RGB) or 1 (grayscale).
        val_fraction: held-out fraction when there is no ``val`` folder.
        seed: seed of that split.
        augment: training augmentation.
        num_workers: DataLoader workers.
    """

    def __init__(self, root: str | Path, batch_size: int = 32, image_size: int = 224, in_chans: int = 3,
                 val_fraction: float = 0.2, seed: int = 0, augment: bool = True, num_workers: int = 2) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: image folder {str(self.root)!r} does not exist "
                                    "(expected root/<class>/<image> or root/train/<class>/<image>)")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.batch_size, self.image_size, self.in_chans = batch_size, image_size, in_chans
        self.splits: dict[str, Dataset] = {}
        self.classes = self._folder("train" if (self.root / "train").is_dir() else None, augment=False).classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _transform(self, augment: bool) -> v2.Transform:
        size = self.image_size
        steps: list[v2.Transform] = [v2.ToImage()]
        if augment:
            steps += [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        if self.in_chans == 1:
            steps.append(v2.Grayscale(1))
        steps.append(v2.ToDtype(torch.float32, scale=True))
        return v2.Compose(steps)

    def _folder(self, split: str | None, augment: bool) -> ImageFolder:
        path = self.root / split if split else self.root
        return ImageFolder(str(path), transform=self._transform(augment))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        augment = self.hparams.augment
        if (self.root / "train").is_dir():
            self.splits["train"] = self._folder("train", augment)
            held_out = "val" if (self.root / "val").is_dir() else "test"
            if not (self.root / held_out).is_dir():
                raise FileNotFoundError(f"{self.root}/train exists but neither {self.root}/val nor {self.root}/test")
            self.splits["val"] = self._folder(held_out, False)
            self.splits["test"] = self._folder("test" if (self.root / "test").is_dir() else held_out, False)
            for name in ("val", "test"):
                if self.splits[name].classes != self.classes:  # type: ignore[attr-defined]
                    raise ValueError(f"class folders of {name} differ from train: "
                                     f"{self.splits[name].classes} vs {self.classes}")  # type: ignore[attr-defined]
            return
        n = len(self._folder(None, False))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
        n_val = max(1, round(n * self.hparams.val_fraction))
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        self.splits["train"] = Subset(self._folder(None, augment), train_idx)
        self.splits["val"] = Subset(self._folder(None, False), val_idx)
        self.splits["test"] = self.splits["val"]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
