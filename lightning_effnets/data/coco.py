"""A reader for object-detection data in the standard COCO json format, so the task runs on real data.

Layout (paths relative to ``root``; the names are arguments)::

    root/images/<file_name>            the files named by the json's "images"
    root/annotations.json              {"images": [...], "annotations": [...], "categories": [...]}

``bbox`` is COCO's ``[x, y, width, height]`` in pixels; categories are mapped, in increasing ``id``
order, to contiguous labels ``0..K-1`` (``class_names`` keeps their names). Crowd annotations
(``iscrowd: 1``) are kept with ``iscrowd=1`` in the target: the loss ignores them and the mAP
metric treats them as COCO does. Images are letterboxed to ``image_size`` (see
:func:`~lightning_effnets.data.detection.letterbox`); boxes follow.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from lightning_effnets.data.detection import DetectionTarget, check_boxes, detection_collate, letterbox, make_target

__all__ = ["CocoDetection", "CocoDetectionDataModule", "load_coco_annotations"]


def load_coco_annotations(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a COCO detection json (errors name the file and the fix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {str(path)!r} does not exist")
    with path.open() as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: a COCO detection file needs a list under {key!r}")
    if not data["categories"]:
        raise ValueError(f"{path}: 'categories' is empty; list the object classes as "
                         "{'id': int, 'name': str} entries")
    image_ids = [im["id"] for im in data["images"]]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"{path}: duplicate image ids in 'images'")
    return data


class CocoDetection(Dataset):
    """The images of one COCO json (optionally only ``image_ids``), letterboxed to ``image_size``.

    Args:
        image_dir: folder the json's ``file_name`` entries are relative to.
        annotations: the parsed json (:func:`load_coco_annotations`).
        categories: COCO category ids in label order (shared by all splits).
        image_size: side of the square network input.
        in_chans: 3 (RGB) or 1 (grayscale).
        image_ids: subset of image ids (default all, in file order).
        invalid_boxes: ``"error"`` raises on a degenerate/non-finite box naming the file and annotation id;
            ``"drop"`` skips such annotations.
        augment: random horizontal flips.
        source: name of the json for error messages.
    """

    def __init__(self, image_dir: str | Path, annotations: dict[str, Any], categories: list[int], image_size: int,
                 in_chans: int = 3, image_ids: list[int] | None = None,
                 invalid_boxes: Literal["error", "drop"] = "error", augment: bool = False,
                 source: str = "annotations") -> None:
        if invalid_boxes not in ("error", "drop"):
            raise ValueError(f"invalid_boxes must be 'error' or 'drop', got {invalid_boxes!r}")
        self.image_dir = Path(image_dir)
        self.image_size, self.in_chans, self.augment = image_size, in_chans, augment
        self.invalid_boxes, self.source = invalid_boxes, source
        self.label_of = {cat: i for i, cat in enumerate(categories)}
        images = {im["id"]: im for im in annotations["images"]}
        ids = list(images) if image_ids is None else list(image_ids)
        self.images = [images[i] for i in ids]
        self.annotations: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for ann in annotations["annotations"]:
            self.annotations[ann["image_id"]].append(ann)
        for info in self.images:  # fail at construction, not in the middle of an epoch
            self._boxes(info, info.get("width"), info.get("height"))

    def __len__(self) -> int:
        return len(self.images)

    def _boxes(self, info: dict[str, Any], width: int | None, height: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """Valid ``(xyxy boxes, labels, iscrowd)`` of one image, clipped to its size when known."""
        boxes, labels, crowd = [], [], []
        for ann in self.annotations.get(info["id"], []):
            where = f"{self.source}: image {info.get('file_name')!r} (id {info['id']}), annotation {ann.get('id')}"
            if ann.get("category_id") not in self.label_of:
                raise ValueError(f"{where}: category_id {ann.get('category_id')} is not in 'categories'")
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            x1, y1, x2, y2 = x, y, x + w, y + h
            if width is not None and height is not None:
                x1, x2 = min(max(x1, 0.0), float(width)), min(max(x2, 0.0), float(width))
                y1, y2 = min(max(y1, 0.0), float(height)), min(max(y2, 0.0), float(height))
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
                if self.invalid_boxes == "drop":
                    continue
                raise ValueError(f"{where}: degenerate box bbox={list(bbox)} (x, y, width, height; after clipping "
                                 f"to the {width}x{height} image). Fix the annotation or pass "
                                 "invalid_boxes='drop' to skip such boxes.")
            boxes.append([x1, y1, x2, y2])
            labels.append(self.label_of[ann["category_id"]])
            crowd.append(int(ann.get("iscrowd", 0)))
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
                torch.tensor(crowd, dtype=torch.int64))

    def __getitem__(self, index: int) -> tuple[Tensor, DetectionTarget]:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{self.source}: image file {str(path)!r} (id {info['id']}) does not exist")
        mode = ImageReadMode.RGB if self.in_chans == 3 else ImageReadMode.GRAY
        image = to_dtype(decode_image(str(path), mode=mode), torch.float32, scale=True)  # uint8 or uint16
        height, width = image.shape[-2:]
        if (info.get("width"), info.get("height")) not in ((None, None), (width, height)):
            raise ValueError(f"{self.source}: image {str(path)!r} is {width}x{height} but the json says "
                             f"{info.get('width')}x{info.get('height')}")
        boxes, labels, crowd = self._boxes(info, width, height)
        check_boxes(boxes, height, width, f"{self.source}: image {info['file_name']!r} (id {info['id']})")
        if self.augment and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        image, boxes = letterbox(image, boxes, self.image_size)
        return image, make_target(boxes, labels, info["id"], crowd)


class CocoDetectionDataModule(pl.LightningDataModule):
    """Detection data in COCO json format (see module docstring).

    With only ``annotations``, a seeded ``val_fraction`` of its images is held out for validation and
    reused for test; ``val_annotations`` / ``test_annotations`` name separate files instead (they must
    list the same categories). Every path is relative to ``root`` unless absolute.

    Args:
        root: dataset folder.
        annotations: training (or only) annotation json.
        images: image folder the json's ``file_name`` entries are relative to (all splits).
        val_annotations / test_annotations: optional separate splits.
        val_fraction: held-out fraction when there is no ``val_annotations``.
        image_size: side of the letterboxed square network input.
        in_chans: 3 (RGB) or 1 (grayscale).
        batch_size: images per batch.
        augment: random horizontal flips on the training split.
        invalid_boxes: ``"error"`` (default; names the image and annotation) or ``"drop"``.
        seed: seed of the held-out split.
        num_workers: DataLoader workers (image decoding benefits from a few).
    """

    def __init__(self, root: str | Path, annotations: str = "annotations.json", images: str = "images",
                 val_annotations: str | None = None, test_annotations: str | None = None,
                 val_fraction: float = 0.2, image_size: int = 512, in_chans: int = 3, batch_size: int = 8,
                 augment: bool = True, invalid_boxes: Literal["error", "drop"] = "error", seed: int = 0,
                 num_workers: int = 2) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"CocoDetectionDataModule: dataset folder {str(self.root)!r} does not exist "
                                    "(expected root/images/ and root/annotations.json)")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if invalid_boxes not in ("error", "drop"):
            raise ValueError(f"invalid_boxes must be 'error' or 'drop', got {invalid_boxes!r}")
        self.save_hyperparameters()
        self.batch_size, self.image_size, self.in_chans = batch_size, image_size, in_chans
        self.train_json = load_coco_annotations(self._path(annotations))
        categories = sorted(self.train_json["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.splits: dict[str, CocoDetection] = {}

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _path(self, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.root / path

    def _dataset(self, data: dict[str, Any], source: str, ids: list[int] | None, augment: bool) -> CocoDetection:
        hp = self.hparams
        return CocoDetection(self._path(hp.images), data, self.category_ids, hp.image_size, hp.in_chans, ids,
                             hp.invalid_boxes, augment, source)

    def _separate(self, name: str) -> CocoDetection:
        data = load_coco_annotations(self._path(name))
        ids = sorted(c["id"] for c in data["categories"])
        if ids != self.category_ids:
            raise ValueError(f"{name} lists category ids {ids} but {self.hparams.annotations} lists "
                             f"{self.category_ids}; every split must use the same categories")
        return self._dataset(data, name, None, False)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        if hp.val_annotations is None:
            ids = [im["id"] for im in self.train_json["images"]]
            if len(ids) < 2:
                raise ValueError(f"{hp.annotations} has {len(ids)} image(s); need at least 2 to hold out a "
                                 "validation split (or pass val_annotations)")
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val = min(max(1, round(len(ids) * hp.val_fraction)), len(ids) - 1)
            held_out = sorted(order[:n_val])
            held_set = set(held_out)
            self.splits["train"] = self._dataset(self.train_json, hp.annotations,
                                                 [ids[i] for i in range(len(ids)) if i not in held_set], hp.augment)
            self.splits["val"] = self._dataset(self.train_json, hp.annotations, [ids[i] for i in held_out], False)
        else:
            self.splits["train"] = self._dataset(self.train_json, hp.annotations, None, hp.augment)
            self.splits["val"] = self._separate(hp.val_annotations)
        self.splits["test"] = self._separate(hp.test_annotations) if hp.test_annotations else self.splits["val"]

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
