"""``to_binary``: turn the convolutions and linear layers of any model into binary layers.

Every ``nn.Conv2d``/``nn.Linear`` (exactly these types, not subclasses) becomes a
:class:`~lightning_effnets.layers.BinaryConv2d` / :class:`~lightning_effnets.layers.BinaryLinear` with ±1
weights ``sign(W)`` of its current real weights,
except the first and the last (stem and classifier stay full precision, the BNN convention of
BinaryNet, Bi-Real Net and Bop, arXiv:1906.02107).

Binarised inputs need signed activations: after a ReLU every input is >= 0 and ``sign`` maps all of them
to +1, so a binary layer that follows a ReLU sees a constant. ``relu`` therefore replaces the model's
``nn.ReLU`` modules (those selected by ``include``/``exclude``): ``"identity"`` gives Bi-Real Net's
design (arXiv:1808.00278; the sign is the non-linearity, shortcuts carry real values), ``"hardtanh"`` the
BinaryNet one, ``"prelu"`` a learnable ``nn.PReLU`` (init 0.25, ReActNet-like); ``None`` keeps them.
Functional ReLUs (``F.relu`` inside ``forward``) cannot be replaced.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from lightning_effnets.convert.core import ConversionReport, _matches, replace_layers, set_submodule
from lightning_effnets.layers.binary import ESTIMATORS, BinaryConv2d, BinaryLinear, Estimator

__all__ = ["RELU_REPLACEMENTS", "ReluReplacement", "restore_binary", "to_binary"]

ReluReplacement = Literal["identity", "hardtanh", "prelu"]
RELU_REPLACEMENTS: tuple[str, ...] = ("identity", "hardtanh", "prelu")


def _relu_replacement(kind: str) -> nn.Module:
    if kind == "identity":
        return nn.Identity()
    if kind == "hardtanh":
        return nn.Hardtanh()
    return nn.PReLU(init=0.25)


def _is_float_layer(name: str, module: nn.Module) -> bool:
    # Exact types: subclasses with their own forward (timm's Conv2dSame, attention's out_proj Linear,
    # adder layers, already-binary layers) would change meaning if rebuilt as plain binary layers.
    return type(module) in (nn.Conv2d, nn.Linear)


def to_binary(
    model: nn.Module,
    skip_first: bool = True,
    skip_last: bool = True,
    include: Any = None,
    exclude: Any = None,
    *,
    activation: Estimator | None = "ste",
    scale: bool = False,
    balanced: bool = False,
    latent: bool = False,
    relu: ReluReplacement | None = "identity",
) -> ConversionReport:
    """Replace ``nn.Conv2d``/``nn.Linear`` layers of ``model`` by binary ones, in place.

    Args:
        model: any ``nn.Module``.
        skip_first / skip_last: keep the first / last convertible layer (registration order) real.
        include / exclude: shell-style name patterns (``"layer2.*"``) or a ``(name, module) -> bool``
            predicate selecting which layers (and ReLUs) to convert.
        activation: input binarisation estimator of the binary layers, ``"ste"`` or ``"approx_sign"``;
            ``None`` keeps real inputs (binary-weight network).
        scale: per-output-channel scale (see :class:`~lightning_effnets.layers.BinaryConv2d`).
        balanced: balanced (mean-centred) binarisation; requires ``latent=True``.
        latent: real latent weights binarised in the forward (real optimizer) instead of ±1 weights (Bop).
        relu: what replaces the selected ``nn.ReLU`` modules (see module docstring), or ``None``.

    Returns:
        A :class:`~lightning_effnets.convert.ConversionReport`; ``converted`` lists the binarised layers
        followed by the replaced ReLUs.

    Raises:
        ValueError: no ``nn.Conv2d``/``nn.Linear`` to convert, ``include`` matches none of them, or bad options.
    """
    if activation is not None and activation not in ESTIMATORS:
        raise ValueError(f"activation must be None or one of {ESTIMATORS}, got {activation!r}")
    if relu is not None and relu not in RELU_REPLACEMENTS:
        raise ValueError(f"relu must be None or one of {RELU_REPLACEMENTS}, got {relu!r}")
    if balanced and not latent:
        raise ValueError("balanced=True needs latent=True (it centres latent real weights; ±1 weights for Bop "
                         "are already balanced by construction)")
    options = dict(activation=activation, scale=scale, balanced=balanced, latent=latent)

    def build(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Conv2d):
            return BinaryConv2d.from_float(module, **options)
        return BinaryLinear.from_float(module, **options)  # type: ignore[arg-type]

    report = replace_layers(model, kind="binary", candidate=_is_float_layer, build=build, include=include,
                            exclude=exclude, keep_first=skip_first, keep_last=skip_last)
    if relu is not None:
        for name, module in list(model.named_modules()):
            if (name and type(module) is nn.ReLU and (include is None or _matches(include, name, module))
                    and not _matches(exclude, name, module)):
                set_submodule(model, name, _relu_replacement(relu))
                report.converted.append(name)
    return report


def restore_binary(model: nn.Module, record: dict[str, Any]) -> ConversionReport:
    """Re-apply a recorded conversion (``Binarization.state_dict()``) to a fresh, unconverted ``model``.

    Use it to load a checkpoint of a binarised model outside the Trainer::

        ckpt = torch.load(path, weights_only=False)
        task = ImageClassifier(...)
        restore_binary(task.model, Binarization.record_from_checkpoint(ckpt))
        task.load_state_dict(ckpt["state_dict"])
    """
    try:
        names = list(record["converted"])
        options = dict(record["options"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"not a binarisation record (expected keys 'converted' and 'options'): {err}") from None
    if not names:
        raise ValueError("the binarisation record lists no converted layer")
    exact = set(names)
    report = to_binary(model, skip_first=False, skip_last=False, include=lambda n, m: n in exact,
                       activation=options.get("activation", "ste"), scale=options.get("scale", False),
                       balanced=options.get("balanced", False), latent=options.get("latent", False),
                       relu=options.get("relu", "identity"))
    missing = exact - set(report.converted)
    if missing:
        raise ValueError(f"the model has no convertible layer(s) named {sorted(missing)[:8]}; it is not the "
                         "architecture the record was made on")
    return report
