"""Person re-identification: a timm backbone with a BNNeck, identity + batch-hard triplet losses.

The recipe is the "bag of tricks" strong baseline (Luo et al., arXiv:1903.07071): globally pooled backbone
features feed a batch-hard triplet loss (Hermans et al., arXiv:1703.07737); the same features pass a BatchNorm1d
"BNNeck" (bias frozen) before a bias-free identity classifier trained with label-smoothed cross-entropy, and
retrieval uses the normalised features after the BNNeck. Evaluation follows the query/gallery protocol of
:mod:`lightning_effnets.metrics.reid` (mAP, CMC rank-1/5/10), overall and per camera group (seen / held-out).

Batches are dicts (:data:`lightning_effnets.data.reid.BATCH_KEYS`) that carry the camera id of every image;
:meth:`PersonReID.side_information` hands them to camera-aware methods (camera-based BN, arXiv:2001.08680).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_effnets.metrics.reid import Distance, ReIDMetric, pairwise_distance
from lightning_effnets.tasks.base import EffnetsTaskMixin, OptimizerFactory, SchedulerFactory
from lightning_effnets.tasks.classification import create_backbone

__all__ = ["PersonReID", "ReIDBatch", "ReIDNet", "ReIDOutput", "batch_hard_triplet_loss", "unpack_reid_batch"]


class ReIDOutput(NamedTuple):
    """What :class:`ReIDNet` returns."""

    features: Tensor  # pooled backbone features [B, D] (triplet loss; "before" the BNNeck)
    embeddings: Tensor  # after the BNNeck's BatchNorm1d [B, D] (retrieval)
    logits: Tensor  # identity logits [B, num_classes]


class ReIDNet(nn.Module):
    """Backbone -> pooled features -> BNNeck (BatchNorm1d, bias frozen) -> bias-free classifier.

    The BN bias stays zero (the BNNeck paper: a shifted embedding would fight the triplet geometry); the
    classifier is initialised with ``std=0.001`` as in the authors' code.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        dim = getattr(backbone, "num_features", None)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(backbone).__name__} does not expose num_features; use a timm backbone created "
                             "with num_classes=0")
        self.backbone = backbone
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images: Tensor) -> ReIDOutput:
        features = self.backbone(images)
        if features.ndim != 2:
            raise ValueError(f"the backbone must return pooled [B, D] features, got shape {tuple(features.shape)}; "
                             "create it with num_classes=0 and global pooling")
        embeddings = self.bottleneck(features)
        return ReIDOutput(features, embeddings, self.classifier(embeddings))


def batch_hard_triplet_loss(features: Tensor, labels: Tensor, margin: float | None = 0.3) -> Tensor:
    """Batch-hard triplet loss (arXiv:1703.07737) with Euclidean distances.

    For every anchor: its farthest same-identity sample and its nearest other-identity sample in the batch;
    loss ``relu(d_ap - d_an + margin)``, or the soft margin ``softplus(d_ap - d_an)`` when ``margin`` is None,
    averaged over anchors that have both a positive (other than themselves) and a negative. Zero (still
    differentiable) when no anchor qualifies.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be [B, D] and labels [B], got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    sq = features.pow(2).sum(dim=1)
    # squared distances through the Gram matrix; the clamp keeps sqrt differentiable at zero distance
    dist = (sq[:, None] + sq[None, :] - 2.0 * features @ features.T).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not bool(valid.any()):
        return features.sum() * 0.0
    hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    gap = (hardest_pos - hardest_neg)[valid]
    return F.softplus(gap).mean() if margin is None else F.relu(gap + margin).mean()


class ReIDBatch(NamedTuple):
    """A re-identification batch after validation (see :func:`unpack_reid_batch`)."""

    images: Tensor
    person_ids: Tensor
    camera_ids: Tensor
    is_query: Tensor
    indices: Tensor | None


def unpack_reid_batch(batch: Any) -> ReIDBatch:
    """Check a batch dict (``images``, ``person_ids``, ``camera_ids``, optional ``is_query``, ``indices``).

    Raises:
        ValueError: naming what is missing or malformed, and how datasets should provide it.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"PersonReID expects dict batches with keys 'images', 'person_ids', 'camera_ids' (and 'is_query' for "
            f"evaluation), got a {type(batch).__name__}. Use lightning_effnets.data.ReIDDataset or a dataset whose "
            "items are such dicts: every image needs its camera id.")
    if "camera_ids" not in batch:
        raise ValueError(
            f"this batch has no 'camera_ids' (keys: {sorted(batch)}): person re-identification needs the camera id "
            "of every image (the evaluation protocol excludes same-camera matches, camera-aware methods normalise "
            "per camera). Make the dataset return 'camera_ids' (0-based) with every image.")
    for key in ("images", "person_ids"):
        if key not in batch:
            raise ValueError(f"this batch has no {key!r} (keys: {sorted(batch)})")
    images, pids, cams = batch["images"], batch["person_ids"], batch["camera_ids"]
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"batch['images'] must be a [B, C, H, W] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    n = images.shape[0]
    cams = torch.as_tensor(cams, device=images.device)
    pids = torch.as_tensor(pids, device=images.device)
    if cams.shape != (n,) or pids.shape != (n,):
        raise ValueError(f"batch['camera_ids'] and batch['person_ids'] must have shape ({n},), got "
                         f"{tuple(cams.shape)} and {tuple(pids.shape)}")
    if cams.is_floating_point() or (n and int(cams.min()) < 0):
        raise ValueError("batch['camera_ids'] must be integers >= 0 (0-based camera index)")
    is_query = batch.get("is_query")
    is_query = torch.zeros(n, dtype=torch.bool, device=images.device) if is_query is None else is_query.bool()
    return ReIDBatch(images, pids.long(), cams.long(), is_query, batch.get("indices"))


class PersonReID(EffnetsTaskMixin, pl.LightningModule):
    """Person re-identification with a timm backbone + BNNeck, trained from scratch.

    Training batches should come from a P x K identity sampler (:class:`lightning_effnets.data.PKSampler`) so
    that the triplet loss finds positives. Logs ``train/{loss,id_loss,triplet_loss,acc}`` and, at the end of
    every evaluation epoch, ``{val,test}/{mAP,rank1,rank5,rank10,num_queries}`` plus the same per camera group
    (``test/held_out/mAP``...).

    Args:
        backbone: timm model name, created with ``num_classes=0`` (pooled features), ``pretrained=False``.
        num_classes: training identities; checked against the datamodule's ``num_classes``.
        in_chans: input channels.
        image_size: ``(height, width)`` of the input, for ``example_input_array``.
        label_smoothing: of the identity cross-entropy (0.1 in the BNNeck paper).
        triplet_margin: margin of the batch-hard triplet loss; ``None`` for the soft margin.
        id_loss_weight / triplet_loss_weight: weights of the two losses (0 disables one).
        neck_feature: retrieval embedding, ``"after"`` the BNNeck (default) or ``"before"`` it.
        distance: ``"cosine"`` or ``"euclidean"`` between embeddings.
        camera_groups: name -> camera ids evaluated separately; default: the datamodule's ``camera_groups``
            (``seen`` / ``held_out`` cameras).
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"output_stride": 16}``).
        optimizer / scheduler / lr_schedule / warmup_steps: see :meth:`EffnetsTaskMixin.init_optimization`.
        log_samples: validation queries whose top-5 in-batch retrievals are logged as images; 0 disables.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 751,
        in_chans: int = 3,
        image_size: tuple[int, int] = (256, 128),
        label_smoothing: float = 0.1,
        triplet_margin: float | None = 0.3,
        id_loss_weight: float = 1.0,
        triplet_loss_weight: float = 1.0,
        neck_feature: Literal["after", "before"] = "after",
        distance: Distance = "cosine",
        camera_groups: dict[str, list[int]] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        log_samples: int = 4,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes (training identities) must be >= 2, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if triplet_margin is not None and triplet_margin < 0:
            raise ValueError(f"triplet_margin must be >= 0 or None (soft margin), got {triplet_margin}")
        if id_loss_weight < 0 or triplet_loss_weight < 0 or id_loss_weight + triplet_loss_weight == 0:
            raise ValueError("id_loss_weight and triplet_loss_weight must be >= 0 and not both 0")
        if neck_feature not in ("after", "before"):
            raise ValueError(f"neck_feature must be 'after' or 'before', got {neck_feature!r}")
        image_size = tuple(int(s) for s in image_size)  # type: ignore[assignment]
        if len(image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {image_size}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = ReIDNet(create_backbone(backbone, num_classes=0, in_chans=in_chans, **(backbone_kwargs or {})),
                             num_classes)
        # batch of 2: BatchNorm1d cannot normalise a single sample in training mode (tracing may run in train mode)
        self.example_input_array = torch.zeros(2, in_chans, *image_size)
        self.init_optimization(optimizer, scheduler, lr_schedule, warmup_steps)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_metric = ReIDMetric(distance=distance, camera_groups=camera_groups)
        self.test_metric = ReIDMetric(distance=distance, camera_groups=camera_groups)

    def forward(self, images: Tensor) -> ReIDOutput:
        return self.model(images)

    def output_modules(self) -> list[nn.Module]:
        """The identity classifier: its output size is the number of training identities."""
        return [self.model.classifier]

    def side_information(self, batch: Any) -> dict[str, Any]:
        """``{"camera_ids": LongTensor[B]}`` on the module's device (what camera-aware methods read)."""
        return {"camera_ids": unpack_reid_batch(batch).camera_ids.to(self.device)}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("num_classes", "in_chans"):
            expected = getattr(datamodule, attr, None)
            if expected is not None and expected != self.hparams[attr]:
                raise ValueError(
                    f"{type(self).__name__}({attr}={self.hparams[attr]}) does not match the data: "
                    f"{type(datamodule).__name__}.{attr} = {expected}. Set model {attr}: {expected} "
                    f"(YAML: model.init_args.{attr}).")
        if self.hparams.camera_groups is None:
            groups = getattr(datamodule, "camera_groups", None) or {}
            self.val_metric.camera_groups = groups
            self.test_metric.camera_groups = groups

    def embed(self, output: ReIDOutput) -> Tensor:
        """The retrieval embedding of a forward output (``neck_feature``)."""
        return output.embeddings if self.hparams.neck_feature == "after" else output.features

    # ----------------------------------------------------------------- training
    def _loss_terms(self, output: ReIDOutput, labels: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``id_loss_weight * ID + triplet_loss_weight * triplet`` and the unweighted ``(ID, triplet)`` terms: the
        identity cross-entropy (label-smoothed) of the logits and the batch-hard triplet loss of the features
        before the BNNeck."""
        id_loss = F.cross_entropy(output.logits, labels, label_smoothing=self.hparams.label_smoothing)
        triplet = batch_hard_triplet_loss(output.features, labels, self.hparams.triplet_margin)
        loss = self.hparams.id_loss_weight * id_loss + self.hparams.triplet_loss_weight * triplet
        return loss, (id_loss, triplet)

    def task_loss(self, output: ReIDOutput, batch: Any) -> Tensor:
        """The re-id training loss of a :class:`ReIDOutput` for the batch's person ids (see :meth:`_loss_terms`)."""
        return self._loss_terms(output, unpack_reid_batch(batch).person_ids)[0]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        data = unpack_reid_batch(batch)
        labels = data.person_ids
        num_classes = self.hparams.num_classes
        outside = (labels < 0) | (labels >= num_classes)
        if bool(outside.any()):
            raise ValueError(f"training person id {int(labels[outside][0])} is outside [0, num_classes={num_classes}); "
                             "training ids must be relabelled to class indices (the ReID datamodules do this)")
        out = self.model(data.images)
        loss, (id_loss, triplet) = self._loss_terms(out, labels)
        self.train_acc(out.logits.detach(), labels)
        self.log("train/id_loss", id_loss, on_step=False, on_epoch=True)
        self.log("train/triplet_loss", triplet, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss + self.pop_auxiliary_loss(loss)

    # ----------------------------------------------------------------- evaluation
    def _evaluation_step(self, batch: Any, metric: ReIDMetric) -> tuple[ReIDBatch, Tensor]:
        data = unpack_reid_batch(batch)
        embeddings = self.embed(self.model(data.images))
        metric.update(embeddings, data.person_ids, data.camera_ids, data.is_query, data.indices)
        return data, embeddings

    def _log_results(self, metric: ReIDMetric, stage: str) -> None:
        results = metric.compute()
        metric.reset()
        # identical on every rank (the metric gathered all images); sync_dist keeps Lightning's DDP check quiet
        for key, value in results.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in ("mAP", "rank1"), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        data, embeddings = self._evaluation_step(batch, self.val_metric)
        if batch_idx == 0 and self.hparams.log_samples > 0 and not self.trainer.sanity_checking:
            strips, captions = retrieval_strips(data, embeddings, self.hparams.log_samples, self.hparams.distance)
            self.log_images("val/retrievals", strips, captions)

    def on_validation_epoch_end(self) -> None:
        self._log_results(self.val_metric, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, self.test_metric)

    def on_test_epoch_end(self) -> None:
        self._log_results(self.test_metric, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        data = unpack_reid_batch(batch)
        return {"embeddings": self.embed(self.model(data.images)), "person_ids": data.person_ids,
                "camera_ids": data.camera_ids, "is_query": data.is_query}


def retrieval_strips(data: ReIDBatch, embeddings: Tensor, num_queries: int, distance: Distance = "cosine",
                     top: int = 5) -> tuple[list[Tensor], list[str]]:
    """Images of ``query | top-k gallery`` (green border: same person, red: another) within one batch.

    The protocol's exclusions apply (same person and camera, junk id -1). Queries without a match in the batch
    are skipped.
    """
    query = data.is_query.nonzero().flatten().tolist()
    gallery = (~data.is_query).nonzero().flatten()
    strips, captions = [], []
    if not len(gallery):
        return strips, captions
    dist = pairwise_distance(embeddings[query], embeddings[gallery], distance) if query else None
    pad = 2
    for row, q in enumerate(query):
        g_ids, g_cams = data.person_ids[gallery], data.camera_ids[gallery]
        keep = ~(((g_ids == data.person_ids[q]) & (g_cams == data.camera_ids[q])) | (g_ids == -1))
        if not bool((keep & (g_ids == data.person_ids[q])).any()):
            continue
        candidates = gallery[keep][dist[row][keep].argsort()[:top]]
        tiles = [F.pad(data.images[q].float(), (pad,) * 4, value=1.0)]
        marks = []
        for g in candidates.tolist():
            hit = bool(data.person_ids[g] == data.person_ids[q])
            colour = torch.tensor([0.0, 0.8, 0.0] if hit else [0.9, 0.0, 0.0], device=embeddings.device)
            tile = F.pad(data.images[g].float(), (pad,) * 4, value=0.0)
            border = torch.ones_like(tile[0], dtype=torch.bool)
            border[pad:-pad, pad:-pad] = False
            tile[:, border] = colour.view(3, 1)[: tile.shape[0]]
            tiles.append(tile)
            marks.append("+" if hit else "-")
        strips.append(torch.cat(tiles, dim=2).clamp(0, 1).cpu())
        captions.append(f"query id {int(data.person_ids[q])} cam {int(data.camera_ids[q])}: {' '.join(marks)}")
        if len(strips) == num_queries:
            break
    return strips, captions
