"""A procedural object-detection dataset that needs no download: coloured shapes on cluttered, noisy images.

Every sample is generated from its own seed ``(seed, split, index)`` (numpy ``SeedSequence``), so a
sample is the same whatever the order, the number of workers or the DDP rank that asks for it, and
the train/val/test splits never share a sample. Four object classes (circle, square, triangle,
cross) appear at random sizes (log-uniform), rotations and colours (kept away from the colour
underneath) and may overlap, each keeping at least ``1 - max_occlusion`` of its pixels
visible; they sit on a colour-gradient background with distractor lines and dots ("clutter",
thinner or smaller than any object) and Gaussian noise.

Boxes are the tight pixel extent of each shape as drawn (before any later shape or clutter covers
part of it), so they are always inside the image and non-degenerate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_effnets.data.detection import DetectionTarget, check_boxes, detection_collate, make_target

__all__ = ["SHAPE_CLASSES", "ShapesConfig", "ShapesDetection", "ShapesDetectionDataModule", "render_shapes"]

#: Class names, in label order.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
_SPLITS = {"train": 0, "val": 1, "test": 2}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CROSS_HALF_WIDTH = 0.3  # arm half-width of a cross, relative to its radius


@dataclass(frozen=True)
class ShapesConfig:
    """What a generated image looks like (all sizes in pixels)."""

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 10.0
    max_size: float = 40.0
    max_occlusion: float = 0.3
    clutter: int = 8
    noise_std: float = 0.08

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 4 <= self.min_size <= self.max_size <= 0.8 * self.image_size:
            raise ValueError(f"need 4 <= min_size <= max_size <= 0.8 * image_size ({0.8 * self.image_size:g}); "
                             f"got min_size={self.min_size}, max_size={self.max_size}")
        if not 0 <= self.min_objects <= self.max_objects or self.max_objects < 1:
            raise ValueError(f"need 0 <= min_objects <= max_objects and max_objects >= 1; "
                             f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        if not 0.0 <= self.max_occlusion < 1.0:
            raise ValueError(f"max_occlusion is a fraction of an object's pixels and must be in [0, 1), "
                             f"got {self.max_occlusion}")
        if self.clutter < 0 or self.noise_std < 0:
            raise ValueError(f"clutter and noise_std must be >= 0, got {self.clutter} and {self.noise_std}")


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Pixels (centres ``xs, ys``) inside a convex polygon: on the same side of every edge."""
    inside_pos = np.ones(xs.shape, dtype=bool)
    inside_neg = np.ones(xs.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    return inside_pos | inside_neg


def _rotation(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _shape_mask(label: int, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, radius: float,
                theta: float) -> np.ndarray:
    """Mask of shape ``label`` with centre ``(cx, cy)``, circumradius ``radius`` and rotation ``theta``."""
    if label == 0:  # circle
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    if label in (1, 2):  # square, triangle: regular polygons inscribed in the circle
        k = 4 if label == 1 else 3
        angles = theta + 2 * math.pi * np.arange(k) / k
        vertices = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        return _polygon_mask(xs, ys, vertices)
    # cross: union of two perpendicular bars
    w = _CROSS_HALF_WIDTH * radius
    bar = np.array([[-radius, -w], [radius, -w], [radius, w], [-radius, w]])
    mask = np.zeros(xs.shape, dtype=bool)
    for extra in (0.0, math.pi / 2):
        vertices = bar @ _rotation(theta + extra).T + np.array([cx, cy])
        mask |= _polygon_mask(xs, ys, vertices)
    return mask


def _reach(label: int) -> float:
    """Farthest point of a shape from its centre, in units of its radius."""
    return math.hypot(1.0, _CROSS_HALF_WIDTH) if label == 3 else 1.0


def _pick_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour that stands out from ``background`` in RGB and in luminance (for grayscale inputs)."""
    colour = rng.uniform(0, 1, 3)
    for _ in range(20):
        if np.linalg.norm(colour - background) >= 0.4 and abs(float((colour - background) @ _LUMA)) >= 0.15:
            break
        colour = rng.uniform(0, 1, 3)
    return colour.astype(np.float32)


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                  max_radius: float) -> None:
    """One distractor: a thin line segment or a dot smaller than any object."""
    size = image.shape[0]
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    if rng.random() < 0.5:
        p0 = rng.uniform(0, size, 2)
        p1 = p0 + rng.uniform(-size / 2, size / 2, 2)
        d = p1 - p0
        t = np.clip(((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
        mask = (xs - p0[0] - t * d[0]) ** 2 + (ys - p0[1] - t * d[1]) ** 2 <= rng.uniform(0.4, 0.9) ** 2
    else:
        c = rng.uniform(0, size, 2)
        mask = (xs - c[0]) ** 2 + (ys - c[1]) ** 2 <= rng.uniform(0.8, max_radius) ** 2
    image[mask] = colour


def render_shapes(rng: np.random.Generator, config: ShapesConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image: returns ``(image float32[H, W, 3] in [0, 1], boxes float32[N, 4], labels int64[N])``."""
    size = config.image_size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # background: a linear gradient between two random colours
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    ramp = (xs * direction[0] + ys * direction[1]) / size
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = (c0 + (c1 - c0) * ramp[..., None] * rng.uniform(0.2, 1.0)).astype(np.float32)

    num_clutter = int(rng.integers(0, config.clutter + 1))
    clutter_after = rng.random(num_clutter) < 0.5
    dot_radius = max(0.9, min(2.5, config.min_size / 4))
    for after in clutter_after:
        if not after:
            _draw_clutter(rng, image, xs, ys, dot_radius)

    boxes: list[np.ndarray] = []
    labels: list[int] = []
    areas: list[int] = []
    visible: list[int] = []
    owner = np.full((size, size), -1, dtype=np.int16)  # index of the top-most object at each pixel
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        for _attempt in range(30):
            label = int(rng.integers(len(SHAPE_CLASSES)))
            radius = 0.5 * math.exp(rng.uniform(math.log(config.min_size), math.log(config.max_size)))
            reach = radius * _reach(label)
            if 2 * reach >= size - 1:
                continue
            cx, cy = rng.uniform(reach, size - reach, 2)
            theta = float(rng.uniform(0, 2 * math.pi))
            x0, x1 = max(0, int(cx - reach) - 1), min(size, int(cx + reach) + 2)
            y0, y1 = max(0, int(cy - reach) - 1), min(size, int(cy + reach) + 2)
            local = _shape_mask(label, xs[y0:y1, x0:x1], ys[y0:y1, x0:x1], cx, cy, radius, theta)
            if not local.any():
                continue
            # the new shape is drawn on top: it may hide at most max_occlusion of any earlier object
            covered = np.bincount(owner[y0:y1, x0:x1][local] + 1, minlength=len(boxes) + 1)[1:]
            if any(v - c < (1 - config.max_occlusion) * a for v, c, a in zip(visible, covered, areas)):
                continue
            rows, cols = np.nonzero(local)
            boxes.append(np.array([x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1],
                                  dtype=np.float32))
            labels.append(label)
            visible[:] = [v - c for v, c in zip(visible, covered)]
            areas.append(int(local.sum()))
            visible.append(areas[-1])
            owner[y0:y1, x0:x1][local] = len(boxes) - 1
            # stand out from whatever lies underneath (background, clutter or earlier objects)
            image[y0:y1, x0:x1][local] = _pick_colour(rng, image[y0:y1, x0:x1][local].mean(axis=0))
            break

    for after in clutter_after:
        if after:
            _draw_clutter(rng, image, xs, ys, dot_radius)
    if config.noise_std > 0:
        image += rng.normal(0.0, rng.uniform(0, config.noise_std), image.shape).astype(np.float32)
    np.clip(image, 0, 1, out=image)
    out_boxes = np.stack(boxes) if boxes else np.zeros((0, 4), dtype=np.float32)
    return image, out_boxes, np.asarray(labels, dtype=np.int64)


class ShapesDetection(Dataset):
    """``num_samples`` generated images of one split; sample ``i`` is drawn from seed ``(seed, split, i)``."""

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0, config: ShapesConfig | None = None,
                 in_chans: int = 3) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.num_samples, self.split, self.seed = num_samples, split, seed
        self.config = config or ShapesConfig()
        self.in_chans = in_chans

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, DetectionTarget]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        image, boxes, labels = render_shapes(rng, self.config)
        if self.in_chans == 1:
            image = image @ _LUMA[:, None]
        size = self.config.image_size
        boxes_t = torch.from_numpy(boxes)
        check_boxes(boxes_t, size, size, f"ShapesDetection({self.split!r}, seed={self.seed})[{index}]")
        image_id = _SPLITS[self.split] * 10_000_000 + index
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), make_target(
            boxes_t, torch.from_numpy(labels), image_id)


class ShapesDetectionDataModule(pl.LightningDataModule):
    """Train/val/test splits of the procedural shapes dataset (see module docstring).

    Args:
        batch_size: images per batch.
        image_size: side of the square images.
        in_chans: 3 (RGB) or 1 (luminance).
        num_train / num_val / num_test: images per split.
        min_objects / max_objects: objects per image (uniform).
        min_size / max_size: object diameter range in pixels (log-uniform).
        max_occlusion: largest fraction of an object's pixels that objects drawn later may cover.
        clutter: at most this many distractor lines/dots per image.
        noise_std: Gaussian noise std is drawn per image from [0, noise_std].
        seed: dataset seed; the same seed gives the same images everywhere.
        num_workers: DataLoader workers (generation is cheap; 0 is fine for small images).
    """

    num_classes = len(SHAPE_CLASSES)
    class_names = SHAPE_CLASSES

    def __init__(self, batch_size: int = 32, image_size: int = 96, in_chans: int = 3, num_train: int = 2000,
                 num_val: int = 200, num_test: int = 200, min_objects: int = 1, max_objects: int = 6,
                 min_size: float = 10.0, max_size: float = 40.0, max_occlusion: float = 0.3, clutter: int = 8,
                 noise_std: float = 0.08, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.config = ShapesConfig(image_size=image_size, min_objects=min_objects, max_objects=max_objects,
                                   min_size=min_size, max_size=max_size, max_occlusion=max_occlusion, clutter=clutter,
                                   noise_std=noise_std)
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.save_hyperparameters()
        self.batch_size, self.image_size, self.in_chans = batch_size, image_size, in_chans
        self.splits: dict[str, ShapesDetection] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        for split, n in (("train", hp.num_train), ("val", hp.num_val), ("test", hp.num_test)):
            self.splits[split] = ShapesDetection(n, split, hp.seed, self.config, hp.in_chans)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=workers,
                          collate_fn=detection_collate, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)

