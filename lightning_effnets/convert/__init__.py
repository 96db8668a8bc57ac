"""Model transformations: swap layers of any model for their efficient counterparts.

Each function converts in place and returns a :class:`ConversionReport` of what changed.
"""

from lightning_effnets.convert.adder import restore_adder, to_adder
from lightning_effnets.convert.binary import restore_binary, to_binary
from lightning_effnets.convert.camera_bn import to_camera_bn
from lightning_effnets.convert.core import ConversionReport, replace_layers, set_submodule

__all__ = ["to_adder", "restore_adder", "ConversionReport", "replace_layers", "set_submodule", "to_binary", "restore_binary",
           "to_camera_bn"]
