"""Turn any CNN into an AdderNet: swap ``nn.Conv2d`` layers for :class:`~lightning_effnets.layers.Adder2d`.

Follows the AdderNet recipe (arXiv:1912.13200): the first convolution (it sees raw pixels) and the last layer
(the classifier / output head) stay multiplicative by default, every other convolution becomes an adder layer.
Adder outputs are large negative L1 distances, so each adder layer should be followed by a normalisation layer;
conversion warns about converted layers that are not.

For super-resolution (AdderSR, arXiv:2009.08891) two optional pieces restore what an adder layer lacks:
``self_shortcut=True`` wraps shape-preserving layers as ``x + adder(x)`` (an adder layer cannot learn the identity
mapping), and ``power_activation=True`` appends a learnable ``sign(y)|y|^alpha`` after each converted layer.
Layers without a normalisation layer after them (EDSR bodies, FPN necks) also need ``norm=True``: a BatchNorm maps
its large negative distances (``-sum|x - w|``, hundreds for a 32-channel 3x3 layer) back to unit scale; without
it every output is far below zero, the following ReLU passes nothing and the body never trains (measured on the
SR recipe: PSNR 23 dB *below* bicubic). Order with everything set: ``P(x + BN(adder(x)))`` (our choice; the
paper's abstract does not fix it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_effnets.convert.core import ConversionReport, _matches, replace_layers, set_submodule
from lightning_effnets.layers.activations import PowerActivation
from lightning_effnets.layers.adder import Adder2d, SelfShortcut

__all__ = ["to_adder", "restore_adder", "is_adder_candidate"]

NameFilter = str | Sequence[str] | Callable[[str, nn.Module], bool] | None
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _dynamic_padding(module: nn.Module) -> bool:
    """timm's ``Conv2dSame`` pads in ``forward`` (TF 'same'); a plain Adder2d would silently drop that padding."""
    return type(module).__name__ in ("Conv2dSame", "Conv2dSameExport")


def is_adder_candidate(name: str, module: nn.Module) -> bool:
    """Layers ``to_adder`` considers: every ``nn.Conv2d`` (including subclasses such as timm's ``StdConv2d``)."""
    return isinstance(module, nn.Conv2d)


def _shape_preserving(conv: nn.Conv2d) -> bool:
    if conv.in_channels != conv.out_channels or conv.stride != (1, 1):
        return False
    if conv.padding == "same":
        return True
    return all(isinstance(p, int) and 2 * p == d * (k - 1)
               for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))


def _is_norm(module: nn.Module) -> bool:
    # frozen batch norms (torchvision, timm) are not _NormBase subclasses but normalise all the same
    return isinstance(module, _NORM_TYPES) or "FrozenBatchNorm" in type(module).__name__


def _followed_by_norm(model: nn.Module, names: list[str]) -> list[str]:
    """Converted layers whose next module in registration order (outside the layer itself) is not a norm layer.

    Registration order is a heuristic for execution order; it is right for conv-bn stacks (timm's ConvNormAct,
    BatchNormAct2d) and pre-activation blocks (DenseNet), which is what the warning is for.
    """
    modules = list(model.named_modules())
    position = {n: i for i, (n, _) in enumerate(modules)}
    missing = []
    for name in names:
        i = position[name] + 1
        while i < len(modules) and modules[i][0].startswith(name + "."):
            i += 1  # skip the converted layer's own children (shortcut / power activation wrappers)
        if i >= len(modules) or not _is_norm(modules[i][1]):
            missing.append(name)
    return missing


def _last_layer(model: nn.Module) -> str | None:
    """Name of the model's last Conv2d/Linear in registration order: its output layer for timm-style models."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            last = name
    return last


def _unfreeze_batch_norms(model: nn.Module) -> list[str]:
    """Replace frozen BNs (torchvision ``FrozenBatchNorm2d``, timm ``FrozenBatchNormAct2d``) by trainable ones."""
    from timm.layers import FrozenBatchNormAct2d, unfreeze_batch_norm_2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    changed = []
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if isinstance(module, FrozenBatchNormAct2d):
            new = unfreeze_batch_norm_2d(module)
        elif isinstance(module, FrozenBatchNorm2d):  # has no num_features, which timm's helper expects
            new = nn.BatchNorm2d(module.weight.numel(), eps=module.eps, device=module.weight.device)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, key).copy_(getattr(module, key))
        else:
            continue
        set_submodule(model, name, new)
        changed.append(name)
    return changed


def to_adder(model: nn.Module, skip_first: bool = True, skip_last: bool = True, include: NameFilter = None,
             exclude: NameFilter = None, *, self_shortcut: bool = False, power_activation: bool = False,
             norm: bool = False, copy_weights: bool = False, unfreeze_bn: bool = False) -> ConversionReport:
    """Replace ``nn.Conv2d`` layers of ``model`` by :class:`Adder2d`, in place; returns what changed.

    Args:
        model: any module (a timm CNN, a task's ``self.model``, ...).
        skip_first: keep the first convolution multiplicative (it sees raw pixels).
        skip_last: keep the model's output layer multiplicative when it is a convolution (a 1x1 conv classifier,
            an SR reconstruction conv): the last ``Conv2d``/``Linear`` in registration order. A ``nn.Linear``
            classifier is never converted either way, so for timm ResNets every conv but the stem is converted,
            as in the paper.
        include: only convert these layers: shell-style patterns over qualified names, or a predicate
            ``(name, module) -> bool``. A pattern matching nothing raises (a typo never silently converts nothing).
        exclude: never convert these layers (same forms as ``include``).
        self_shortcut: wrap shape-preserving layers (stride 1, same padding, in == out channels) as
            ``x + adder(x)`` (AdderSR).
        power_activation: follow each converted layer by a learnable :class:`PowerActivation` (AdderSR).
        norm: put a ``BatchNorm2d`` right after each converted layer that is not already followed by a
            normalisation layer (inside the self-shortcut): EDSR-style SR bodies, FPN necks. Layers that have a
            norm after them (the usual conv-BN stacks) are left as they are.
        copy_weights: initialise adder weights from the conv weights instead of the authors' N(0, 1) (the two
            measure different things, so copying is mainly useful for experiments).
        unfreeze_bn: also replace frozen batch norms (torchvision/timm ``FrozenBatchNorm2d``) by trainable
            ``BatchNorm2d``: adder features have large, shifting variance, so adder detectors keep adapting BN
            statistics (detection backbones are often built with frozen BN).

    Timm's dynamic-'same'-padding convolutions (``Conv2dSame``) are kept, with that reason in the report.
    """
    dynamic: list[str] = []
    output_layer = _last_layer(model) if skip_last else None
    convs = [name for name, module in model.named_modules() if is_adder_candidate(name, module)]
    needs_norm = set(_followed_by_norm(model, convs)) if norm else set()

    def is_excluded(name: str, module: nn.Module) -> bool:
        if _dynamic_padding(module):
            dynamic.append(name)
            return True
        return name == output_layer or _matches(exclude, name, module)

    def build(name: str, conv: nn.Module) -> nn.Module:
        assert isinstance(conv, nn.Conv2d)
        layer: nn.Module = Adder2d.from_conv(conv, copy_weights=copy_weights)
        if name in needs_norm:
            layer = nn.Sequential(layer, nn.BatchNorm2d(conv.out_channels, device=conv.weight.device,
                                                        dtype=conv.weight.dtype))
        if self_shortcut and _shape_preserving(conv):
            layer = SelfShortcut(layer)
        if power_activation:
            layer = nn.Sequential(layer, PowerActivation())
        return layer

    report = replace_layers(model, kind="adder", candidate=is_adder_candidate, build=build, include=include,
                            exclude=is_excluded, keep_first=skip_first, keep_last=False)
    for name in dynamic:
        if report.kept.get(name) == "excluded":
            report.kept[name] = "dynamic 'same' padding (timm Conv2dSame) is not supported"
    if output_layer is not None and report.kept.get(output_layer) == "excluded":
        report.kept[output_layer] = "last layer kept full precision"
    if unfreeze_bn:
        _unfreeze_batch_norms(model)
    if report.converted and not (self_shortcut or power_activation or norm):
        missing = _followed_by_norm(model, report.converted)
        if missing:
            warnings.warn(f"to_adder: {len(missing)} converted layer(s) are not followed by a normalisation layer "
                          f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); adder outputs are "
                          "large negative distances, AdderNets put BatchNorm after every adder layer",
                          UserWarning, stacklevel=2)
    return report


def restore_adder(model: nn.Module, record: dict[str, Any]) -> ConversionReport:
    """Re-apply a recorded conversion (``AdderConversion.state_dict()``) to a fresh, unconverted ``model``.

    Converts exactly the recorded layers with the recorded options, so a checkpoint's weights fit. To load a
    checkpoint of an adder model outside the Trainer::

        ckpt = torch.load(path, weights_only=False)
        task = ImageClassifier(**ckpt["hyper_parameters"])
        restore_adder(task.model, AdderConversion.record_from_checkpoint(ckpt))
        task.load_state_dict(ckpt["state_dict"])
    """
    try:
        names = list(record["converted"])
        options = dict(record["options"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"not an adder conversion record (expected keys 'converted' and 'options'): {err}") from None
    if not names:
        raise ValueError("the adder conversion record lists no converted layer")
    exact = set(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the normalisation warning was already given when the record was made
        try:
            report = to_adder(model, skip_first=False, skip_last=False, include=lambda n, m: n in exact,
                              self_shortcut=bool(options.get("self_shortcut", False)),
                              power_activation=bool(options.get("power_activation", False)),
                              norm=bool(options.get("norm", False)),
                              unfreeze_bn=bool(options.get("unfreeze_bn", False)))
        except ValueError:
            report = ConversionReport(kind="adder")  # none of the recorded layers exists in this model
    missing = exact - set(report.converted)
    if missing:
        raise ValueError(f"the model has no convertible layer(s) named {sorted(missing)[:8]}; it is not the "
                         "architecture the record was made on")
    return report
