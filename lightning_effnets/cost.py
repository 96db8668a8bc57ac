"""Counting what a forward pass costs: MACs, multiplications, additions, energy and latency.

Standard layers are counted by PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode`
(convolutions, matmuls, attention); a multiply-accumulate is one multiplication plus one addition.
Layers that do not multiply (adder layers, binary layers) register their own counter with
:func:`register_cost`; whatever FlopCounterMode attributed to such a layer is replaced by that count. Recurrent
layers (GRU, LSTM, RNN) are counted here too: their fused CPU op is invisible to FlopCounterMode.

Energy follows the AdderNet papers' 45 nm convention (Horowitz, ISSCC 2014): a 32-bit float
multiplication costs 3.7 pJ, an addition 0.9 pJ. Element-wise ops, normalisation and activations are
not counted (the usual MAC-counting convention of fvcore/thop/ptflops).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["OpCount", "CostReport", "profile", "register_cost", "ENERGY_PJ"]

#: Energy per operation in picojoules (45 nm, 32-bit float), used for :attr:`CostReport.energy_pj`.
#: ``binary`` (one XNOR + popcount bit-operation) is filled in by the binary layers' counter module.
ENERGY_PJ: dict[str, float] = {"mult": 3.7, "add": 0.9}


@dataclass
class OpCount:
    """Operations of one forward pass of a layer (for the whole input batch)."""

    macs: int = 0  # multiply-accumulate positions (or their adder/binary equivalent)
    mults: int = 0
    adds: int = 0
    binary_ops: int = 0

    def __add__(self, other: OpCount) -> OpCount:
        return OpCount(self.macs + other.macs, self.mults + other.mults, self.adds + other.adds,
                       self.binary_ops + other.binary_ops)


CostFn = Callable[[nn.Module, tuple[Any, ...], Any], OpCount]
_REGISTRY: dict[type[nn.Module], CostFn] = {}


def register_cost(module_type: type[nn.Module]) -> Callable[[CostFn], CostFn]:
    """Register ``fn(module, inputs, output) -> OpCount`` as the counter for ``module_type``.

    Used by layers whose arithmetic is not multiply-accumulate (``Adder2d``, ``BinaryConv2d``)::

        @register_cost(Adder2d)
        def _adder_cost(module, inputs, output):
            ...
    """

    def decorator(fn: CostFn) -> CostFn:
        _REGISTRY[module_type] = fn
        return fn

    return decorator


_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@register_cost(nn.RNNBase)
def _recurrent_cost(module: nn.RNNBase, inputs: tuple[Any, ...], output: Any) -> OpCount:
    """GRU / LSTM / RNN multiply-accumulates, which FlopCounterMode does not see inside the fused RNN op: per
    token, layer and direction, each gate costs ``in x hidden + hidden_state x hidden`` MACs (plus an LSTM's
    ``hidden x proj`` projection)."""
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        tokens = x.data.shape[0]
    else:
        tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    directions = 2 if module.bidirectional else 1
    hidden, proj = module.hidden_size, getattr(module, "proj_size", 0)
    state = proj or hidden
    macs = 0
    for layer in range(module.num_layers):
        in_size = module.input_size if layer == 0 else state * directions
        macs += directions * (_RNN_GATES[module.mode] * (in_size * hidden + state * hidden) + hidden * proj)
    macs *= tokens
    return OpCount(macs=macs, mults=macs, adds=macs)


def _counter_for(module: nn.Module) -> CostFn | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


@dataclass
class CostReport:
    """What one forward pass of ``model(example_input)`` costs."""

    macs: int
    params: int
    adds: int
    mults: int
    binary_ops: int
    energy_pj: float
    latency_ms: float
    per_layer: dict[str, OpCount] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, float]:
        """Scalar figures, e.g. for ``pl_module.log_dict``."""
        d = asdict(self)
        d.pop("per_layer")
        return {k: float(v) for k, v in d.items()}

    def table(self, title: str = "cost") -> Any:
        """A :class:`rich.table.Table` of the figures."""
        from rich.table import Table

        t = Table(title=title)
        t.add_column("metric")
        t.add_column("value", justify="right")
        for attr, label, scale in [("macs", "MACs [M]", 1e-6), ("params", "params [M]", 1e-6),
                                   ("mults", "multiplications [M]", 1e-6), ("adds", "additions [M]", 1e-6),
                                   ("binary_ops", "binary ops [M]", 1e-6), ("energy_pj", "energy [uJ]", 1e-6),
                                   ("latency_ms", "latency [ms]", 1.0)]:
            t.add_row(label, f"{getattr(self, attr) * scale:,.3f}")
        return t


def _count_params(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _run(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


@torch.no_grad()
def profile(model: nn.Module, example_input: Any, *, latency_repeats: int = 10, warmup: int = 2,
            measure_latency: bool = True) -> CostReport:
    """Count MACs, parameters, additions, multiplications and energy; measure CPU-side latency.

    ``example_input`` is a tensor, a tuple of positional inputs or a dict of keyword inputs, exactly
    as ``model`` takes it. Counts are for that input (its whole batch). The model runs in eval mode
    under ``no_grad`` (BN statistics are not touched) and its mode is restored afterwards. Latency is
    the median wall-clock of ``latency_repeats`` forwards on the model's current device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"profile() needs an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    custom: dict[str, OpCount] = {}
    handles = []
    root = type(model).__name__
    names: dict[int, str] = {}
    try:
        for name, module in model.named_modules():
            fn = _counter_for(module)
            if fn is None:
                continue
            key = f"{root}.{name}" if name else root
            names[id(module)] = key

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any, _fn: CostFn = fn, _key: str = key) -> None:
                custom[_key] = custom.get(_key, OpCount()) + _fn(mod, inputs, output)

            handles.append(module.register_forward_hook(hook))
        counter = FlopCounterMode(display=False)
        with counter:
            _run(model, example_input)
        for h in handles:
            h.remove()
        handles.clear()

        per_module = counter.get_flop_counts()
        total_flops = counter.get_total_flops()
        # Remove what FlopCounterMode saw inside custom-counted layers (outermost ones only).
        custom_keys = sorted(custom, key=len)
        outermost = [k for k in custom_keys if not any(k.startswith(o + ".") for o in custom_keys if o != k)]
        replaced = sum(sum(per_module.get(k, {}).values()) for k in outermost)
        std_macs = (total_flops - replaced) // 2
        total = OpCount(macs=std_macs, mults=std_macs, adds=std_macs)
        for k in outermost:
            total = total + custom[k]

        per_layer: dict[str, OpCount] = {}
        for key, ops in per_module.items():
            if key in ("Global", root):
                continue
            macs = sum(ops.values()) // 2
            per_layer[key] = OpCount(macs=macs, mults=macs, adds=macs)
        per_layer.update(custom)

        latency = float("nan")
        if measure_latency:
            for _ in range(warmup):
                _run(model, example_input)
            times = []
            for _ in range(max(1, latency_repeats)):
                start = time.perf_counter()
                _run(model, example_input)
                times.append((time.perf_counter() - start) * 1e3)
            latency = statistics.median(times)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    energy = (total.mults * ENERGY_PJ["mult"] + total.adds * ENERGY_PJ["add"]
              + total.binary_ops * ENERGY_PJ.get("binary", 0.0))
    return CostReport(macs=total.macs, params=_count_params(model), adds=total.adds, mults=total.mults,
                      binary_ops=total.binary_ops, energy_pj=energy, latency_ms=latency, per_layer=per_layer)
