"""Shared pieces of the detection datamodules: the sample format, box validation, collation, letterboxing.

A detection sample is ``(image, target)``: ``image`` a float tensor ``[C, H, W]`` in [0, 1] and ``target``
a dict with

* ``boxes``: ``float32[N, 4]`` in absolute pixel ``(x1, y1, x2, y2)`` of ``image`` (``0 <= x1 < x2 <= W``),
* ``labels``: ``int64[N]`` contiguous class indices in ``[0, num_classes)``,
* ``iscrowd``: ``int64[N]`` (1 marks COCO crowd regions: ignored by the loss, handled by the metric),
* ``image_id``: ``int64`` scalar naming the sample in error messages.

A batch is ``(images[B, C, H, W], list_of_targets)`` (:func:`detection_collate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DetectionTarget", "check_boxes", "detection_collate", "letterbox", "make_target"]

DetectionTarget = dict[str, Tensor]


def make_target(boxes: Tensor, labels: Tensor, image_id: int, iscrowd: Tensor | None = None) -> DetectionTarget:
    """Build a target dict in the package's format (see module docstring)."""
    boxes = boxes.to(torch.float32).reshape(-1, 4)
    labels = labels.to(torch.int64).reshape(-1)
    crowd = torch.zeros_like(labels) if iscrowd is None else iscrowd.to(torch.int64).reshape(-1)
    return {"boxes": boxes, "labels": labels, "iscrowd": crowd, "image_id": torch.tensor(int(image_id))}


def check_boxes(boxes: Tensor, height: int, width: int, sample: str, tolerance: float = 1e-3) -> None:
    """Raise a ``ValueError`` naming ``sample`` if a box is not finite, degenerate or outside the image.

    Degenerate boxes (``x2 <= x1`` or ``y2 <= y1``) make the GIoU loss and the centre-ness target
    undefined, so they are refused instead of silently producing NaN losses.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{sample}: boxes must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    bad_finite = ~torch.isfinite(boxes).all(dim=1)
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    outside = ((boxes[:, 0] < -tolerance) | (boxes[:, 1] < -tolerance) | (boxes[:, 2] > width + tolerance)
               | (boxes[:, 3] > height + tolerance))
    for mask, problem in ((bad_finite, "is not finite"), (degenerate, "is degenerate (x2 <= x1 or y2 <= y1)"),
                          (outside, f"lies outside the {width}x{height} image")):
        if bool(mask.any()):
            j = int(mask.nonzero()[0])
            box = [round(float(v), 3) for v in boxes[j]]
            raise ValueError(f"{sample}: box {j} = {box} (x1, y1, x2, y2) {problem}. Fix or remove that "
                             "annotation (CocoDetectionDataModule(invalid_boxes='drop') skips such boxes).")


def detection_collate(batch: list[tuple[Tensor, DetectionTarget]]) -> tuple[Tensor, list[DetectionTarget]]:
    """Stack same-sized images; keep the per-image targets (different box counts) as a list."""
    images = [sample[0] for sample in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a detection batch must share one size, got {sorted(shapes)}; "
                         "set the datamodule's image_size so every image is letterboxed to it")
    return torch.stack(images), [sample[1] for sample in batch]


def letterbox(image: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Resize ``image [C, H, W]`` so its longer side is ``size`` and pad right/bottom to ``size x size``.

    The scale is (up to rounding of the new size) the same on both axes and padding is at the far
    edges, so box IoUs, hence mAP, are the same as in the original image coordinates.
    """
    _, h, w = image.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=scale < 1)[0].clamp_(0, 1)
    out = image.new_zeros(image.shape[0], size, size)
    out[:, :new_h, :new_w] = image
    factors = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=boxes.dtype)
    return out, boxes * factors

