"""A procedural multi-camera person re-identification benchmark that needs no download.

Identities are person-like figures with their own clothing (top and bottom colours, top pattern, sleeve and
trouser length, skirt), hair, hat, bag and build. Each camera has its own *style*: colour cast, brightness,
contrast, blur, resolution, figure scale within the crop, sensor noise and background scene; every image adds
pose (walking phase, facing direction), position, clutter and the odd occluder. Some cameras are held out of
training entirely, so test metrics on them measure cross-camera generalisation -- the setting camera-based batch
norm (arXiv:2001.08680) addresses.

Everything is drawn from ``numpy`` generators keyed by ``(seed, split, identity, camera, image)``, so the data are
identical on every run and rank, and changing the size of one split leaves the others unchanged. Figures are
rendered at twice the output resolution with vectorised masks in torch and box-filtered down (anti-aliasing).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from lightning_effnets.data.reid import ReIDDataModule, ReIDDataset, reid_transform

__all__ = ["CameraStyle", "MultiCameraReIDDataModule", "camera_style", "render_identities"]

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_SKIN = np.array([[0.96, 0.80, 0.69], [0.89, 0.67, 0.53], [0.76, 0.55, 0.40], [0.55, 0.37, 0.25],
                  [0.36, 0.24, 0.16]])
_HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.09], [0.75, 0.62, 0.35], [0.55, 0.55, 0.55],
                  [0.55, 0.20, 0.08]])


@dataclass(frozen=True)
class CameraStyle:
    """How one camera renders a scene (applied after the figure is drawn)."""

    gains: tuple[float, float, float]  # per-channel colour cast
    brightness: float  # multiplicative exposure
    gamma: float  # contrast curve, out = in ** gamma
    blur_sigma: float  # Gaussian blur in output pixels
    resolution: float  # fraction of the output resolution the camera resolves (far/low-res cameras < 1)
    zoom: float  # figure height as a fraction of the crop (detector box tightness / distance)
    noise: float  # sensor noise standard deviation
    background: tuple[float, float, float]  # scene colour


def _hsv(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)))


def camera_style(seed: int, camera: int, strength: float = 1.0) -> CameraStyle:
    """The style of ``camera``; ``strength`` scales how far styles depart from a neutral camera."""
    rng = np.random.default_rng([seed, 7, camera])
    s = strength
    gains = np.exp(rng.uniform(-0.35, 0.35, 3) * s)
    gains = gains / gains.mean()
    return CameraStyle(
        gains=tuple(float(g) for g in gains),
        brightness=float(np.exp(rng.uniform(-0.5, 0.25) * s)),
        gamma=float(np.exp(rng.uniform(-0.35, 0.35) * s)),
        blur_sigma=float(rng.uniform(0.0, 1.1) * s),
        resolution=float(1.0 - rng.uniform(0.0, 0.55) * min(s, 1.0)),
        zoom=float(1.0 - rng.uniform(0.04, 0.3) * min(s, 1.0)),
        noise=float(rng.uniform(0.0, 0.05) * s),
        background=tuple(float(c) for c in _hsv(rng, (0.05, 0.5), (0.25, 0.8))),
    )


def _identity_attributes(seed: int, split: int, identity: int) -> dict[str, np.ndarray | float | int]:
    rng = np.random.default_rng([seed, 1, split, identity])
    return {
        "skin": _SKIN[rng.integers(len(_SKIN))], "hair": _HAIR[rng.integers(len(_HAIR))],
        "long_hair": float(rng.random() < 0.35),
        "top": _hsv(rng, (0.35, 1.0), (0.25, 1.0)), "top2": _hsv(rng, (0.0, 1.0), (0.1, 1.0)),
        "pattern": int(rng.integers(6)), "period": rng.uniform(0.035, 0.07),
        "short_sleeves": float(rng.random() < 0.4),
        "bottom": _hsv(rng, (0.1, 0.9), (0.15, 0.9)), "lower": int(rng.choice(3, p=[0.6, 0.2, 0.2])),
        "shoes": _hsv(rng, (0.0, 0.6), (0.05, 0.6)),
        "hat": float(rng.random() < 0.2), "hat_colour": _hsv(rng, (0.2, 1.0), (0.2, 1.0)),
        "bag": int(rng.integers(4)), "bag_colour": _hsv(rng, (0.2, 1.0), (0.1, 0.9)),
        "width": rng.uniform(0.85, 1.2), "height": rng.uniform(0.9, 1.04),
    }


def _image_nuisance(seed: int, split: int, identity: int, camera: int, index: int) -> dict[str, np.ndarray | float]:
    rng = np.random.default_rng([seed, 2, split, identity, camera, index])
    return {
        "flip": float(rng.random() < 0.5), "dx": rng.uniform(-0.05, 0.05), "dy": rng.uniform(-0.025, 0.025),
        "scale": rng.uniform(0.94, 1.06), "phase": rng.uniform(0, 2 * np.pi),
        "bg_shift": rng.uniform(-0.12, 0.12, 3), "floor": rng.uniform(0.7, 0.95),
        "clutter": rng.uniform(0, 1, (2, 4)), "clutter_colour": rng.uniform(-0.25, 0.25, (2, 3)),
        "occluder": float(rng.random() < 0.12), "occluder_top": rng.uniform(0.7, 0.85),
        "occluder_colour": rng.uniform(0.1, 0.9, 3), "noise_seed": int(rng.integers(2**31 - 1)),
    }


def _stack(records: list[dict], key: str) -> Tensor:
    return torch.as_tensor(np.stack([np.asarray(r[key], dtype=np.float32) for r in records]))


# part labels of the label map; each image has its own colour for every part
_BG, _FLOOR, _CLUTTER1, _CLUTTER2, _SKIN_L, _HAIR_L, _TOP, _TOP2, _BOTTOM, _SHOES, _BAG, _HAT, _OCCLUDER = range(13)


def _draw_figures(attrs: list[dict], nuisances: list[dict], zoom: Tensor, background: Tensor,
                  height: int, width: int) -> Tensor:
    """Render ``N`` figures on their backgrounds: float ``[N, 3, height, width]`` (before camera effects).

    Parts are painted (in back-to-front order) into an integer label map, then every pixel takes its image's
    colour for that part: one gather instead of an RGB blend per part.
    """
    n = len(attrs)
    ys = ((torch.arange(height) + 0.5) / height).view(1, height, 1)
    xs = ((torch.arange(width) + 0.5 - width / 2) / height).view(1, 1, width)

    def col(records: list[dict], key: str) -> Tensor:
        values = _stack(records, key)
        return values.view(n, 1, 1) if values.ndim == 1 else values

    labels = torch.full((n, height, width), _BG, dtype=torch.uint8)

    def paint(mask: Tensor, label: int) -> None:
        labels.masked_fill_(mask.expand(n, height, width), label)

    # background: scene, darker floor, two clutter boxes
    paint(ys > col(nuisances, "floor"), _FLOOR)
    clutter = _stack(nuisances, "clutter")
    x_full = xs * height / width + 0.5  # x in [0, 1] across the crop
    for b, label in enumerate((_CLUTTER1, _CLUTTER2)):
        x0, y0, bw, bh = (clutter[:, b, i].view(n, 1, 1) for i in range(4))
        paint((x_full > x0 - 0.3) & (x_full < x0 - 0.2 + 0.3 * bw) & (ys > y0 * 0.8) & (ys < y0 * 0.8 + 0.3 * bh),
              label)

    # figure coordinates: u across (mirrored when facing the other way), v down, both in figure heights
    fig_h = zoom.view(n, 1, 1) * col(attrs, "height") * col(nuisances, "scale")
    top = 0.5 - fig_h / 2 + col(nuisances, "dy")
    mirror = 1 - 2 * col(nuisances, "flip")
    u = (xs - col(nuisances, "dx")) / fig_h * mirror
    v = (ys - top) / fig_h
    wf = col(attrs, "width")
    swing = 0.12 * torch.sin(col(nuisances, "phase"))
    spread = 0.05 * torch.cos(col(nuisances, "phase")).abs()
    pattern, lower, bag = col(attrs, "pattern"), col(attrs, "lower"), col(attrs, "bag")

    def band(lo: float | Tensor, hi: float | Tensor, x: Tensor) -> Tensor:
        return (x >= lo) & (x < hi)

    # long hair behind the head
    paint((col(attrs, "long_hair") > 0) & (((u / 0.075) ** 2 + ((v - 0.13) / 0.1) ** 2) < 1), _HAIR_L)
    # legs (bare below shorts or a skirt), skirt, shoes
    legs = torch.zeros(n, height, width, dtype=torch.bool)
    shoe_mask = torch.zeros_like(legs)
    for side in (-1.0, 1.0):
        centre = side * (0.055 * wf + spread * (v - 0.53) / 0.4)
        legs |= ((u - centre).abs() < 0.05 * wf) & band(0.53, 0.93, v)
        shoe_mask |= ((u - centre).abs() < 0.058 * wf) & band(0.93, 0.975, v)
    bare = ((lower == 1) & (v > 0.68)) | (lower == 2)
    paint(legs & ~bare, _BOTTOM)
    paint(legs & bare, _SKIN_L)
    paint((lower == 2) & band(0.52, 0.73, v) & (u.abs() < wf * (0.12 + 0.08 * (v - 0.52) / 0.21)), _BOTTOM)
    paint(shoe_mask, _SHOES)
    # backpack peeking out behind one shoulder
    paint((bag == 1) & band(0.19, 0.46, v) & band(0.1 * wf, 0.1 * wf + 0.09, u), _BAG)
    # torso with its pattern
    torso = band(0.17, 0.53, v) & (u.abs() < wf * (0.15 - 0.03 * (v - 0.17) / 0.36))
    period = col(attrs, "period")
    stripe_h = torch.floor((v - 0.17) / period) % 2 == 1
    stripe_v = torch.floor(u / period + 100) % 2 == 1
    second = ((pattern == 1) & stripe_h) | ((pattern == 2) & stripe_v) | ((pattern == 3) & (stripe_h ^ stripe_v))
    second |= (pattern == 4) & (u.abs() < 0.045 * wf)  # open jacket
    second |= (pattern == 5) & band(-0.05, 0.05, u) & band(0.24, 0.32, v)  # chest logo
    paint(torso & ~second, _TOP)
    paint(torso & second, _TOP2)
    # straps of the backpack / shoulder bag across the torso
    straps = (bag == 1) & band(0.17, 0.40, v) & (((u - 0.07 * wf).abs() < 0.014) | ((u + 0.07 * wf).abs() < 0.014))
    straps |= (bag == 2) & torso & ((u - (0.12 * wf - (v - 0.17) * 0.65)).abs() < 0.016)
    paint(straps, _BAG)
    # arms (swinging) with long or short sleeves, hands
    sleeve_end = torch.where(col(attrs, "short_sleeves") > 0, 0.27, 0.50)
    for side in (-1.0, 1.0):
        centre = side * (0.155 * wf + 0.03) + side * swing * (v - 0.18)
        arm = ((u - centre).abs() < 0.03) & band(0.18, 0.50, v)
        paint(arm & (v < sleeve_end), _TOP)
        paint(arm & (v >= sleeve_end), _SKIN_L)
        paint(((u - centre).abs() < 0.028) & band(0.50, 0.54, v), _SKIN_L)
    # bags carried on the side
    paint((bag == 2) & band(0.42, 0.56, v) & band(0.13 * wf, 0.13 * wf + 0.1, u), _BAG)
    paint((bag == 3) & band(0.47, 0.60, v) & band(-0.2 * wf - 0.11, -0.2 * wf, u), _BAG)
    # neck, head, hair, hat
    paint((u.abs() < 0.025) & band(0.14, 0.18, v), _SKIN_L)
    head = ((u / 0.055) ** 2 + ((v - 0.085) / 0.068) ** 2) < 1
    paint(head, _SKIN_L)
    paint(head & (v < 0.06), _HAIR_L)
    paint((col(attrs, "hat") > 0) & ((band(0.0, 0.05, v) & (u.abs() < 0.062))
                                     | (band(0.045, 0.062, v) & (u.abs() < 0.09))), _HAT)
    # occluder in front of the legs (a bench, a passer-by's bag)
    paint((col(nuisances, "occluder") > 0) & (ys > col(nuisances, "occluder_top")) & (x_full < 0.75), _OCCLUDER)

    bg = (background + _stack(nuisances, "bg_shift")).clamp(0, 1)
    clutter_colour = _stack(nuisances, "clutter_colour")
    palette = torch.stack([
        bg, bg * 0.7, (bg + clutter_colour[:, 0]).clamp(0, 1), (bg + clutter_colour[:, 1]).clamp(0, 1),
        *(_stack(attrs, k) for k in ("skin", "hair", "top", "top2", "bottom", "shoes", "bag_colour", "hat_colour")),
        _stack(nuisances, "occluder_colour"),
    ], dim=1)  # [N, parts, 3]
    canvas = palette[torch.arange(n).view(n, 1, 1), labels.long()]  # [N, H, W, 3]
    return canvas.permute(0, 3, 1, 2).contiguous()


def _apply_camera(images: Tensor, style: CameraStyle, noise_seeds: list[int]) -> Tensor:
    """Camera effects on ``[N, 3, H, W]`` images of one camera: resolution, blur, colour, exposure, noise."""
    n, _, h, w = images.shape
    if style.resolution < 0.99:
        low = (max(4, round(h * style.resolution)), max(2, round(w * style.resolution)))
        images = F.interpolate(F.interpolate(images, size=low, mode="bilinear", antialias=True, align_corners=False),
                               size=(h, w), mode="bilinear", align_corners=False)
    if style.blur_sigma > 0.25:
        kernel = 2 * int(np.ceil(2.5 * style.blur_sigma)) + 1
        images = TF.gaussian_blur(images, [kernel, kernel], [style.blur_sigma, style.blur_sigma])
    gains = torch.tensor(style.gains, dtype=images.dtype).view(1, 3, 1, 1)
    images = (images.clamp(0, 1) ** style.gamma) * gains * style.brightness
    if style.noise > 0:
        noise = torch.stack([torch.from_numpy(np.random.default_rng(s).standard_normal((3, h, w), dtype=np.float32))
                             for s in noise_seeds])
        images = images + style.noise * noise
    return images.clamp(0, 1)


def render_identities(seed: int, split: str, identities: list[int], cameras: list[int], images_per_camera: int,
                      image_size: tuple[int, int], camera_strength: float = 1.0,
                      supersample: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Render every identity on every camera ``images_per_camera`` times, ordered by identity then camera.

    Returns uint8 images ``[N, 3, H, W]``, identity, camera and image-index-within-(identity, camera) tensors.
    """
    code = _SPLIT_CODES[split]
    h, w = image_size
    records = [(i, c, k) for i in identities for c in cameras for k in range(images_per_camera)]
    out = torch.empty(len(records), 3, h, w, dtype=torch.uint8)
    attrs = {i: _identity_attributes(seed, code, i) for i in identities}
    styles = {c: camera_style(seed, c, camera_strength) for c in cameras}
    by_camera: dict[int, list[int]] = {}
    for row, (_, c, _) in enumerate(records):
        by_camera.setdefault(c, []).append(row)
    for camera, rows in by_camera.items():
        style = styles[camera]
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            nuis = [_image_nuisance(seed, code, records[r][0], camera, records[r][2]) for r in chunk]
            zoom = torch.full((len(chunk),), style.zoom)
            background = torch.tensor(style.background, dtype=torch.float32).expand(len(chunk), 3)
            big = _draw_figures([attrs[records[r][0]] for r in chunk], nuis, zoom, background,
                                h * supersample, w * supersample)
            small = F.avg_pool2d(big, supersample) if supersample > 1 else big
            images = _apply_camera(small, style, [nz["noise_seed"] for nz in nuis])
            out[chunk] = (images * 255).round().to(torch.uint8)
    ids = torch.tensor([r[0] for r in records])
    cams = torch.tensor([r[1] for r in records])
    index = torch.tensor([r[2] for r in records])
    return out, ids, cams, index


class MultiCameraReIDDataModule(ReIDDataModule):
    """Procedural person re-identification seen by ``num_cameras`` cameras, some held out of training.

    Three disjoint sets of identities: training identities are seen by every *seen* camera; validation
    identities by the seen cameras only (so model selection never looks at held-out cameras); test identities by
    every camera. Each evaluation identity has one query per camera, the rest of its images are gallery. Test
    metrics are reported overall and for ``seen`` and ``held_out`` camera groups (each group evaluated on its own
    cameras, see :class:`lightning_effnets.metrics.ReIDMetric`).

    Args:
        num_cameras: cameras in total.
        held_out_cameras: number of cameras (the last ones) held out of training, or an explicit list of ids.
            Use at least 2 so the held-out group has cross-camera matches.
        num_train_ids / num_val_ids / num_test_ids: identities per split (training ones are the classes).
        train_images_per_camera / eval_images_per_camera: images of each identity per camera
            (``eval_images_per_camera >= 2``: one query and at least one gallery image per camera).
        camera_strength: how different cameras look (0 = identical cameras).
        image_size, p, k, eval_batch_size, augment, num_workers, seed: see :class:`ReIDDataModule`;
            ``seed`` also fixes the generated data.
    """

    def __init__(self, num_cameras: int = 8, held_out_cameras: int | list[int] = 3, num_train_ids: int = 150,
                 num_val_ids: int = 40, num_test_ids: int = 60, train_images_per_camera: int = 3,
                 eval_images_per_camera: int = 3, camera_strength: float = 1.0,
                 image_size: tuple[int, int] = (64, 32), p: int = 16, k: int = 4, eval_batch_size: int = 128,
                 augment: bool = True, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(image_size, p, k, eval_batch_size, augment, num_workers, seed)
        if num_cameras < 2:
            raise ValueError(f"num_cameras must be >= 2, got {num_cameras}")
        held = (list(range(num_cameras - held_out_cameras, num_cameras)) if isinstance(held_out_cameras, int)
                else sorted(set(int(c) for c in held_out_cameras)))
        if any(not 0 <= c < num_cameras for c in held) or len(held) > num_cameras - 1:
            raise ValueError(f"held_out_cameras {held_out_cameras} must leave at least one of the {num_cameras} "
                             "cameras for training and name cameras in [0, num_cameras)")
        if min(num_train_ids, num_val_ids, num_test_ids) < 2:
            raise ValueError("every split needs at least 2 identities")
        if train_images_per_camera < 1 or eval_images_per_camera < 2:
            raise ValueError("train_images_per_camera must be >= 1 and eval_images_per_camera >= 2 (one query plus "
                             "gallery images per camera)")
        if camera_strength < 0:
            raise ValueError(f"camera_strength must be >= 0, got {camera_strength}")
        self.save_hyperparameters()
        self.num_cameras = num_cameras
        self.held_out_cameras = held
        self.num_classes = num_train_ids

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        first_val, first_test = hp.num_train_ids, hp.num_train_ids + hp.num_val_ids
        plan = {
            "train": (list(range(hp.num_train_ids)), self.seen_cameras, hp.train_images_per_camera),
            "val": (list(range(first_val, first_test)), self.seen_cameras, hp.eval_images_per_camera),
            "test": (list(range(first_test, first_test + hp.num_test_ids)), list(range(self.num_cameras)),
                     hp.eval_images_per_camera),
        }
        for split, (ids, cameras, per_camera) in plan.items():
            images, pids, cams, index = render_identities(hp.seed, split, ids, cameras, per_camera, self.image_size,
                                                          hp.camera_strength)
            if split == "train":
                self.splits[split] = ReIDDataset(pids, cams, images=images,
                                                 transform=reid_transform(self.image_size, self.augment, resize=False))
            else:
                self.splits[split] = ReIDDataset(pids, cams, index == 0, images=images,
                                                 transform=reid_transform(self.image_size, False, resize=False))
