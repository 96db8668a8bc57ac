"""The pruned structure as data: record it, save it with the weights, replay it on a fresh model.

A :class:`PruningRecord` is the list of pruning steps (per step: root layer name -> removed output channels)
plus the shape of the example input used to trace the model. Replaying it on a freshly constructed model gives
the pruned architecture, exactly; the weights then load as usual.

The record travels *inside* the state dict: :func:`attach_record` registers a state-dict hook that writes it to the
model's state-dict metadata (where PyTorch keeps a module's ``version``; it survives ``torch.save``/``torch.load``
with ``weights_only=True``), and a load pre-hook that replays missing steps before the weights are copied. So
``Trainer.fit(ckpt_path=...)`` with the :class:`~lightning_effnets.callbacks.ChannelPruning` callback restores the
pruned model by itself. The project's tasks call :func:`restore_structure` in ``on_load_checkpoint``
(:class:`~lightning_effnets.tasks.base.EffnetsTaskMixin`), so ``ImageClassifier.load_from_checkpoint(path)`` and
``Trainer.test(model, ckpt_path=path)`` rebuild the pruned structure of a fresh module; any other LightningModule
loads with one line::

    model = load_pruned(MyModule, "last.ckpt")  # instead of MyModule.load_from_checkpoint(...)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from lightning_effnets.pruning.graph import build_graph
from lightning_effnets.pruning.planning import Decision
from lightning_effnets.pruning.surgery import apply_decisions

__all__ = ["PruningRecord", "attach_record", "get_record", "replay", "restore_on_load", "restore_structure",
           "load_pruned", "METADATA_KEY"]

#: key of the record in a module's state-dict metadata
METADATA_KEY = "effnets_pruning"
_ATTR = "_effnets_pruning_record"
_HOOKED = "_effnets_pruning_hooked"
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.uint8, torch.bool)}


def input_spec(example_input: Any) -> Any:
    """Shapes and dtypes of a (nested) example input, enough to rebuild a zero input for tracing."""
    if isinstance(example_input, torch.Tensor):
        return {"shape": list(example_input.shape), "dtype": str(example_input.dtype)}
    if isinstance(example_input, (tuple, list)):
        return {"seq": [input_spec(x) for x in example_input]}
    if isinstance(example_input, dict):
        return {"map": {k: input_spec(v) for k, v in example_input.items()}}
    raise TypeError("example input must be tensors (possibly in a tuple/list/dict), got "
                    f"{type(example_input).__name__}")


def input_from_spec(spec: Any, device: torch.device | str = "cpu") -> Any:
    if "shape" in spec:
        return torch.zeros(spec["shape"], dtype=_DTYPES.get(spec["dtype"], torch.float32), device=device)
    if "seq" in spec:
        return tuple(input_from_spec(s, device) for s in spec["seq"])
    return {k: input_from_spec(v, device) for k, v in spec["map"].items()}


@dataclass
class PruningRecord:
    """Replayable description of a pruned structure (see module docstring)."""

    input: Any
    steps: list[list[Decision]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "input": copy.deepcopy(self.input),
                "steps": [[[root, [int(i) for i in idxs]] for root, idxs in step] for step in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningRecord:
        if data.get("version") != 1:
            raise ValueError(f"unsupported pruning record version {data.get('version')!r}")
        steps = [[(str(root), [int(i) for i in idxs]) for root, idxs in step] for step in data["steps"]]
        return cls(input=copy.deepcopy(data["input"]), steps=steps)

    def example_input(self, device: torch.device | str = "cpu") -> Any:
        return input_from_spec(self.input, device)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruningRecord) and self.to_dict()["steps"] == other.to_dict()["steps"]


def get_record(model: nn.Module) -> PruningRecord | None:
    """The record of the structure ``model`` has (None if it was never pruned with this package)."""
    return getattr(model, _ATTR, None)


def _device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def replay(model: nn.Module, record: PruningRecord, start: int = 0) -> None:
    """Apply ``record.steps[start:]`` to ``model`` (which has the structure of the first ``start`` steps)."""
    example = record.example_input(_device(model))
    for step in record.steps[start:]:
        graph = build_graph(model, example)
        apply_decisions(model, graph, step, track=False)


def _state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    record = get_record(module)
    if record is not None and record.steps:
        local_metadata[METADATA_KEY] = record.to_dict()


def _bring_to(module: nn.Module, data: dict[str, Any] | None, where: str) -> None:
    """Make ``module``'s structure the one described by ``data`` (a record dict or None = unpruned)."""
    current = get_record(module)
    have = current.steps if current is not None else []
    if data is None:
        if have:
            raise RuntimeError(f"{where}: the checkpoint holds an unpruned model but {type(module).__name__} has been "
                               f"pruned ({len(have)} step(s)); load it into a freshly constructed model")
        return
    target = PruningRecord.from_dict(data)
    if target.steps[:len(have)] != [list(s) for s in have]:
        raise RuntimeError(f"{where}: the checkpoint was pruned differently ({len(target.steps)} step(s)) from this "
                           f"{type(module).__name__} ({len(have)} step(s)); load it into a freshly constructed model, "
                           "e.g. lightning_effnets.pruning.load_pruned(ModuleClass, path)")
    if len(target.steps) > len(have):
        replay(module, target, start=len(have))
    attach_record(module, target)


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:
    _bring_to(module, local_metadata.get(METADATA_KEY), f"loading {prefix.rstrip('.') or 'model'}")


def restore_on_load(model: nn.Module) -> nn.Module:
    """Make ``model`` carry its pruning record in its state dicts and re-apply a recorded structure found in a
    state dict it loads (idempotent). ``ChannelPruning`` does this in ``setup``; call it yourself on a module
    that loads pruned weights outside a fit, e.g. the main process's module under ``ddp_spawn``."""
    if not getattr(model, _HOOKED, False):
        object.__setattr__(model, _HOOKED, True)
        model.register_state_dict_post_hook(_state_dict_hook)
        model.register_load_state_dict_pre_hook(_load_pre_hook)
    return model


def attach_record(model: nn.Module, record: PruningRecord) -> None:
    """Store ``record`` on ``model`` as the structure it has, and make its state dicts carry it."""
    object.__setattr__(model, _ATTR, record)
    restore_on_load(model)


def restore_structure(root: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Re-apply every pruning record found in ``state_dict``'s metadata to the matching submodule of ``root``
    (``root`` freshly constructed, or pruned along the same record). Returns the submodule names restored."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    restored = []
    for key, meta in metadata.items():
        if METADATA_KEY not in meta or not (key + ".").startswith(prefix):
            continue
        name = key[len(prefix):].lstrip(".") if prefix else key
        target = root.get_submodule(name) if name else root
        _bring_to(target, meta[METADATA_KEY], f"restoring {name or 'model'}")
        restored.append(name)
    return restored


def _root_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    restore_structure(module, state_dict, prefix)


T = TypeVar("T")


@contextmanager
def _restoring_on_load(cls: type) -> Iterator[None]:
    """While active, every new ``cls`` instance re-applies recorded pruning structures when it loads weights."""
    seen: set[int] = set()

    def on_register(parent: nn.Module, name: str, submodule: nn.Module | None) -> None:
        if isinstance(parent, cls) and id(parent) not in seen:
            seen.add(id(parent))
            parent.register_load_state_dict_pre_hook(_root_pre_hook)

    handle = register_module_module_registration_hook(on_register)
    try:
        yield
    finally:
        handle.remove()


def load_pruned(cls: type[T], checkpoint_path: Any, **kwargs: Any) -> T:
    """``cls.load_from_checkpoint(checkpoint_path, **kwargs)`` for checkpoints of pruned models: the recorded
    structure is re-applied to the freshly constructed module before its weights are loaded."""
    with _restoring_on_load(cls):
        return cls.load_from_checkpoint(checkpoint_path, **kwargs)  # type: ignore[attr-defined]
