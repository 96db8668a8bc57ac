"""Image classification with any timm backbone (compression-agnostic)."""

from __future__ import annotations

import difflib
from typing import Any, Literal

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_effnets.tasks.base import EffnetsTaskMixin, OptimizerFactory, SchedulerFactory

__all__ = ["ImageClassifier", "create_backbone"]


def create_backbone(name: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with a helpful error for unknown names.

    Weights are never downloaded (the project runs offline); train from scratch or load a checkpoint.
    """
    if kwargs.pop("pretrained", False):
        raise ValueError("lightning-effnets creates backbones with pretrained=False (no downloads); "
                         "load your own weights from a checkpoint instead")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models() for all names."
        raise ValueError(f"Unknown timm backbone {name!r}.{hint}")
    return timm.create_model(name, pretrained=False, **kwargs)


class ImageClassifier(EffnetsTaskMixin, pl.LightningModule):
    """Classify images with a timm backbone trained from scratch.

    Args:
        backbone: any timm model name (``timm.list_models()``), created with ``pretrained=False``.
        num_classes: number of classes; checked against the datamodule's ``num_classes`` before training.
        in_chans: input channels (1 for grayscale digits, 3 for RGB).
        image_size: side of the square input, for ``example_input_array``.
        label_smoothing: cross-entropy label smoothing.
        drop_rate: classifier dropout passed to timm.
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        optimizer: ``params -> Optimizer`` (from YAML: ``class_path: torch.optim.SGD`` + ``init_args``);
            default AdamW(lr=1e-3, weight_decay=0.05).
        scheduler: ``optimizer -> LRScheduler``; overrides ``lr_schedule``.
        lr_schedule: built-in per-step schedule, ``"cosine"`` (to zero over the whole fit) or ``"constant"``.
        warmup_steps: linear warm-up steps of the built-in schedule.
        log_samples: how many validation images (with prediction and label) to log per epoch; 0 disables.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        in_chans: int = 3,
        image_size: int = 32,
        label_smoothing: float = 0.0,
        drop_rate: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        log_samples: int = 16,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = create_backbone(backbone, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                                     **(backbone_kwargs or {}))
        self.example_input_array = torch.zeros(1, in_chans, image_size, image_size)
        self.init_optimization(optimizer, scheduler, lr_schedule, warmup_steps)
        top5 = min(5, num_classes)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")
            for stage in ("train", "val", "test") for name, k in (("acc", 1), ("acc_top5", top5))
        })

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("num_classes", "in_chans"):
            expected = getattr(datamodule, attr, None)
            if expected is not None and expected != self.hparams[attr]:
                raise ValueError(
                    f"{type(self).__name__}({attr}={self.hparams[attr]}) does not match the data: "
                    f"{type(datamodule).__name__}.{attr} = {expected}. Set model {attr}: {expected} "
                    f"(YAML: model.init_args.{attr}).")

    def task_loss(self, output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Cross-entropy (with ``label_smoothing``) of the logits ``output`` against the batch labels."""
        return F.cross_entropy(output, batch[1], label_smoothing=self.hparams.label_smoothing)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        images, targets = batch
        if targets.numel() and (int(targets.max()) >= self.hparams.num_classes or int(targets.min()) < 0):
            raise ValueError(f"label {int(targets.max())} is outside [0, num_classes={self.hparams.num_classes})")
        logits = self(images)
        loss = self.task_loss(logits, batch)
        for name in ("acc", "acc_top5"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(logits, targets)
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc")
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=stage != "train")
        return loss, logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._shared_step(batch, "train")
        return loss + self.pop_auxiliary_loss(loss)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        _, logits = self._shared_step(batch, "val")
        if batch_idx == 0 and self.hparams.log_samples > 0:
            n = self.hparams.log_samples
            images, targets = batch
            preds = logits.argmax(dim=1)
            captions = [f"pred {int(p)} / true {int(t)}" for p, t in zip(preds[:n], targets[:n])]
            self.log_images("val/samples", list(images[:n]), captions)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(images).softmax(dim=1)
        return {"probs": probs, "preds": probs.argmax(dim=1)}
