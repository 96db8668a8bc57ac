"""Model transformations: swap layers of any model for their efficient counterparts.

Each function converts in place and returns a :class:`ConversionReport` of what changed.
"""

from lightning_effnets.convert.core import ConversionReport, replace_layers, set_submodule

__all__ = ["ConversionReport", "replace_layers", "set_submodule"]
