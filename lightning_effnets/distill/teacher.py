"""The CNN twin of an adder network: the teacher PKKD (arXiv:2009.13044) trains next to its adder student.

:func:`adder_units` finds, for every :class:`~lightning_effnets.layers.Adder2d` of a converted network, the module
that replaced the original convolution (the adder layer itself, or the AdderSR wrappers ``SelfShortcut`` /
``Sequential(..., PowerActivation)`` that :func:`~lightning_effnets.convert.to_adder` builds around it).
:func:`cnn_twin` undoes the conversion on a copy: each such unit becomes an ``nn.Conv2d`` with the adder layer's
geometry and a fresh default initialisation; every other layer (stem, norms, classifier) is copied as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from lightning_effnets.convert.core import set_submodule
from lightning_effnets.layers.activations import PowerActivation
from lightning_effnets.layers.adder import Adder2d, SelfShortcut

__all__ = ["adder_units", "cnn_twin", "conv_from_adder"]


def adder_units(model: nn.Module, converted: Sequence[str] | None = None) -> dict[str, str]:
    """``{adder layer name: name of the unit that stands where the original convolution was}``.

    ``converted``: the names :func:`~lightning_effnets.convert.to_adder` converted (``AdderConversion.record``);
    each adder layer's unit is the longest of them that contains it, which is exact for every wrapper (including
    ``norm=True``'s ``Sequential(adder, BatchNorm2d)``). Without it, the AdderSR wrappers ``SelfShortcut`` and
    ``Sequential(..., PowerActivation)`` are recognised (a ``Sequential(adder, BatchNorm2d)`` stays the user's:
    ResNet downsample branches look the same).
    """
    modules = dict(model.named_modules())
    names = sorted(converted or [], key=len, reverse=True)
    units: dict[str, str] = {}
    for name, module in modules.items():
        if not isinstance(module, Adder2d):
            continue
        recorded = next((c for c in names if name == c or name.startswith(c + ".")), None)
        if recorded is not None:
            units[name] = recorded
            continue
        unit = name
        parent_name, _, child = unit.rpartition(".")
        if child == "body" and isinstance(modules.get(parent_name), SelfShortcut):
            unit = parent_name
        parent_name, _, child = unit.rpartition(".")
        parent = modules.get(parent_name)
        if (child == "0" and isinstance(parent, nn.Sequential) and len(parent) == 2
                and isinstance(parent[1], PowerActivation)):
            unit = parent_name
        units[name] = unit
    return units


def conv_from_adder(layer: Adder2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``layer``'s geometry, device and dtype, default (Kaiming-uniform) initialisation."""
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                     device=layer.weight.device, dtype=layer.weight.dtype)


def cnn_twin(model: nn.Module, converted: Sequence[str] | None = None) -> nn.Module:
    """A copy of adder network ``model`` with every adder unit replaced by a fresh ``nn.Conv2d``.

    The result has the pre-conversion architecture: the convolution sits at the unit's name (see
    :func:`adder_units`, which ``converted`` is passed to). Raises ``ValueError`` if ``model`` has no adder layer.
    """
    units = adder_units(model, converted)
    if not units:
        raise ValueError(f"cnn_twin: {type(model).__name__} has no Adder2d layer to turn back into a convolution")
    twin = copy.deepcopy(model)
    for adder_name, unit in units.items():
        layer = twin.get_submodule(adder_name)
        assert isinstance(layer, Adder2d)
        set_submodule(twin, unit, conv_from_adder(layer))
    return twin
