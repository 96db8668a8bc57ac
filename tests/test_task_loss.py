"""The task contract's ``task_loss(output, batch)``: for every task it is the training loss, checked against an
independent computation of the task's objective, and it is the number ``training_step`` trains on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from lightning_effnets.tasks import (EffnetsTaskMixin, ImageClassifier, ObjectDetector, PersonReID,
                                     ReferringExpressionGrounder, SuperResolver)
from lightning_effnets.tasks.detection import fcos_assign, fcos_loss
from lightning_effnets.tasks.reid import ReIDOutput

# the tasks log from training_step; without a Trainer Lightning warns and skips the logging
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def _scalar(loss: Tensor) -> float:
    return float(loss.detach())


def _smoothed_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """Label-smoothed cross-entropy written out: -(1 - e) log p_y - e/K sum_k log p_k, averaged over samples."""
    log_p = logits.detach().double().log_softmax(dim=1)
    k = logits.shape[1]
    per_sample = [-(1 - smoothing) * log_p[i, y] - smoothing / k * log_p[i].sum() for i, y in enumerate(labels)]
    return torch.stack(per_sample).mean()


def test_default_is_no_loss() -> None:
    assert EffnetsTaskMixin().task_loss(torch.zeros(2, 3), (torch.zeros(2, 1), torch.zeros(2))) is None


def test_classification_loss_is_label_smoothed_cross_entropy() -> None:
    torch.manual_seed(0)
    task = ImageClassifier(backbone="resnet10t", num_classes=5, in_chans=1, image_size=16, label_smoothing=0.2,
                           log_samples=0)
    batch = (torch.randn(6, 1, 16, 16), torch.tensor([0, 4, 2, 2, 1, 3]))
    task.train()
    logits = task.model(batch[0])
    expected = _scalar(_smoothed_cross_entropy(logits, batch[1], 0.2))
    assert _scalar(task.task_loss(logits, batch)) == pytest.approx(expected, rel=1e-6)
    assert _scalar(task.training_step(batch, 0)) == pytest.approx(expected, rel=1e-6)  # BN in train mode: same output


def test_super_resolution_loss_is_l1_to_the_hr_image() -> None:
    torch.manual_seed(0)
    task = SuperResolver(scale=2, n_resblocks=1, n_feats=8)
    batch = (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16))
    expected = _scalar((task.model(batch[0]) - batch[1]).abs().mean())
    assert _scalar(task.task_loss(task.model(batch[0]), batch)) == pytest.approx(expected, rel=1e-6)
    assert _scalar(task.training_step(batch, 0)) == pytest.approx(expected, rel=1e-6)


def test_detection_loss_is_the_fcos_loss_and_ignores_crowd_boxes() -> None:
    torch.manual_seed(0)
    task = ObjectDetector(backbone="resnet10t", num_classes=3, image_size=64, strides=[4, 8, 16], p6p7=False,
                          head_convs=1, fpn_channels=16, level_boundaries=[10, 20], log_samples=0)
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 20.0, 18.0], [30.0, 30.0, 60.0, 62.0]]),
                "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([0, 1])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([0])}]
    batch = (images, targets)
    task.train()
    outputs = task.model(images)
    # independent assembly: flatten the levels, place every location at its cell centre, level ranges from the
    # boundaries, drop the crowd box; then FCOS assignment and loss
    flat = torch.cat([o.flatten(2) for o in outputs], dim=2).transpose(1, 2)
    points, strides, ranges = [], [], []
    for o, s, (low, high) in zip(outputs, (4, 8, 16), ((0, 10), (10, 20), (20, math.inf))):
        h, w = o.shape[-2:]
        for i in range(h):
            for j in range(w):
                points.append(((j + 0.5) * s, (i + 0.5) * s))
                strides.append(float(s))
                ranges.append((float(low), float(high)))
    points, strides, ranges = torch.tensor(points), torch.tensor(strides), torch.tensor(ranges)
    gt_boxes = [targets[0]["boxes"][:1], targets[1]["boxes"]]
    gt_labels = [targets[0]["labels"][:1], targets[1]["labels"]]
    matched = torch.stack([fcos_assign(points, strides, ranges, b, radius=1.5) for b in gt_boxes])
    terms = fcos_loss(flat[..., :3], flat[..., 3:7], flat[..., 7], points, strides, matched, gt_boxes, gt_labels,
                      alpha=0.25, gamma=2.0)
    expected = _scalar(terms["cls"] + terms["box"] + terms["ctr"])
    assert (matched >= 0).sum() > 0
    assert _scalar(task.task_loss(outputs, batch)) == pytest.approx(expected, rel=1e-5)
    without_crowd = [{"boxes": gt_boxes[0], "labels": gt_labels[0]}, targets[1]]
    assert _scalar(task.task_loss(outputs, (images, without_crowd))) == pytest.approx(expected, rel=1e-5)
    assert _scalar(task.training_step(batch, 0)) == pytest.approx(expected, rel=1e-5)


def _referring_loss_by_hand(raw: Tensor, boxes: Tensor, anchors: Tensor, stride: int, box_weight: float,
                            giou_weight: float) -> Tensor:
    """The grounding loss written sample by sample: softmax over every cell x anchor with the cell holding the box
    centre and the best-shaped anchor as the positive, smooth L1 of its (sigmoid offsets, log sizes), GIoU loss of
    its decoded box."""
    b, _, h, w = raw.shape
    a = len(anchors)
    cls, params, targets, decoded = [], [], [], []
    for n in range(b):
        x1, y1, x2, y2 = boxes[n].tolist()
        cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        ious = [min(bw, aw) * min(bh, ah) / (bw * bh + aw * ah - min(bw, aw) * min(bh, ah)) for aw, ah in
                anchors.tolist()]
        best = max(range(a), key=lambda k: ious[k])
        i, j = int(cy // stride), int(cx // stride)
        scores = raw[n].reshape(a, 5, h, w)[:, 4].permute(1, 2, 0).reshape(-1)  # order (i * W + j) * A + a
        cls.append(-scores.log_softmax(0)[(i * w + j) * a + best])
        tx, ty, tw, th, _ = raw[n, best * 5:best * 5 + 5, i, j]
        aw, ah = anchors[best].tolist()
        params.append(torch.stack([tx.sigmoid(), ty.sigmoid(), tw, th]))
        targets.append(torch.tensor([cx / stride - j, cy / stride - i, math.log(bw / aw), math.log(bh / ah)]))
        px, py = (j + tx.sigmoid()) * stride, (i + ty.sigmoid()) * stride
        pw, ph = aw * tw.exp(), ah * th.exp()
        decoded.append(torch.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2]))
    box = F.smooth_l1_loss(torch.stack(params), torch.stack(targets))
    giou = generalized_box_iou_loss(torch.stack(decoded), boxes, reduction="mean")
    return torch.stack(cls).mean() + box_weight * box + giou_weight * giou


def test_referring_loss_matches_the_loss_written_out() -> None:
    torch.manual_seed(0)
    task = ReferringExpressionGrounder(backbone="resnet10t", vocab_size=16, image_size=64, hidden_dim=16,
                                       text_dim=16, embed_dim=8, box_weight=2.0, giou_weight=0.5, log_samples=0)
    batch = {"images": torch.rand(3, 3, 64, 64), "tokens": torch.tensor([[2, 3, 4, 0], [5, 6, 0, 0], [7, 8, 9, 10]]),
             "boxes": torch.tensor([[4.0, 4.0, 20.0, 14.0], [30.0, 20.0, 62.0, 60.0], [17.0, 40.0, 27.0, 47.0]])}
    raw = 0.5 * torch.randn(3, 15, 8, 8)
    anchors = torch.tensor([[0.15, 0.15], [0.3, 0.3], [0.6, 0.6]]) * 64
    expected = _scalar(_referring_loss_by_hand(raw, batch["boxes"], anchors, 8, 2.0, 0.5))
    assert _scalar(task.task_loss(raw, batch)) == pytest.approx(expected, rel=1e-5)
    task.train()
    raw = task.model(batch["images"], batch["tokens"])
    expected = _scalar(_referring_loss_by_hand(raw, batch["boxes"], anchors, 8, 2.0, 0.5))
    assert _scalar(task.training_step(batch, 0)) == pytest.approx(expected, rel=1e-5)


def _batch_hard_triplet_by_hand(features: Tensor, labels: Tensor, margin: float) -> Tensor:
    features, losses = features.detach().double(), []
    for a in range(len(labels)):
        dist = [float(torch.linalg.vector_norm(features[a] - features[k])) for k in range(len(labels))]
        pos = [dist[k] for k in range(len(labels)) if k != a and labels[k] == labels[a]]
        neg = [dist[k] for k in range(len(labels)) if labels[k] != labels[a]]
        if pos and neg:
            losses.append(max(max(pos) - min(neg) + margin, 0.0))
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def test_reid_loss_is_weighted_identity_plus_batch_hard_triplet() -> None:
    torch.manual_seed(0)
    task = PersonReID(backbone="resnet10t", num_classes=4, image_size=(32, 16), label_smoothing=0.1,
                      triplet_margin=0.3, id_loss_weight=0.7, triplet_loss_weight=1.3, log_samples=0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batch = {"images": torch.rand(8, 3, 32, 16), "person_ids": labels, "camera_ids": torch.tensor([0, 1] * 4)}

    def expected(output: ReIDOutput) -> float:
        return _scalar(0.7 * _smoothed_cross_entropy(output.logits, labels, 0.1)
                     + 1.3 * _batch_hard_triplet_by_hand(output.features, labels, 0.3))

    output = ReIDOutput(torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 4))
    assert _scalar(task.task_loss(output, batch)) == pytest.approx(expected(output), rel=1e-5)
    task.train()
    assert _scalar(task.training_step(batch, 0)) == pytest.approx(expected(task.model(batch["images"])), rel=1e-5)
