"""Real handwritten digits that ship with scikit-learn (1,797 8x8 images, 10 classes); no download."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2

__all__ = ["DigitsDataModule"]


class _Augmented(Dataset):
    """Applies a per-sample transform on top of a tensor dataset (training split only)."""

    def __init__(self, images: Tensor, targets: Tensor, transform: v2.Transform) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.targets[index]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, resized to ``image_size`` and split (stratified, seeded) into train/val/test.

    Images are float tensors in [0, 1] with ``in_chans`` identical channels (3 by default so any
    ImageNet-style backbone works unchanged; 1 is cheaper). Training images get light augmentation
    (small random rotation, shift and scale) unless ``augment=False``.

    Args:
        batch_size: samples per batch.
        image_size: side of the square images (the source is 8x8, upsampled bilinearly).
        in_chans: 1 or 3.
        val_fraction / test_fraction: fractions of the 1,797 images held out.
        seed: seed of the split (the split is identical on every rank and every run).
        augment: enable training augmentation.
        train_fraction: keep only this fraction of the training split (stratified, seeded by ``seed``);
            a low-data setting where harder-to-train networks (e.g. AdderNets) trail their CNN twins.
        num_workers: DataLoader workers (the data lives in memory; 0 is usually fastest).
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, image_size: int = 32, in_chans: int = 3, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, seed: int = 0, augment: bool = True, num_workers: int = 0,
                 train_fraction: float = 1.0) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the source digits are 8x8), got {image_size}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
                             "and sum to less than 1")
        if not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.save_hyperparameters()
        self.batch_size, self.image_size, self.in_chans = batch_size, image_size, in_chans
        self.splits: dict[str, TensorDataset] = {}

    def _load(self) -> tuple[Tensor, Tensor]:
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        if self.image_size != 8:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False).clamp_(0, 1)
        return images.expand(-1, self.in_chans, -1, -1).contiguous(), torch.from_numpy(digits.target).long()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, targets = self._load()
        hp = self.hparams
        index = np.arange(len(targets))
        rest, test = train_test_split(index, test_size=hp.test_fraction, stratify=targets.numpy(),
                                      random_state=hp.seed)
        train, val = train_test_split(rest, test_size=hp.val_fraction / (1 - hp.test_fraction),
                                      stratify=targets.numpy()[rest], random_state=hp.seed)
        if hp.train_fraction < 1.0:
            train, _ = train_test_split(train, train_size=hp.train_fraction, stratify=targets.numpy()[train],
                                        random_state=hp.seed)
        for name, idx in (("train", train), ("val", val), ("test", test)):
            idx_t = torch.from_numpy(np.sort(idx))
            self.splits[name] = TensorDataset(images[idx_t], targets[idx_t])

    def _train_set(self) -> Dataset:
        images, targets = self.splits["train"].tensors
        if not self.hparams.augment:
            return self.splits["train"]
        shift = 1.5 / 8  # about 1.5 source pixels
        return _Augmented(images, targets, v2.RandomAffine(degrees=10, translate=(shift, shift), scale=(0.9, 1.1)))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train_set(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"], shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"], shuffle=False)
