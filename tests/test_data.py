from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_effnets.data import DigitsDataModule, ImageFolderDataModule


def test_digits_split_is_stratified_deterministic_and_complete():
    a, b = DigitsDataModule(in_chans=1, image_size=16), DigitsDataModule(in_chans=1, image_size=16)
    a.setup("fit"), b.setup("fit")
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=1) and sizes["val"] == pytest.approx(0.1 * 1797, abs=1)
    for split in ("train", "val", "test"):
        torch.testing.assert_close(a.splits[split].tensors[0], b.splits[split].tensors[0])
        counts = Counter(a.splits[split].tensors[1].tolist())
        fractions = np.array([counts[c] for c in range(10)]) / len(a.splits[split])
        assert fractions.max() - fractions.min() < 0.03  # every class in proportion
    images = a.splits["train"].tensors[0]
    assert images.shape[1:] == (1, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_digits_augmentation_changes_train_but_not_eval_images():
    dm = DigitsDataModule(in_chans=3, image_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and y.dtype == torch.long
    vx, _ = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(vx, dm.splits["val"].tensors[0][:64])


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="in_chans"):
        DigitsDataModule(in_chans=2)
    with pytest.raises(ValueError, match="sum to less than 1"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.6)


def _write_folder(root, classes=("cat", "dog"), per_class=5, size=(20, 14)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_single_tree_is_split(tmp_path):
    _write_folder(tmp_path)
    dm = ImageFolderDataModule(tmp_path, batch_size=4, image_size=16, val_fraction=0.2, num_workers=0)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    dm.setup("fit")
    assert len(dm.splits["train"]) == 8 and len(dm.splits["val"]) == 2
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_image_folder_train_val_layout_and_grayscale(tmp_path):
    _write_folder(tmp_path / "train", per_class=3)
    _write_folder(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(tmp_path, batch_size=8, image_size=12, in_chans=1, num_workers=0)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 1, 12, 12)
    assert len(dm.splits["val"]) == 4


def test_image_folder_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "images"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageFolderDataModule(missing)


def test_image_folder_trains_with_classifier(tmp_path):
    import lightning.pytorch as pl

    from lightning_effnets.tasks import ImageClassifier

    _write_folder(tmp_path)
    dm = ImageFolderDataModule(tmp_path, batch_size=4, image_size=16, num_workers=0)
    task = ImageClassifier(backbone="resnet10t", num_classes=dm.num_classes, image_size=16)
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", enable_progress_bar=False)
    trainer.fit(task, datamodule=dm)
    assert trainer.state.finished
