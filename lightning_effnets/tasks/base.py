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
* :meth:`output_modules` -- the layers whose output shape defines the task (classifier, box head,
  upsampler); structural methods must leave their output channels unchanged.

Nothing here names a method: that is what lets any method attach to any task.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EffnetsTaskMixin"]


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

    # ----------------------------------------------------------------- side information
    def side_information(self, batch: Any) -> dict[str, Any]:
        """Per-batch information that methods may need before the forward (default: none).

        Tasks override this, e.g. ``{"camera_ids": LongTensor[B]}`` for re-identification.
        """
        return {}

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
