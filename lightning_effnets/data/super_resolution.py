"""Single-image super-resolution data: (low-resolution, high-resolution) pairs made by bicubic degradation.

Two datamodules share one pipeline:

* :class:`PhotoSRDataModule` -- the real photographs that ship with scikit-image and scikit-learn
  (no download): random HR crops of some photos for training, whole held-out photos for validation
  and test.
* :class:`ImageFolderSRDataModule` -- a user's folders of HR images (DIV2K / Set5 / Set14 layout).

Degradation is the "BI" setting of the SR literature (EDSR, Lim et al., arXiv:1707.02921): the LR image
is the HR image shrunk by the integer ``scale`` with bicubic interpolation and anti-aliasing
(:func:`bicubic_downsample`: ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``,
whose kernel widens by ``scale`` when shrinking, like MATLAB's ``imresize``; the two agree up to
boundary handling and rounding), then rounded to 8-bit levels as if saved to PNG. HR images are first
centre-cropped to a multiple of the scale (``modcrop``), as in the benchmark protocols.

Training pairs are cut from the LR image of the *whole* photo: a random HR crop at a position that is a
multiple of the scale, and the aligned LR crop. They are computed per crop from the crop plus a margin of
``2 * scale`` HR pixels (the reach of the bicubic kernel), which gives exactly the crop of the whole-image
LR without shrinking a 2K image for every sample.
"""

from __future__ import annotations

import abc

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "PHOTOS",
    "HRImage",
    "ImageFolderSRDataModule",
    "PairedCropDataset",
    "PhotoSRDataModule",
    "WholeImageDataset",
    "bicubic_downsample",
    "modcrop",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def bicubic_downsample(hr: Tensor, scale: int, quantize: bool = True) -> Tensor:
    """Shrink ``[..., C, H, W]`` images in [0, 1] by ``scale`` (bicubic, anti-aliased); H, W multiples of it.

    ``quantize`` rounds the result to 8-bit levels, as the LR images of the benchmarks are stored.
    """
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"bicubic_downsample: size {h}x{w} is not a multiple of scale={scale}")
    lead = hr.shape[:-3]
    x = hr.reshape(-1, *hr.shape[-3:]).float()
    lr = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    lr = lr.clamp_(0.0, 1.0)
    if quantize:
        lr = lr.mul_(255.0).round_().div_(255.0)
    return lr.reshape(*lead, *lr.shape[-3:])


def modcrop(image: Tensor, scale: int) -> Tensor:
    """Centre-crop ``[..., H, W]`` to the largest size that is a multiple of ``scale``."""
    h, w = image.shape[-2:]
    dh, dw = h % scale, w % scale
    return image[..., dh // 2:h - (dh - dh // 2), dw // 2:w - (dw - dw // 2)]


# ----------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class HRImage:
    """One high-resolution image: a name used in every error message, its size, and how to load it.

    ``load`` returns a ``uint8`` tensor ``[3, H, W]``; loading is deferred so that a folder of 2K
    images is read one file at a time.
    """

    name: str
    height: int
    width: int
    load: Callable[[], Tensor]


def _rgb_tensor(array: np.ndarray) -> Tensor:
    """HxW (grayscale, replicated to RGB), HxWx3 or HxWx4 (alpha dropped) uint8 array -> uint8 [3, H, W]."""
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.array(array[:, :, :3], dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _check_sizes(images: Sequence[HRImage], scale: int, modcrop_images: bool, min_size: int, role: str) -> None:
    """Raise a clear error, naming the image, for images the pipeline cannot use."""
    for image in images:
        h, w = image.height, image.width
        if not modcrop_images and (h % scale or w % scale):
            raise ValueError(f"{role} image {image.name!r} is {h}x{w}, which scale={scale} does not divide; "
                             f"crop it to a multiple of {scale} or set modcrop=True (centre-crops it)")
        h, w = h - h % scale, w - w % scale
        if min(h, w) < min_size:
            what = f"smaller than crop_size={min_size}" if role == "training" else f"smaller than {min_size} px"
            fix = "lower crop_size or leave the image out" if role == "training" else "leave the image out"
            raise ValueError(f"{role} image {image.name!r} is {image.height}x{image.width} "
                             f"({h}x{w} after cropping to a multiple of scale={scale}), {what}: {fix}")


# ----------------------------------------------------------------------------------------- datasets
class PairedCropDataset(Dataset):
    """Random aligned (LR, HR) crops of HR images, ``length`` per epoch, cycling through the images.

    Positions, flips and 90-degree rotations are drawn from torch's global generator (seeded per
    dataloader worker by Lightning), so runs are reproducible with ``seed_everything``.

    Args:
        images: training images (each at least ``crop_size`` after modcrop).
        scale: downscaling factor.
        crop_size: side of the HR crop (a multiple of ``scale``); the LR crop is ``crop_size // scale``.
        length: crops per epoch.
        augment: random horizontal/vertical flips and transposition (the 8 dihedral variants, as in EDSR).
        quantize: round LR crops to 8-bit levels.
        cache: keep decoded images in memory (default for the embedded photos; off for large folders).
    """

    def __init__(self, images: Sequence[HRImage], scale: int, crop_size: int, length: int, augment: bool = True,
                 quantize: bool = True, cache: bool = False) -> None:
        if not images:
            raise ValueError("PairedCropDataset: no training images")
        if crop_size % scale:
            raise ValueError(f"crop_size={crop_size} must be a multiple of scale={scale}")
        _check_sizes(images, scale, True, crop_size, "training")
        self.images, self.scale, self.crop_size, self.length = list(images), scale, crop_size, length
        self.augment, self.quantize, self.cache = augment, quantize, cache
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def _image(self, index: int) -> Tensor:
        if index in self._cache:
            return self._cache[index]
        hr = self.images[index].load()
        s = self.scale
        hr = hr[:, :hr.shape[1] - hr.shape[1] % s, :hr.shape[2] - hr.shape[2] % s]  # crops stay on the s-grid
        if self.cache:
            self._cache[index] = hr
        return hr

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        hr_full = self._image(index % len(self.images))
        s, crop = self.scale, self.crop_size
        _, h, w = hr_full.shape
        top = int(torch.randint(0, (h - crop) // s + 1, ())) * s
        left = int(torch.randint(0, (w - crop) // s + 1, ())) * s
        margin = 2 * s  # the bicubic kernel reaches 2 LR pixels = 2*s HR pixels when shrinking by s
        t0, l0 = max(top - margin, 0), max(left - margin, 0)
        b0, r0 = min(top + crop + margin, h), min(left + crop + margin, w)
        region = hr_full[:, t0:b0, l0:r0].float().div_(255.0)
        lr = bicubic_downsample(region, s, self.quantize)
        y, x, n = (top - t0) // s, (left - l0) // s, crop // s
        lr = lr[:, y:y + n, x:x + n]
        hr = region[:, top - t0:top - t0 + crop, left - l0:left - l0 + crop]
        if self.augment:
            if torch.rand(()) < 0.5:
                lr, hr = lr.flip(-1), hr.flip(-1)
            if torch.rand(()) < 0.5:
                lr, hr = lr.flip(-2), hr.flip(-2)
            if torch.rand(()) < 0.5:
                lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
        return lr.contiguous(), hr.contiguous()


class WholeImageDataset(Dataset):
    """Whole images as (LR, HR) pairs for validation and test (batch size 1: sizes differ).

    Args:
        images: evaluation images.
        scale: downscaling factor.
        modcrop: centre-crop each HR image to a multiple of ``scale``; if ``False`` an image that the scale
            does not divide is an error naming it.
        quantize: round LR images to 8-bit levels.
    """

    def __init__(self, images: Sequence[HRImage], scale: int, modcrop: bool = True, quantize: bool = True) -> None:
        if not images:
            raise ValueError("WholeImageDataset: no evaluation images")
        _check_sizes(images, scale, modcrop, 4 * scale, "evaluation")
        self.images, self.scale, self.quantize = list(images), scale, quantize

    @property
    def names(self) -> list[str]:
        return [image.name for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        hr = modcrop(self.images[index].load(), self.scale).float().div_(255.0)
        return bicubic_downsample(hr, self.scale, self.quantize), hr


# ----------------------------------------------------------------------------------------- datamodules
class _SRDataModule(pl.LightningDataModule, abc.ABC):
    """Shared loaders and checks; subclasses provide the images of each split."""

    in_chans = 3
    #: keep decoded training images in memory
    cache_training_images = False

    def __init__(self, scale: int, crop_size: int, batch_size: int, patches_per_epoch: int, augment: bool,
                 modcrop: bool, quantize: bool, num_workers: int) -> None:
        super().__init__()
        if scale < 2:
            raise ValueError(f"scale must be an integer >= 2, got {scale}")
        if crop_size % scale:
            raise ValueError(f"crop_size={crop_size} must be a multiple of scale={scale} "
                             f"(e.g. {crop_size - crop_size % scale or scale})")
        if batch_size < 1 or patches_per_epoch < 1:
            raise ValueError(f"batch_size ({batch_size}) and patches_per_epoch ({patches_per_epoch}) must be >= 1")
        self.scale, self.crop_size, self.batch_size = scale, crop_size, batch_size
        self.patches_per_epoch, self.augment, self.modcrop = patches_per_epoch, augment, modcrop
        self.quantize, self.num_workers = quantize, num_workers
        self.splits: dict[str, Dataset] = {}

    @abc.abstractmethod
    def _split_images(self) -> dict[str, list[HRImage]]:
        """The images of ``train``, ``val`` and ``test`` (implemented by each datamodule)."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images = self._split_images()
        self.splits["train"] = PairedCropDataset(images["train"], self.scale, self.crop_size, self.patches_per_epoch,
                                                 self.augment, self.quantize, cache=self.cache_training_images)
        for split in ("val", "test"):
            self.splits[split] = WholeImageDataset(images[split], self.scale, self.modcrop, self.quantize)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=False)  # every item is already a random crop

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", 1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", 1, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", 1, shuffle=False)


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _sklearn(filename: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(filename)


#: Natural photographs bundled with scikit-image 0.26 and scikit-learn (loaded without any download;
#: skimage's ``eagle``, ``lily``, ``skin``... need pooch and are left out). Grayscale ones are replicated to RGB.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": partial(_skimage, "astronaut"),                      # 512x512 RGB
    "camera": partial(_skimage, "camera"),                            # 512x512 gray (cameraman)
    "chelsea": partial(_skimage, "chelsea"),                          # 300x451 RGB (cat)
    "coffee": partial(_skimage, "coffee"),                            # 400x600 RGB
    "coins": partial(_skimage, "coins"),                              # 303x384 gray
    "hubble_deep_field": partial(_skimage, "hubble_deep_field"),      # 872x1000 RGB
    "immunohistochemistry": partial(_skimage, "immunohistochemistry"),  # 512x512 RGB microscopy
    "moon": partial(_skimage, "moon"),                                # 512x512 gray
    "motorcycle": partial(_skimage, "motorcycle"),                    # 500x741 RGB (left view of stereo_motorcycle)
    "rocket": partial(_skimage, "rocket"),                            # 427x640 RGB
    "china": partial(_sklearn, "china.jpg"),                          # 427x640 RGB (scikit-learn)
    "flower": partial(_sklearn, "flower.jpg"),                        # 427x640 RGB (scikit-learn)
}


class PhotoSRDataModule(_SRDataModule):
    """Super-resolution on real photographs bundled with scikit-image and scikit-learn (no download).

    Training uses ``patches_per_epoch`` random HR crops of the ``train`` photos; validation and test use
    the whole held-out ``val`` and ``test`` photos (modcropped). By default: train on astronaut, coffee,
    rocket, motorcycle, china and coins; validate on chelsea; test on flower and camera (a grayscale
    photo, replicated to RGB). A photo may appear in one split only.

    Args:
        scale: downscaling factor (2, 3, 4...).
        crop_size: side of the HR training crops (a multiple of ``scale``).
        batch_size: training crops per batch (evaluation uses whole photos, one per batch).
        patches_per_epoch: training crops per epoch.
        train / val / test: photo names from :data:`PHOTOS`.
        augment: random flips and transposition of the training crops.
        quantize: round LR images to 8-bit levels.
        num_workers: DataLoader workers (the photos are decoded once and kept in memory).
    """

    cache_training_images = True

    def __init__(self, scale: int = 2, crop_size: int = 64, batch_size: int = 16, patches_per_epoch: int = 1600,
                 train: Sequence[str] = ("astronaut", "coffee", "rocket", "motorcycle", "china", "coins"),
                 val: Sequence[str] = ("chelsea",), test: Sequence[str] = ("flower", "camera"),
                 augment: bool = True, quantize: bool = True, num_workers: int = 0) -> None:
        super().__init__(scale, crop_size, batch_size, patches_per_epoch, augment, True, quantize, num_workers)
        self.save_hyperparameters()
        self.names = {"train": list(train), "val": list(val), "test": list(test)}
        seen: dict[str, str] = {}
        for split, names in self.names.items():
            if not names:
                raise ValueError(f"PhotoSRDataModule: the {split} split has no photos")
            for name in names:
                if name not in PHOTOS:
                    raise ValueError(f"PhotoSRDataModule: unknown photo {name!r} in {split}; "
                                     f"available: {', '.join(PHOTOS)}")
                if name in seen:
                    raise ValueError(f"PhotoSRDataModule: photo {name!r} is in both {seen[name]} and {split}; "
                                     "held-out photos must not be trained on")
                seen[name] = split

    def _split_images(self) -> dict[str, list[HRImage]]:
        out: dict[str, list[HRImage]] = {}
        for split, names in self.names.items():
            out[split] = []
            for name in names:
                tensor = _rgb_tensor(PHOTOS[name]())
                out[split].append(HRImage(name, tensor.shape[1], tensor.shape[2], partial(_identity, tensor)))
        return out


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _read_image(path: Path) -> Tensor:
    with Image.open(path) as image:
        return _rgb_tensor(np.asarray(image.convert("RGB")))


def _folder_images(folder: Path, extensions: Sequence[str]) -> list[HRImage]:
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageFolderSRDataModule: folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions)
    if not paths:
        raise FileNotFoundError(f"ImageFolderSRDataModule: no images ({', '.join(extensions)}) in {str(folder)!r}")
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size  # reads the header only
        except OSError as error:
            raise ValueError(f"ImageFolderSRDataModule: cannot read image {str(path)!r}: {error}") from error
        images.append(HRImage(str(path), height, width, partial(_read_image, path)))
    return images


class ImageFolderSRDataModule(_SRDataModule):
    """Super-resolution on folders of HR images (DIV2K, Flickr2K, Set5, Set14, BSD100, Urban100...).

    ``root/<train_dir>`` holds the training images (random crops), ``root/<val_dir>`` and
    ``root/<test_dir>`` the evaluation images (whole, modcropped); the split folders may also be absolute
    paths. A missing ``test_dir`` folder falls back to ``val_dir``. LR images are made by bicubic
    degradation of the HR images (the "BI" protocol), so only HR images are needed. Example for DIV2K
    with Set5 as test set: ``root=~/data, train_dir=DIV2K/DIV2K_train_HR, val_dir=DIV2K/DIV2K_valid_HR,
    test_dir=Set5/HR``.

    Args:
        root: dataset folder.
        scale: downscaling factor.
        crop_size: side of the HR training crops (a multiple of ``scale``); every training image must be
            at least this large (an error names the first one that is not).
        batch_size: training crops per batch.
        patches_per_epoch: training crops per epoch (images are cycled through, one crop per visit).
        train_dir / val_dir / test_dir: split folders, relative to ``root`` or absolute.
        modcrop: centre-crop evaluation images to a multiple of ``scale``; with ``False``, an image the
            scale does not divide is an error naming it.
        augment: random flips and transposition of the training crops.
        quantize: round LR images to 8-bit levels.
        cache: keep decoded training images in memory (fast, but DIV2K's 800 images take ~6.6 GB).
        num_workers: DataLoader workers (decoding PNGs is the bottleneck for large images).
        extensions: file suffixes treated as images.
    """

    def __init__(self, root: str | Path, scale: int = 2, crop_size: int = 96, batch_size: int = 16,
                 patches_per_epoch: int = 1600, train_dir: str = "train", val_dir: str = "val",
                 test_dir: str = "test", modcrop: bool = True, augment: bool = True, quantize: bool = True,
                 cache: bool = False, num_workers: int = 2,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        super().__init__(scale, crop_size, batch_size, patches_per_epoch, augment, modcrop, quantize, num_workers)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderSRDataModule: root {str(self.root)!r} does not exist")
        self.save_hyperparameters()
        self.cache_training_images = cache
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        test = self.root / test_dir
        self.folders = {"train": self.root / train_dir, "val": self.root / val_dir,
                        "test": test if test.is_dir() else self.root / val_dir}

    def _split_images(self) -> dict[str, list[HRImage]]:
        return {split: _folder_images(folder, self.extensions) for split, folder in self.folders.items()}
