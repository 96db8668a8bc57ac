"""The one contract between task modules and compression methods.

Every task module mixes in :class:`EffnetsTaskMixin`. Methods (callbacks) rely on nothing else:

* ``self.model`` -- the network being trained. Conversions (adder, binary, camera BN), pruning and
  profiling act on it, so it holds *every* trainable layer of the task (backbone, neck, heads).
* ``example_input_array`` -- an input that ``self.model`` accepts; used for tracing (pruning),
  cost profiling and exports.
* ``auxiliary_losses`` -- a dict that callbacks fill during a training step (distillation terms,
  regularisers). The task adds :meth:`pop_auxiliary_loss` to its own loss, which also logs every term.
* :meth:`side_information` -- optional per-batch information a method may need before the forward
  (for example the camera ids of a re-identification batch).
* :meth:`task_loss` -- the task's supervised loss of a model output for a batch, so a method can train a second
  network (a distillation teacher) with the task's own objective.
* :meth:`output_modules` -- the layers whose output shape defines the task (classifier, box head,
  upsampler); structural methods must leave their output channels unchanged.

Nothing here names a method: that is what lets any method attach to any task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["EffnetsTaskMixin", "OptimizerFactory", "SchedulerFactory", "default_optimizer", "set_lr_scale"]

#: ``params -> Optimizer`` (what LightningCLI's ``OptimizerCallable`` gives from YAML ``class_path``/``init_args``).
OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
#: ``optimizer -> LRScheduler`` (LightningCLI's ``LRSchedulerCallable``).
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """AdamW(lr=1e-3, weight_decay=0.05): a robust default for training small models from scratch."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


def set_lr_scale(parameters: Iterable[nn.Parameter], scale: float) -> None:
    """Ask the task's optimizer for ``scale`` x its learning rate on ``parameters`` (a per-parameter attribute read by
    :meth:`EffnetsTaskMixin.optimizer_param_groups`; set it before the optimizer is built, e.g. in ``setup``)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"lr_scale must be a positive number, got {scale!r}")
    for p in parameters:
        p.lr_scale = float(scale)  # type: ignore[attr-defined]


class EffnetsTaskMixin:
    """Mixin for :class:`lightning.LightningModule` task modules (see module docstring)."""

    model: nn.Module

    # ----------------------------------------------------------------- auxiliary losses
    @property
    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Loss terms added by callbacks during the current step (name -> scalar tensor)."""
        losses = self.__dict__.get("_effnets_aux_losses")
        if losses is None:
            losses = {}
            self.__dict__["_effnets_aux_losses"] = losses
        return losses

    def add_auxiliary_loss(self, name: str, value: Tensor) -> None:
        """Register a loss term for the current training step; terms with the same name add up."""
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"auxiliary loss {name!r} must be a scalar tensor, got {type(value).__name__}"
                             f"{' of shape ' + str(tuple(value.shape)) if isinstance(value, Tensor) else ''}")
        losses = self.auxiliary_losses
        losses[name] = losses[name] + value.reshape(()) if name in losses else value.reshape(())

    def pop_auxiliary_loss(self, reference: Tensor) -> Tensor:
        """Sum, log (``train/aux/<name>``) and clear the auxiliary losses; zero if there are none.

        ``reference`` is the task loss, used for the device/dtype of the zero.
        """
        losses = self.auxiliary_losses
        total = reference.new_zeros(())
        log = getattr(self, "log", None)
        for name, value in losses.items():
            total = total + value
            if log is not None and getattr(self, "_trainer", None) is not None:
                log(f"train/aux/{name}", value.detach(), on_step=True, on_epoch=True)
        losses.clear()
        return total

    # ----------------------------------------------------------------- optimisation
    def init_optimization(
        self,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        no_weight_decay_norm_bias: bool = True,
    ) -> None:
        """Record how :meth:`configure_optimizers` builds the optimizer (call from ``__init__``).

        ``scheduler`` (a callable, e.g. from YAML) wins over ``lr_schedule``; ``"cosine"`` decays the
        learning rate to 0 over ``trainer.estimated_stepping_batches`` after a linear warm-up.
        """
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = scheduler
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.no_weight_decay_norm_bias = no_weight_decay_norm_bias

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters of the module (callbacks may have added some), grouped: weights with weight
        decay, and (if ``no_weight_decay_norm_bias``) 1-D tensors without; parameters that carry an
        ``lr_scale`` attribute (set by methods, see :func:`set_lr_scale`) get their own group with that key,
        and :meth:`configure_optimizers` multiplies the group's learning rate by it."""
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for p in self.parameters():  # type: ignore[attr-defined]
            if not p.requires_grad:
                continue
            no_decay = self.no_weight_decay_norm_bias and p.ndim <= 1
            groups.setdefault((no_decay, float(getattr(p, "lr_scale", 1.0))), []).append(p)
        result = []
        for (no_decay, scale), params in sorted(groups.items(), key=lambda item: item[0]):
            group: dict[str, Any] = {"params": params}
            if no_decay:
                group["weight_decay"] = 0.0
            if scale != 1.0:
                group["lr_scale"] = scale
            result.append(group)
        return result

    def configure_optimizers(self) -> Any:
        if not hasattr(self, "optimizer_factory"):
            raise RuntimeError(f"{type(self).__name__}.__init__ must call self.init_optimization(...)")
        optimizer = self.optimizer_factory(self.optimizer_param_groups())
        for group in optimizer.param_groups:  # before any scheduler records the initial learning rates
            if "lr_scale" in group:
                group["lr"] = group["lr"] * group["lr_scale"]
        if self.scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)  # type: ignore[attr-defined]
        warmup, cosine = self.warmup_steps, self.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- side information
    def side_information(self, batch: Any) -> dict[str, Any]:
        """Per-batch information that methods may need before the forward (default: none).

        Tasks override this, e.g. ``{"camera_ids": LongTensor[B]}`` for re-identification.
        """
        return {}

    # ----------------------------------------------------------------- task loss
    def task_loss(self, output: Any, batch: Any) -> Tensor | None:
        """The task's supervised training loss (a scalar) of ``output = self.model(*inputs)`` for ``batch``,
        without the auxiliary losses; ``None`` (this default) means the task exposes no loss.

        Tasks compute their own training loss through it, so the loss has one definition per task, and methods
        can train another network of the same interface with the task's objective: progressive kernel
        distillation trains its CNN teacher on ``task_loss(teacher(*inputs), batch)``. ``batch`` is the batch
        ``training_step`` receives (already checked by the task, which reports malformed batches); ``output`` may
        come from a network other than ``self.model``. It must not log or keep state: a method may call it on
        another network's output in the middle of a training step.
        """
        return None

    # ----------------------------------------------------------------- structure
    def output_modules(self) -> list[nn.Module]:
        """Layers whose outputs define the task's output (kept intact by structural methods).

        Default: the last ``nn.Linear``/``nn.Conv2d`` of ``self.model`` in registration order,
        which is the classifier for timm-style models. Tasks with several heads override it.
        """
        last = None
        for module in self.model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                last = module
        return [last] if last is not None else []

    # ----------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild a structure recorded in the checkpoint (the conversions of AdderConversion / Binarization /
        CameraBN from their callback state, then channel pruning from its record in the state-dict metadata)
        before the weights are copied, so plain ``Task.load_from_checkpoint(path)`` and
        ``Trainer.test(ckpt_path=...)`` work on structurally changed checkpoints. Overrides must call super()."""
        from lightning_effnets.callbacks.structure import restore_converted_structure

        model = getattr(self, "model", None)
        if isinstance(model, nn.Module):  # conversions happened in setup, before any pruning: replay them first
            restore_converted_structure(model, checkpoint)
        state = checkpoint.get("state_dict")
        if getattr(state, "_metadata", None):
            from lightning_effnets.pruning.record import restore_structure

            restore_structure(self, state)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- image logging
    def log_images(self, key: str, images: list[Any], captions: list[str] | None = None) -> bool:
        """Log images to every logger that supports it (W&B); returns whether any did.

        ``images`` are CHW/HW tensors in [0, 1], numpy arrays or PIL images.
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.sanity_checking or not images:
            return False
        prepared = [_to_numpy_image(im) for im in images]
        logged = False
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if log_image is not None:
                kwargs = {"caption": captions} if captions is not None else {}
                log_image(key=key, images=prepared, step=trainer.global_step, **kwargs)
                logged = True
        return logged


def _to_numpy_image(image: Any) -> Any:
    if isinstance(image, Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3:
            if image.shape[0] == 1:
                image = image[0]
            else:
                image = image.permute(1, 2, 0)
        return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return image
