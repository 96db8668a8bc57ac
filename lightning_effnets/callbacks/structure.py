"""Rebuild, from a checkpoint alone, the layer swaps that conversion callbacks made in ``setup``.

``AdderConversion``, ``Binarization`` and ``CameraBN`` change the task's network before training starts and store
what they changed in their callback state. A checkpoint therefore describes a converted network, which a freshly
built task does not have. :meth:`EffnetsTaskMixin.on_load_checkpoint` calls :func:`restore_converted_structure`
so that plain ``Task.load_from_checkpoint(path)`` and ``Trainer.test(ckpt_path=...)`` (where Lightning restores
no callback state) rebuild the converted layers before the weights are copied. Within ``Trainer.fit`` the
callbacks have already converted the network in ``setup``, and nothing is done twice.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["restore_converted_structure"]


def restore_converted_structure(model: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Re-apply every recorded conversion of ``checkpoint["callbacks"]`` to ``model``; returns the callbacks used.

    Conversions are replayed in the order the callbacks were listed in the Trainer, which is the order their
    ``setup`` converted the network in.
    """
    from lightning_effnets.callbacks.adder import AdderConversion
    from lightning_effnets.callbacks.binary import Binarization
    from lightning_effnets.callbacks.camera_bn import CameraBN

    restorers = (AdderConversion, Binarization, CameraBN)
    applied = []
    for key, state in checkpoint.get("callbacks", {}).items():
        for callback in restorers:
            if str(key).startswith(callback.__qualname__) and state and callback.restore_structure(model, state):
                applied.append(callback.__qualname__)
    return applied
