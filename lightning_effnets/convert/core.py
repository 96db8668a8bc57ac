"""Swapping layers of any model: the shared machinery behind ``to_adder``, ``to_binary``, ``to_camera_bn``.

A conversion is a plain function on an ``nn.Module``: it selects candidate layers (by type, by
qualified name with shell-style patterns, or by a predicate), keeps the first and last candidates
unconverted by default (the AdderNet/BNN convention: the stem and the classifier stay
full precision), replaces the rest in place and returns a :class:`ConversionReport`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = ["ConversionReport", "NameFilter", "replace_layers", "set_submodule"]

#: Which layers to act on: shell-style patterns over qualified names (``"layer1.*"``), or a predicate.
NameFilter = "str | Sequence[str] | Callable[[str, nn.Module], bool] | None"


@dataclass
class ConversionReport:
    """What a conversion changed: ``converted`` and ``kept`` (qualified name -> reason)."""

    kind: str
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.kind}: converted {len(self.converted)} layer(s), kept {len(self.kept)}"]
        lines += [f"  + {name}" for name in self.converted]
        lines += [f"  = {name} ({why})" for name, why in self.kept.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "converted": list(self.converted), "kept": dict(self.kept)}


def _matches(spec: object, name: str, module: nn.Module) -> bool:
    if spec is None:
        return False
    if callable(spec):
        return bool(spec(name, module))
    patterns = [spec] if isinstance(spec, str) else list(spec)  # type: ignore[arg-type]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (works inside Sequential/ModuleList/ModuleDict)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new  # setattr would refuse non-identifier names such as "0"


def replace_layers(
    model: nn.Module,
    *,
    kind: str,
    candidate: Callable[[str, nn.Module], bool],
    build: Callable[[str, nn.Module], nn.Module],
    include: object = None,
    exclude: object = None,
    keep_first: bool = True,
    keep_last: bool = True,
) -> ConversionReport:
    """Replace every ``candidate`` layer of ``model`` by ``build(name, layer)``, in place.

    ``include`` restricts conversion to matching names (patterns or predicate); ``exclude`` removes
    names from it. ``keep_first``/``keep_last`` keep the first/last candidate in registration order
    (set them to False to convert those too). Raises ``ValueError`` when ``model`` has
    no candidate at all, or when ``include`` matches none of them, so a misspelt pattern never
    silently does nothing.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and candidate(n, m)]
    if not candidates:
        raise ValueError(f"{kind}: {type(model).__name__} has no layers this conversion can act on")
    if include is not None and not any(_matches(include, n, m) for n, m in candidates):
        names = ", ".join(n for n, _ in candidates[:8])
        raise ValueError(f"{kind}: include={include!r} matches none of the candidate layers ({names}, ...)")
    report = ConversionReport(kind=kind)
    first, last = candidates[0][0], candidates[-1][0]
    for name, module in candidates:
        if include is not None and not _matches(include, name, module):
            report.kept[name] = "not included"
        elif _matches(exclude, name, module):
            report.kept[name] = "excluded"
        elif keep_first and name == first:
            report.kept[name] = "first layer kept full precision"
        elif keep_last and name == last and len(candidates) > 1:
            report.kept[name] = "last layer kept full precision"
        else:
            new = build(name, module)
            set_submodule(model, name, new)
            report.converted.append(name)
    return report
