"""Object detection: a timm backbone, an FPN neck and an FCOS head, compression-agnostic.

FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", arXiv:1904.01355) is
anchor-free: every feature-map location predicts class scores, its distances to the four sides of
a box (in units of the level's stride) and a centre-ness score. It is the detector of the adder
detection experiments (adder FCOS, following AdderNet, arXiv:1912.13200), and its dense
convolutional head is what conversions, pruning and cost profiling act on besides the backbone.

The split between network and task follows the package contract: :class:`FCOSNetwork` (``task.model``)
maps an image batch to raw per-level head maps and holds every trainable layer (backbone, FPN,
head); target assignment (:func:`fcos_assign`), the loss (:func:`fcos_loss`) and decoding with
NMS (:func:`fcos_decode`) are plain functions used by :class:`ObjectDetector`. Batch norm is never
frozen (adder backbones need their statistics to keep adapting, see METHODS.md).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
from torchvision.ops import (
    FeaturePyramidNetwork,
    batched_nms,
    clip_boxes_to_image,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.utils import draw_bounding_boxes

from lightning_effnets.data.detection import DetectionTarget, check_boxes
from lightning_effnets.tasks.base import EffnetsTaskMixin, OptimizerFactory, SchedulerFactory
from lightning_effnets.tasks.classification import create_backbone

__all__ = ["FCOSNetwork", "ObjectDetector", "fcos_assign", "fcos_decode", "fcos_locations", "fcos_loss"]


# --------------------------------------------------------------------------------------------- network
class FCOSNetwork(nn.Module):
    """``images -> [per-level raw head maps]``: timm features -> FPN -> shared FCOS head.

    Each output level is ``[B, num_classes + 5, H_l, W_l]``: class logits, the four distances
    ``(left, top, right, bottom)`` to the box sides in units of the level's stride (non-negative,
    as in torchvision's FCOS), and the centre-ness logit. The head towers are torchvision's
    :class:`FCOSClassificationHead` / :class:`FCOSRegressionHead` (focal-loss prior on the class bias,
    GroupNorm), shared across levels as in the paper.

    Args:
        backbone: a module returning a list of feature maps (timm ``features_only=True``).
        in_channels: channels of each backbone feature map.
        num_classes: object classes (no background class: scores are per-class sigmoids).
        fpn_channels: width of the FPN and the head.
        head_convs: conv layers in each head tower (4 in the paper).
        p6p7: add the paper's two extra levels P6/P7 (stride x2, x4 of the last level) for large objects.
    """

    def __init__(self, backbone: nn.Module, in_channels: Sequence[int], num_classes: int, fpn_channels: int = 64,
                 head_convs: int = 4, p6p7: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        extra = LastLevelP6P7(fpn_channels, fpn_channels) if p6p7 else None
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels, extra_blocks=extra)
        norm = partial(nn.GroupNorm, math.gcd(32, fpn_channels))
        self.cls_head = FCOSClassificationHead(fpn_channels, 1, num_classes, head_convs, norm_layer=norm)
        self.box_head = FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=norm)
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.backbone(images)
        pyramid = self.fpn(OrderedDict((f"c{i}", f) for i, f in enumerate(features)))
        outputs = []
        for level in pyramid.values():
            cls_logits = self.cls_head.cls_logits(self.cls_head.conv(level))
            box_features = self.box_head.conv(level)
            distances = F.relu(self.box_head.bbox_reg(box_features))
            outputs.append(torch.cat([cls_logits, distances, self.box_head.bbox_ctrness(box_features)], dim=1))
        return outputs


def _timm_features(name: str, in_chans: int, strides: Sequence[int], kwargs: dict[str, Any]) -> tuple[nn.Module,
                                                                                                     list[int]]:
    """A timm ``features_only`` backbone returning exactly the feature maps at ``strides``."""
    probe = create_backbone(name, features_only=True, in_chans=in_chans, **kwargs)
    reductions = list(probe.feature_info.reduction())
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ValueError(f"backbone {name!r} has feature maps at strides {reductions}, not {missing}; "
                         f"choose model strides among {reductions}")
    out_indices = [reductions.index(s) for s in strides]
    backbone = create_backbone(name, features_only=True, in_chans=in_chans, out_indices=out_indices, **kwargs)
    return backbone, list(backbone.feature_info.channels())


# --------------------------------------------------------------------------------------------- functional core
def fcos_locations(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Image coordinates of every feature-map location, level by level (row-major within a level).

    Returns ``(points[N, 2] as (x, y), stride[N], level[N])``; location ``(i, j)`` of a stride-``s``
    map sits at the centre of its cell, ``((j + 0.5) s, (i + 0.5) s)``.
    """
    points, point_strides, levels = [], [], []
    for level, ((h, w), s) in enumerate(zip(sizes, strides)):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
        point_strides.append(torch.full((h * w,), float(s), device=device))
        levels.append(torch.full((h * w,), level, device=device, dtype=torch.int64))
    return torch.cat(points), torch.cat(point_strides), torch.cat(levels)


def fcos_assign(points: Tensor, strides: Tensor, ranges: Tensor, boxes: Tensor, radius: float = 1.5) -> Tensor:
    """FCOS target assignment: the index of the box each location regresses, or -1 for background.

    A location is positive for a box if it lies inside the box, within ``radius * stride`` of the box
    centre (centre sampling, FCOS v2 / torchvision), and the largest of its four distances to the box
    sides falls in its level's range ``(low, high]``; among several such boxes it takes the smallest.

    Args:
        points: ``[N, 2]`` location coordinates (x, y).
        strides: ``[N]`` stride of each location's level.
        ranges: ``[N, 2]`` (low, high] regression range of each location's level.
        boxes: ``[M, 4]`` ground-truth boxes (x1, y1, x2, y2).
        radius: centre-sampling radius in strides.
    """
    if boxes.numel() == 0:
        return torch.full((points.shape[0],), -1, dtype=torch.int64, device=points.device)
    x, y = points[:, 0:1], points[:, 1:2]
    distances = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=2)  # N,M,4
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    near_centre = (points[:, None, :] - centres[None]).abs().amax(dim=2) < radius * strides[:, None]
    inside = distances.amin(dim=2) > 0
    reach = distances.amax(dim=2)
    in_range = (reach > ranges[:, 0:1]) & (reach <= ranges[:, 1:2])
    candidate = near_centre & inside & in_range
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cost = torch.where(candidate, areas[None, :].expand_as(candidate), torch.full_like(candidate, math.inf,
                                                                                      dtype=areas.dtype))
    best_cost, best = cost.min(dim=1)
    return torch.where(torch.isfinite(best_cost), best, torch.full_like(best, -1))


def _distances_to_boxes(distances: Tensor, points: Tensor, strides: Tensor) -> Tensor:
    """``(l, t, r, b)`` in strides at ``points`` -> ``(x1, y1, x2, y2)`` boxes."""
    d = distances * strides[..., None]
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def fcos_loss(cls_logits: Tensor, distances: Tensor, centerness: Tensor, points: Tensor, strides: Tensor,
              matched: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], alpha: float = 0.25,
              gamma: float = 2.0) -> dict[str, Tensor]:
    """The FCOS loss, each term summed and divided by the number of positive locations.

    Sigmoid focal loss (arXiv:1708.02002) on all locations, generalized-IoU loss (arXiv:1902.09630)
    of the decoded boxes and binary cross-entropy of centre-ness (target
    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``) on the positive locations.

    Args:
        cls_logits: ``[B, N, K]``; distances: ``[B, N, 4]`` (in strides); centerness: ``[B, N]`` logits.
        points / strides: ``[N, 2]`` / ``[N]`` from :func:`fcos_locations`.
        matched: ``[B, N]`` from :func:`fcos_assign` (-1 = background).
        gt_boxes / gt_labels: per image ``[M_b, 4]`` / ``[M_b]``, indexed by ``matched``.
    """
    positive = matched >= 0
    num_pos = max(int(positive.sum()), 1)
    cls_target = torch.zeros_like(cls_logits)
    box_target = cls_logits.new_zeros(distances.shape)
    for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        pos = positive[b]
        if bool(pos.any()):
            idx = matched[b, pos]
            cls_target[b, pos, labels[idx]] = 1.0
            box_target[b, pos] = boxes[idx].to(box_target.dtype)
    loss_cls = sigmoid_focal_loss(cls_logits, cls_target, alpha=alpha, gamma=gamma, reduction="sum")

    pos_points = points.expand(cls_logits.shape[0], -1, -1)[positive]
    pos_strides = strides.expand(cls_logits.shape[0], -1)[positive]
    pred_boxes = _distances_to_boxes(distances[positive], pos_points, pos_strides)
    gt = box_target[positive]
    loss_box = generalized_box_iou_loss(pred_boxes, gt, reduction="sum")

    ltrb = torch.cat([pos_points - gt[:, :2], gt[:, 2:] - pos_points], dim=1)
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ctr_target = torch.sqrt((lr.amin(1) / lr.amax(1)) * (tb.amin(1) / tb.amax(1)))
    loss_ctr = F.binary_cross_entropy_with_logits(centerness[positive], ctr_target, reduction="sum")
    return {"cls": loss_cls / num_pos, "box": loss_box / num_pos, "ctr": loss_ctr / num_pos}


def fcos_decode(cls_logits: Tensor, distances: Tensor, centerness: Tensor, points: Tensor, strides: Tensor,
                image_size: tuple[int, int], score_thresh: float = 0.05, nms_thresh: float = 0.6,
                topk_candidates: int = 1000, detections_per_img: int = 100) -> dict[str, Tensor]:
    """Detections of one image: score ``sqrt(sigmoid(class) * sigmoid(centre-ness))`` (torchvision's FCOS),
    threshold, top-k, decode, clip to the image, class-wise NMS.

    Args:
        cls_logits: ``[N, K]``; distances: ``[N, 4]``; centerness: ``[N]``; points / strides as in :func:`fcos_loss`.
        image_size: ``(height, width)`` to clip the boxes to.

    Returns:
        ``{"boxes": [D, 4], "scores": [D], "labels": [D]}`` sorted by decreasing score.
    """
    num_classes = cls_logits.shape[1]
    scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(centerness)[:, None]).flatten()
    candidates = torch.nonzero(scores > score_thresh).squeeze(1)
    scores = scores[candidates]
    if scores.numel() > topk_candidates:
        scores, order = scores.topk(topk_candidates)
        candidates = candidates[order]
    locations = torch.div(candidates, num_classes, rounding_mode="floor")
    labels = candidates % num_classes
    boxes = _distances_to_boxes(distances[locations], points[locations], strides[locations])
    boxes = clip_boxes_to_image(boxes, image_size)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


# --------------------------------------------------------------------------------------------- task
class ObjectDetector(EffnetsTaskMixin, pl.LightningModule):
    """FCOS object detection with a timm backbone (``features_only=True``) trained from scratch.

    Batches are ``(images[B, C, H, W], targets)`` with one dict per image (``boxes`` xyxy in pixels,
    ``labels``, optional ``iscrowd`` and ``image_id``), as the detection datamodules produce. Logs the
    loss terms and COCO mAP (``{val,test}/map``, ``map_50``, ``map_75``, ``mar_100``; torchmetrics with
    the pycocotools backend) and, per validation epoch, ``log_samples`` images with true (green) and
    predicted (red) boxes.

    The defaults follow the paper's layout (P3-P5 from the backbone plus P6/P7, four-conv head towers,
    its level ranges) at a lighter width, for real images of a few hundred pixels; small images need
    finer strides and smaller level boundaries (see ``recipes/detection/baseline.yaml``).

    Args:
        backbone: timm model name, created with ``features_only=True`` and ``pretrained=False``.
        num_classes: object classes; checked against the datamodule's ``num_classes``.
        in_chans: input channels; checked against the datamodule's ``in_chans``.
        image_size: side of ``example_input_array`` (the network accepts any size).
        strides: backbone feature strides fed to the FPN (e.g. ``[8, 16, 32]`` = ResNet C3-C5).
        fpn_channels: FPN and head width.
        head_convs: convolutions per head tower.
        p6p7: add FCOS's extra levels P6 and P7 (strides x2 and x4 of the last backbone level).
        level_boundaries: largest box-side distance each level regresses, one value per boundary
            between consecutive levels (so ``len(levels) - 1`` values); default FCOS's ``4 * stride``
            of the next level (64, 128, ... for strides 8, 16, ...). Small images need smaller values.
        center_sampling_radius: centre-sampling radius in strides.
        focal_alpha / focal_gamma: focal loss parameters.
        score_thresh / nms_thresh / topk_candidates / detections_per_img: decoding (see :func:`fcos_decode`).
        class_names: names for logged images (default: the datamodule's ``class_names``, else indices).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        optimizer / scheduler / lr_schedule / warmup_steps: see :meth:`EffnetsTaskMixin.init_optimization`.
        log_samples: validation images drawn with boxes per epoch (0 disables).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 4,
        in_chans: int = 3,
        image_size: int = 512,
        strides: Sequence[int] = (8, 16, 32),
        fpn_channels: int = 128,
        head_convs: int = 4,
        p6p7: bool = True,
        level_boundaries: Sequence[float] | None = None,
        center_sampling_radius: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        topk_candidates: int = 1000,
        detections_per_img: int = 100,
        class_names: Sequence[str] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        log_samples: int = 4,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        strides = [int(s) for s in strides]
        if not strides or any(b <= a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"strides must be a non-empty increasing list, got {strides}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        features, channels = _timm_features(backbone, in_chans, strides, dict(backbone_kwargs or {}))
        self.model = FCOSNetwork(features, channels, num_classes, fpn_channels, head_convs, p6p7)
        self.strides = strides + ([strides[-1] * 2, strides[-1] * 4] if p6p7 else [])
        if level_boundaries is None:
            level_boundaries = [4.0 * s for s in self.strides[1:]]
        boundaries = [float(b) for b in level_boundaries]
        if len(boundaries) != len(self.strides) - 1 or any(b <= a for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"level_boundaries must be {len(self.strides) - 1} increasing values (one between "
                             f"each pair of the levels at strides {self.strides}), got {boundaries}")
        self.level_ranges = list(zip([0.0] + boundaries, boundaries + [math.inf]))
        self.example_input_array = torch.zeros(1, in_chans, image_size, image_size)
        self.init_optimization(optimizer, scheduler, lr_schedule, warmup_steps)
        self.map_metrics = nn.ModuleDict({
            "val": MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools"),
            "test": MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools",
                                         class_metrics=True),
        })
        self.class_names = list(class_names) if class_names is not None else None

    # ------------------------------------------------------------------ structure
    def forward(self, images: Tensor) -> list[Tensor]:
        """Raw per-level head maps (see :class:`FCOSNetwork`); :meth:`detect` decodes them."""
        return self.model(images)

    def output_modules(self) -> list[nn.Module]:
        return [self.model.cls_head.cls_logits, self.model.box_head.bbox_reg, self.model.box_head.bbox_ctrness]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("num_classes", "in_chans"):
            expected = getattr(datamodule, attr, None)
            if expected is not None and expected != self.hparams[attr]:
                raise ValueError(
                    f"{type(self).__name__}({attr}={self.hparams[attr]}) does not match the data: "
                    f"{type(datamodule).__name__}.{attr} = {expected}. Set model {attr}: {expected} "
                    f"(YAML: model.init_args.{attr}).")
        if self.class_names is None and getattr(datamodule, "class_names", None) is not None:
            self.class_names = list(datamodule.class_names)

    # ------------------------------------------------------------------ helpers
    def _flatten(self, outputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-level maps -> ``cls [B, N, K]``, ``distances [B, N, 4]``, ``centerness [B, N]``, points,
        strides and ``[N, 2]`` regression ranges of every location."""
        if len(outputs) != len(self.strides):
            raise ValueError(f"the network returned {len(outputs)} levels but the task expects "
                             f"{len(self.strides)} (strides {self.strides})")
        k = self.hparams.num_classes
        flat = torch.cat([o.flatten(2) for o in outputs], dim=2).transpose(1, 2)  # B, N, K + 5
        points, strides, levels = fcos_locations([tuple(o.shape[-2:]) for o in outputs], self.strides, flat.device)
        ranges = torch.tensor(self.level_ranges, device=flat.device)[levels]
        return flat[..., :k], flat[..., k:k + 4], flat[..., k + 4], points, strides, ranges

    def _check_targets(self, images: Tensor, targets: list[DetectionTarget]) -> None:
        """Clear errors for malformed targets, naming the sample (one host sync per batch when valid)."""
        if len(targets) != images.shape[0]:
            raise ValueError(f"batch has {images.shape[0]} images but {len(targets)} targets")
        height, width = images.shape[-2:]
        boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]) if targets else images.new_zeros(0, 4)
        labels = torch.cat([t["labels"].reshape(-1) for t in targets]) if targets else boxes.new_zeros(0)
        bad_box = (~torch.isfinite(boxes).all(1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
                   | (boxes[:, :2] < -1e-3).any(1) | (boxes[:, 2] > width + 1e-3) | (boxes[:, 3] > height + 1e-3))
        bad_label = (labels < 0) | (labels >= self.hparams.num_classes)
        counts_ok = all(t["boxes"].reshape(-1, 4).shape[0] == t["labels"].numel() for t in targets)
        if counts_ok and not bool(torch.cat([bad_box, bad_label]).any()):
            return
        for i, t in enumerate(targets):
            name = f"image_id {int(t['image_id'])}" if "image_id" in t else "sample"
            name = f"{name} (position {i} in the batch)"
            n_boxes, n_labels = t["boxes"].reshape(-1, 4).shape[0], t["labels"].numel()
            if n_boxes != n_labels:
                raise ValueError(f"{name}: {n_boxes} boxes but {n_labels} labels")
            check_boxes(t["boxes"].reshape(-1, 4), height, width, name)
            lab = t["labels"].reshape(-1)
            wrong = (lab < 0) | (lab >= self.hparams.num_classes)
            if bool(wrong.any()):
                raise ValueError(f"{name}: label {int(lab[wrong][0])} is outside [0, num_classes="
                                 f"{self.hparams.num_classes}); set model num_classes to the data's class count")

    def _loss_terms(self, outputs: list[Tensor], batch: tuple[Tensor, list[DetectionTarget]]
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The FCOS loss (sum of its terms) and the terms ``cls``, ``box``, ``ctr`` (:func:`fcos_loss`)."""
        targets = batch[1]
        cls_logits, distances, centerness, points, strides, ranges = self._flatten(outputs)
        gt_boxes, gt_labels, matched = [], [], []
        for t in targets:
            keep = t["iscrowd"] == 0 if "iscrowd" in t else torch.ones_like(t["labels"], dtype=torch.bool)
            boxes, labels = t["boxes"][keep].to(points.dtype), t["labels"][keep]
            gt_boxes.append(boxes)
            gt_labels.append(labels)
            matched.append(fcos_assign(points, strides, ranges, boxes, self.hparams.center_sampling_radius))
        terms = fcos_loss(cls_logits.float(), distances.float(), centerness.float(), points, strides,
                          torch.stack(matched), gt_boxes, gt_labels, self.hparams.focal_alpha,
                          self.hparams.focal_gamma)
        return terms["cls"] + terms["box"] + terms["ctr"], terms

    def task_loss(self, output: list[Tensor], batch: tuple[Tensor, list[DetectionTarget]]) -> Tensor:
        """The FCOS loss of the raw head maps ``output`` for the batch's boxes (focal + GIoU + centre-ness)."""
        return self._loss_terms(output, batch)[0]

    def decode(self, outputs: list[Tensor], image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Raw head maps -> one detections dict (``boxes``, ``scores``, ``labels``) per image."""
        cls_logits, distances, centerness, points, strides, _ = self._flatten(outputs)
        hp = self.hparams
        return [fcos_decode(cls_logits[b].float(), distances[b].float(), centerness[b].float(), points, strides,
                            image_size, hp.score_thresh, hp.nms_thresh, hp.topk_candidates, hp.detections_per_img)
                for b in range(cls_logits.shape[0])]

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Detections for an image batch (eval-mode forward + :meth:`decode`)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.decode(self.model(images), tuple(images.shape[-2:]))
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: tuple[Tensor, list[DetectionTarget]], stage: str) -> tuple[Tensor, list[Tensor]]:
        images, targets = batch
        self._check_targets(images, targets)
        outputs = self.model(images)
        loss, terms = self._loss_terms(outputs, batch)
        on_step = stage == "train"
        batch_size = images.shape[0]
        for name, value in terms.items():
            self.log(f"{stage}/loss_{name}", value, on_step=on_step, on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage == "train",
                 batch_size=batch_size)
        return loss, outputs

    def training_step(self, batch: tuple[Tensor, list[DetectionTarget]], batch_idx: int) -> Tensor:
        loss, _ = self._step(batch, "train")
        return loss + self.pop_auxiliary_loss(loss)

    def _evaluate(self, batch: tuple[Tensor, list[DetectionTarget]], stage: str) -> list[dict[str, Tensor]]:
        images, targets = batch
        _, outputs = self._step(batch, stage)
        detections = self.decode(outputs, tuple(images.shape[-2:]))
        truth = [{"boxes": t["boxes"], "labels": t["labels"],
                  "iscrowd": t.get("iscrowd", torch.zeros_like(t["labels"]))} for t in targets]
        self.map_metrics[stage].update(detections, truth)
        return detections

    def validation_step(self, batch: tuple[Tensor, list[DetectionTarget]], batch_idx: int) -> None:
        detections = self._evaluate(batch, "val")
        if batch_idx == 0 and self.hparams.log_samples > 0 and self._can_log_images():
            n = self.hparams.log_samples
            images, targets = batch
            drawn = [self.draw(images[i], targets[i], detections[i]).float() / 255
                     for i in range(min(n, len(targets)))]
            captions = [f"{len(t['boxes'])} true (green), {int((d['scores'] >= 0.3).sum())} predicted with "
                        f"score >= 0.3 (red)" for t, d in zip(targets, detections)]
            self.log_images("val/detections", drawn, captions[:len(drawn)])

    def test_step(self, batch: tuple[Tensor, list[DetectionTarget]], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _log_map(self, stage: str) -> None:
        metric = self.map_metrics[stage]
        result = metric.compute()
        metric.reset()
        figures = {f"{stage}/{key}": result[key] for key in ("map", "map_50", "map_75", "mar_100")}
        if stage == "test" and result["map_per_class"].numel() > 1:
            for cls, value in zip(result["classes"].tolist(), result["map_per_class"].tolist()):
                figures[f"test/map_class/{self._class_name(cls)}"] = torch.tensor(value)
        self.log_dict({k: v.float() for k, v in figures.items()}, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")

    def on_test_epoch_end(self) -> None:
        self._log_map("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Tensor]]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.decode(self.model(images), tuple(images.shape[-2:]))

    # ------------------------------------------------------------------ drawing
    def _class_name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)

    def _can_log_images(self) -> bool:
        trainer = self._trainer
        return (trainer is not None and not trainer.sanity_checking
                and any(hasattr(logger, "log_image") for logger in trainer.loggers))

    def draw(self, image: Tensor, target: DetectionTarget | None, detections: dict[str, Tensor] | None,
             min_score: float = 0.3, min_side: int = 256) -> Tensor:
        """``uint8 [3, H', W']`` image with true boxes (green) and detections ``>= min_score`` (red), upscaled
        (nearest) so the shorter side is at least ``min_side`` for readable labels."""
        image = image.detach().float().cpu()
        scale = max(1, math.ceil(min_side / min(image.shape[-2:])))
        if scale > 1:
            image = F.interpolate(image[None], scale_factor=scale, mode="nearest")[0]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        canvas = (image[:3].clamp(0, 1) * 255).round().to(torch.uint8)
        if target is not None and len(target["boxes"]):
            canvas = draw_bounding_boxes(canvas, target["boxes"].detach().cpu().float() * scale,
                                         [self._class_name(int(c)) for c in target["labels"]], colors="lime")
        if detections is not None:
            keep = detections["scores"] >= min_score
            if bool(keep.any()):
                labels = [f"{self._class_name(int(c))} {float(s):.2f}"
                          for c, s in zip(detections["labels"][keep], detections["scores"][keep])]
                canvas = draw_bounding_boxes(canvas, detections["boxes"][keep].detach().cpu().float() * scale,
                                             labels, colors="red")
        return canvas
