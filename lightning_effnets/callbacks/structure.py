"""Rebuild, from a checkpoint alone, the layer swaps that conversion callbacks made in ``setup``.

``AdderConversion``, ``Binarization`` and ``CameraBN`` change the task's network before training starts and store
what they changed in their callback state. A checkpoint therefore describes a converted network, which a freshly
built task does not have. :meth:`EffnetsTaskMixin.on_load_checkpoint` calls :func:`restore_converted_structure`
so that plain ``Task.load_from_checkpoint(path)`` and ``Trainer.test(ckpt_path=...)`` (where Lightning restores
no callback state) rebuild the converted layers before the weights are copied. Within ``Trainer.fit`` the
callbacks have already converted the network in ``setup``, and nothing is done twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["restore_converted_structure"]

Replayer = Callable[[nn.Module, dict[str, Any]], bool]


def _replay_record(is_converted: Callable[[nn.Module, dict[str, Any]], bool],
                   restore: Callable[[nn.Module, dict[str, Any]], Any]) -> Replayer:
    """A replayer for callbacks whose state is a layer-swap record: apply it unless the model already is converted."""

    def replay(model: nn.Module, state: dict[str, Any]) -> bool:
        if not state or is_converted(model, state):
            return False
        restore(model, state)
        return True

    return replay


def restore_converted_structure(model: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Re-apply every recorded conversion of ``checkpoint["callbacks"]`` to ``model``; returns the callbacks used.

    Conversions are replayed in the order the callbacks were listed in the Trainer, which is the order their
    ``setup`` converted the network in.
    """
    from lightning_effnets.callbacks import adder, binary
    from lightning_effnets.callbacks.camera_bn import CameraBN
    from lightning_effnets.convert import restore_adder, restore_binary

    replayers: dict[str, Replayer] = {
        "AdderConversion": _replay_record(adder._is_converted, restore_adder),
        "Binarization": _replay_record(binary._is_converted, restore_binary),
        "CameraBN": CameraBN.restore_structure,
    }
    applied = []
    for key, state in checkpoint.get("callbacks", {}).items():
        for name, replay in replayers.items():
            if str(key).startswith(name) and state and replay(model, state):
                applied.append(name)
    return applied
