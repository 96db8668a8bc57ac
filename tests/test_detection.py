"""Object detection: FCOS task, shapes generator, COCO reader (lightning_effnets.tasks.detection, data.*)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader
from torchvision.io import write_png
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.ops import box_iou, generalized_box_iou

from lightning_effnets.cost import profile
from lightning_effnets.data import CocoDetectionDataModule, ShapesDetectionDataModule
from lightning_effnets.data.detection import detection_collate, make_target
from lightning_effnets.data.shapes_detection import SHAPE_CLASSES, ShapesConfig, ShapesDetection
from lightning_effnets.tasks import ObjectDetector
from lightning_effnets.tasks.detection import fcos_assign, fcos_locations, fcos_loss


def _trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


def _loader(images: torch.Tensor, targets: list[dict]) -> DataLoader:
    """One batch of (images, targets) as a DataLoader."""
    return DataLoader(list(zip(images, targets)), batch_size=len(targets), collate_fn=detection_collate)


def _small_task(**kw) -> ObjectDetector:
    defaults = dict(backbone="resnet10t", num_classes=4, image_size=64, strides=[4, 8, 16], p6p7=False,
                    head_convs=1, fpn_channels=32, level_boundaries=[10, 20], log_samples=0)  # the recipe's levels
    defaults.update(kw)
    return ObjectDetector(**defaults)


class _FixedOutputs(nn.Module):
    """Stands in for the network: returns prepared raw head maps whatever the input."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs
        self.anchor = nn.Parameter(torch.zeros(()))  # so the module has a parameter (device lookups)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [o.clone() + 0 * self.anchor for o in self.outputs]


# --------------------------------------------------------------------------------------------- metrics
def _coco_ap(tp: list[bool], num_gt: int) -> float:
    """COCO average precision of detections sorted by score: 101-point interpolated precision."""
    tps = np.cumsum(tp)
    fps = np.cumsum([not t for t in tp])
    recall = tps / num_gt
    precision = tps / (tps + fps)
    points = np.linspace(0, 1, 101)
    return float(np.mean([precision[recall >= r - 1e-12].max() if (recall >= r - 1e-12).any() else 0.0
                          for r in points]))


def test_iou_and_two_box_map_match_hand_computation():
    """Two true boxes, three detections (one per box at IoU 0.62 and 0.93, one false positive between
    them by score); boxes come out of the task's own decoding of raw head maps."""
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0], [32.0, 32.0, 52.0, 52.0]])
    pred = torch.tensor([[0.0, 0.0, 20.0, 12.4],     # IoU 248 / 400 = 0.62 with gt 0
                         [36.0, 4.0, 56.0, 24.0],    # no overlap with either: false positive
                         [32.0, 32.0, 52.0, 50.6]])  # IoU 372 / 400 = 0.93 with gt 1
    iou = box_iou(pred, gt)
    assert iou[0, 0].item() == pytest.approx(0.62) and iou[2, 1].item() == pytest.approx(0.93)
    assert iou[1].max().item() == 0.0
    # generalized IoU, by hand: [0,0,2,2] vs [1,1,3,3]: IoU 1/7, hull 9, union 7
    hand = 1 / 7 - (9 - 7) / 9
    assert generalized_box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])).item() == \
        pytest.approx(hand)

    # hand-made AP at each COCO IoU threshold (0.5:0.05:0.95): order by score is TP0, FP, TP1
    ap50 = (51 * 1.0 + 50 * 2 / 3) / 101  # recall <= 0.5 at precision 1, then 2/3 up to recall 1
    ap_high = 51 * (1 / 3) / 101           # IoU threshold in (0.62, 0.93]: only the 3rd detection is a TP
    thresholds = np.linspace(0.5, 0.95, 10)
    expected_map = np.mean([ap50 if t <= 0.62 else ap_high if t <= 0.93 else 0.0 for t in thresholds])
    assert ap50 == pytest.approx(_coco_ap([True, False, True], 2))
    assert ap_high == pytest.approx(_coco_ap([False, False, True], 2))

    # raw maps of a one-level (stride 8) network on a 64x64 image that decode to exactly `pred`
    task = _small_task(strides=[8], level_boundaries=[])
    k = task.hparams.num_classes
    maps = torch.full((1, k + 5, 8, 8), -20.0)
    for box, score in zip(pred, (0.9, 0.8, 0.7)):
        cx, cy = (box[:2] + box[2:]) / 2
        j, i = int(cx // 8), int(cy // 8)
        px, py = (j + 0.5) * 8, (i + 0.5) * 8
        maps[0, :k, i, j] = -20.0
        maps[0, 1, i, j] = math.log(score**2 / (1 - score**2))  # score = sqrt(sigmoid(cls) * sigmoid(ctr))
        maps[0, k + 4, i, j] = 30.0
        maps[0, k:k + 4, i, j] = torch.stack([px - box[0], py - box[1], box[2] - px, box[3] - py]) / 8
    task.model = _FixedOutputs([maps])
    decoded = task.decode(task.model(torch.zeros(1, 3, 64, 64)), (64, 64))[0]
    torch.testing.assert_close(decoded["boxes"], pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded["scores"], torch.tensor([0.9, 0.8, 0.7]), atol=1e-4, rtol=0)

    loader = _loader(torch.zeros(1, 3, 64, 64), [make_target(gt, torch.tensor([1, 1]), image_id=0)])
    result = _trainer().validate(task, dataloaders=loader, verbose=False)[0]
    assert result["val/map_50"] == pytest.approx(ap50, abs=1e-6)
    assert result["val/map"] == pytest.approx(expected_map, abs=1e-6)
    assert result["val/map_75"] == pytest.approx(ap_high, abs=1e-6)


def test_assignment_and_loss_match_torchvision_fcos():
    """Our assignment + loss against torchvision's FCOS (an independent implementation), whose level
    ranges are (4, 8) x anchor size with anchor size = stride: our default level boundaries."""
    g = torch.Generator().manual_seed(0)
    size, strides, k = 256, [8, 16, 32], 3
    sizes = [(size // s, size // s) for s in strides]
    points, point_strides, levels = fcos_locations(sizes, strides)
    task = _small_task(num_classes=k, strides=strides, level_boundaries=None)
    ranges = torch.tensor(task.level_ranges)[levels]
    assert task.level_ranges == [(0.0, 64.0), (64.0, 128.0), (128.0, math.inf)]

    targets = []
    for n in (7, 0, 3):  # one image without objects
        xy = torch.rand(n, 2, generator=g) * 100
        wh = 4 + torch.rand(n, 2, generator=g) * 240
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, k, (n,), generator=g)})
    b, n_loc = len(targets), points.shape[0]
    cls_logits = torch.randn(b, n_loc, k, generator=g)
    distances = torch.rand(b, n_loc, 4, generator=g) * 4
    centerness = torch.randn(b, n_loc, generator=g)

    matched = torch.stack([fcos_assign(points, point_strides, ranges, t["boxes"]) for t in targets])
    ours = fcos_loss(cls_logits, distances, centerness, points, point_strides, matched,
                     [t["boxes"] for t in targets], [t["labels"] for t in targets])

    head = FCOSHead(32, 1, k)  # only its compute_loss (and box coder) is used
    captured = []

    def compute_loss(t, h, a, m):
        captured.extend(m)
        return head.compute_loss(t, h, a, m)

    reference_self = SimpleNamespace(center_sampling_radius=1.5, head=SimpleNamespace(compute_loss=compute_loss))
    half = point_strides[:, None] / 2
    anchors = torch.cat([points - half, points + half], dim=1)
    theirs = FCOS.compute_loss(reference_self, targets,
                               {"cls_logits": cls_logits, "bbox_regression": distances,
                                "bbox_ctrness": centerness[..., None]},
                               [anchors] * b, [h * w for h, w in sizes])
    torch.testing.assert_close(matched, torch.stack(captured))
    assert int((matched >= 0).sum()) > 20 and set(levels.expand_as(matched)[matched >= 0].tolist()) == {0, 1, 2}
    for ours_key, their_key in (("cls", "classification"), ("box", "bbox_regression"), ("ctr", "bbox_ctrness")):
        torch.testing.assert_close(ours[ours_key], theirs[their_key], rtol=1e-5, atol=1e-6)


def test_perfect_head_outputs_give_map_one_and_cover_every_object():
    """Encode the true boxes at the assigned locations: every object must get a location (so it can be
    learnt) and decoding + NMS + metric must give mAP 1."""
    dm = ShapesDetectionDataModule(image_size=64, min_size=8, max_size=32, num_val=16, batch_size=16)
    dm.setup()
    images, targets = next(iter(dm.val_dataloader()))
    task = _small_task()
    with torch.no_grad():
        sizes = [tuple(o.shape[-2:]) for o in task.model(images[:1])]
    points, strides, levels = fcos_locations(sizes, task.strides)
    ranges = torch.tensor(task.level_ranges)[levels]
    k = task.hparams.num_classes
    maps = [torch.full((len(targets), k + 5, h, w), -20.0) for h, w in sizes]
    offsets = np.cumsum([0] + [h * w for h, w in sizes])
    for b, t in enumerate(targets):
        matched = fcos_assign(points, strides, ranges, t["boxes"])
        assert set(matched.tolist()) >= set(range(len(t["boxes"]))), "an object has no positive location"
        for loc in (matched >= 0).nonzero().flatten().tolist():
            level = int(levels[loc])
            i, j = divmod(loc - int(offsets[level]), sizes[level][1])
            box, p = t["boxes"][matched[loc]], points[loc]
            maps[level][b, int(t["labels"][matched[loc]]), i, j] = 20.0
            maps[level][b, k:k + 4, i, j] = torch.cat([p - box[:2], box[2:] - p]) / strides[loc]
            maps[level][b, k + 4, i, j] = 20.0
    task.model = _FixedOutputs(maps)
    result = _trainer().validate(task, dataloaders=_loader(images, targets), verbose=False)[0]
    assert result["val/map"] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------- generator
def test_shapes_generator_is_deterministic_and_valid():
    config = ShapesConfig(image_size=64, min_size=8, max_size=32, max_objects=6)
    a = ShapesDetection(40, "train", seed=3, config=config)
    b = ShapesDetection(40, "train", seed=3, config=config)
    later = [b[i] for i in reversed(range(40))][::-1]  # reverse access order: no hidden RNG state
    labels_seen = set()
    for i in range(40):
        image, target = a[i]
        assert torch.equal(image, later[i][0]) and torch.equal(target["boxes"], later[i][1]["boxes"])
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes = target["boxes"]
        assert 1 <= len(boxes) <= 6 and len(boxes) == len(target["labels"])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        longer_side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1)
        assert (longer_side >= 0.7 * 8).all() and (longer_side <= 32 * 1.05 + 2).all()
        labels_seen |= set(target["labels"].tolist())
        # the object is drawn inside its box: its box differs from a box-sized patch of flat colour
        for box in boxes.long():
            patch = image[:, box[1]:box[3], box[0]:box[2]]
            assert float(patch.std()) > 0.02
    assert labels_seen == set(range(len(SHAPE_CLASSES)))
    other_seed = ShapesDetection(40, "train", seed=4, config=config)[0][0]
    other_split = ShapesDetection(40, "val", seed=3, config=config)[0][0]
    assert not torch.equal(a[0][0], other_seed) and not torch.equal(a[0][0], other_split)
    gray = ShapesDetection(2, "train", seed=3, config=config, in_chans=1)[0]
    assert gray[0].shape == (1, 64, 64) and torch.equal(gray[1]["boxes"], a[0][1]["boxes"])


def test_shapes_generator_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_size"):
        ShapesDetectionDataModule(image_size=32, max_size=40)
    with pytest.raises(ValueError, match="max_occlusion"):
        ShapesDetectionDataModule(max_occlusion=1.0)
    with pytest.raises(ValueError, match="num_val"):
        ShapesDetectionDataModule(num_val=0)


# --------------------------------------------------------------------------------------------- COCO reader
def _write_coco(root, annotations, images=None):
    """Three images: 40x80 (red box at x 10..30, y 5..25), 60x30 and 50x50 (no objects)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    sizes = {"a.png": (40, 80), "b.png": (60, 30), "c.png": (50, 50)}
    for name, (h, w) in sizes.items():
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        if name == "a.png":
            image[0, 5:25, 10:30] = 255
        write_png(image, str(root / "images" / name))
    images = images or [{"id": i + 1, "file_name": n, "height": h, "width": w}
                        for i, (n, (h, w)) in enumerate(sizes.items())]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "person"}]}
    (root / "annotations.json").write_text(json.dumps(data))


def test_coco_reader_on_tiny_folder(tmp_path):
    _write_coco(tmp_path, [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 20], "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 3, "bbox": [2, 3, 20, 40], "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1},
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [25, 50, 10, 30], "iscrowd": 0},  # clipped to 30x60
    ])
    dm = CocoDetectionDataModule(tmp_path, image_size=40, val_fraction=0.34, augment=False, num_workers=0,
                                 batch_size=3)
    assert dm.num_classes == 2 and dm.class_names == ["person", "car"]  # category ids 3, 7 in id order
    dm.setup()
    assert len(dm.splits["train"]) == 2 and len(dm.splits["val"]) == 1 and dm.splits["test"] is dm.splits["val"]
    assert {im["id"] for im in dm.splits["train"].images} | {im["id"] for im in dm.splits["val"].images} == {1, 2, 3}

    full = CocoDetectionDataModule(tmp_path, image_size=40, val_annotations="annotations.json", augment=False,
                                   num_workers=0, batch_size=3)
    full.setup()
    images, targets = next(iter(full.val_dataloader()))
    assert images.shape == (3, 3, 40, 40)
    # image a (40x80) is scaled by 1/2 and padded at the bottom: the red square becomes x 5..15, y 2.5..12.5
    a = targets[0]
    torch.testing.assert_close(a["boxes"], torch.tensor([[5.0, 2.5, 15.0, 12.5]]))
    assert a["labels"].tolist() == [1] and int(a["image_id"]) == 1
    assert float(images[0, 0, 4:11, 6:14].min()) > 0.9 and float(images[0, 0, 14:20].max()) == 0.0
    # image b (60 high, 30 wide) is scaled by 2/3; the last box is clipped to the image before scaling
    b = targets[1]
    expected = torch.tensor([[2, 3, 22, 43], [0, 0, 10, 10], [25, 50, 30, 60]], dtype=torch.float32) * (2 / 3)
    torch.testing.assert_close(b["boxes"], expected)
    assert b["labels"].tolist() == [0, 1, 0] and b["iscrowd"].tolist() == [0, 1, 0]
    assert targets[2]["boxes"].shape == (0, 4)

    with pytest.raises(ValueError, match="same categories"):
        other = json.loads((tmp_path / "annotations.json").read_text())
        other["categories"] = other["categories"][:1]
        (tmp_path / "val.json").write_text(json.dumps(other))
        CocoDetectionDataModule(tmp_path, val_annotations="val.json").setup()


def test_degenerate_boxes_raise_errors_naming_the_sample(tmp_path):
    _write_coco(tmp_path, [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 20]},
        {"id": 99, "image_id": 2, "category_id": 3, "bbox": [4, 4, 0, 12]},  # zero width
    ])
    with pytest.raises(ValueError, match=r"'b.png' \(id 2\), annotation 99: degenerate box.*invalid_boxes='drop'"):
        CocoDetectionDataModule(tmp_path, num_workers=0).setup()
    dm = CocoDetectionDataModule(tmp_path, num_workers=0, invalid_boxes="drop", val_fraction=0.5)
    dm.setup()
    assert sum(len(dm.splits[s][i][1]["boxes"]) for s in ("train", "val") for i in range(len(dm.splits[s]))) == 1

    # the task names the sample of a malformed batch before any forward
    task = _small_task()
    bad = make_target(torch.tensor([[3.0, 3.0, 20.0, 20.0], [30.0, 10.0, 30.0, 18.0]]), torch.tensor([0, 2]), 17)
    good = make_target(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([1]), 16)
    with pytest.raises(ValueError, match=r"image_id 17 \(position 1 in the batch\): box 1 .* degenerate"):
        task._check_targets(torch.zeros(2, 3, 64, 64), [good, bad])
    wrong_label = make_target(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([4]), 5)
    with pytest.raises(ValueError, match="image_id 5.*label 4 is outside"):
        task._check_targets(torch.zeros(1, 3, 64, 64), [wrong_label])
    with pytest.raises(ValueError, match="share one size"):
        detection_collate([(torch.zeros(3, 8, 8), good), (torch.zeros(3, 8, 9), good)])


# --------------------------------------------------------------------------------------------- task
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step called without a Trainer
def test_model_contract_training_and_image_logging():
    """``task.model`` is the whole network (backbone, FPN, head) for methods and profiling; training on
    one batch lowers the loss, BN statistics keep updating; validation logs drawn images."""
    task = _small_task()
    parts = {name.split(".")[0] for name, _ in task.model.named_parameters()}
    assert parts == {"backbone", "fpn", "cls_head", "box_head"}
    outputs = task.model(task.example_input_array)
    assert [o.shape[1:] for o in outputs] == [(9, 16, 16), (9, 8, 8), (9, 4, 4)]
    assert task.output_modules() == [task.model.cls_head.cls_logits, task.model.box_head.bbox_reg,
                                     task.model.box_head.bbox_ctrness]
    head_macs = sum(v.macs for k, v in profile(task.model, task.example_input_array,
                                               measure_latency=False).per_layer.items() if "head" in k)
    assert head_macs > 0

    dm = ShapesDetectionDataModule(image_size=64, min_size=8, max_size=32, num_train=8, num_val=4, batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    bn = next(m for m in task.model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before_stats = bn.running_mean.clone()
    optimizer = torch.optim.AdamW(task.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = task.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]
    assert not torch.equal(bn.running_mean, before_stats)

    class ImageLogger(Logger):
        name, version, experiment = "capture", 0, None

        def __init__(self):
            super().__init__()
            self.images = {}

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_image(self, key, images, step=None, **kwargs):
            self.images[key] = (images, kwargs.get("caption"))

    task.hparams.log_samples = 2
    logger = ImageLogger()
    _trainer(logger=logger, limit_val_batches=1).validate(task, datamodule=dm, verbose=False)
    images, captions = logger.images["val/detections"]
    assert len(images) == 2 and images[0].shape == (256, 256, 3) and "true (green)" in captions[0]
    # the true boxes are drawn in green (draw_bounding_boxes' "lime") at their upscaled (x4) position
    x1, y1, x2, y2 = (dm.splits["val"][0][1]["boxes"][0] * 4).long().tolist()
    edge = images[0][y1, x1:x2]
    assert np.mean((edge[:, 1] == 255) & (edge[:, 0] < 64)) > 0.5


def test_num_classes_mismatch_names_the_fix():
    task = _small_task(num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes=3.*ShapesDetectionDataModule.num_classes = 4"):
        _trainer(max_steps=1).fit(task, datamodule=ShapesDetectionDataModule(image_size=64, max_size=32))
    with pytest.raises(ValueError, match="strides"):
        _small_task(strides=[4, 8, 64])
    with pytest.raises(ValueError, match="level_boundaries"):
        _small_task(level_boundaries=[10])


def test_recipe_fast_dev_run(tmp_path, monkeypatch):
    from lightning_effnets.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", "detection/baseline", "--trainer.fast_dev_run=true", "--trainer.logger=false",
                "--trainer.callbacks=[]"])
    assert isinstance(cli.model, ObjectDetector)
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and 0.0 <= float(metrics["val/map_50"]) <= 1.0
