"""Efficient layers with functional cores; no Lightning import here."""

from lightning_effnets.layers.activations import PowerActivation
from lightning_effnets.layers.adder import Adder2d, SelfShortcut, adder2d
from lightning_effnets.layers.binary import (BinaryConv2d, BinaryLinear, RPReLU, RSign, approx_sign, binarize,
                                             binary_parameters, is_binary, mark_binary, sign_ste)
from lightning_effnets.layers.camera_bn import (CameraBatchNorm1d, CameraBatchNorm2d, camera_bn_layers,
                                                collect_camera_statistics, set_camera, use_camera)

__all__: list[str] = ["Adder2d", "PowerActivation", "SelfShortcut", "adder2d",
                     "BinaryConv2d", "BinaryLinear", "RPReLU", "RSign", "approx_sign", "binarize",
                     "binary_parameters", "is_binary", "mark_binary", "sign_ste",
                     "CameraBatchNorm1d", "CameraBatchNorm2d", "camera_bn_layers", "collect_camera_statistics",
                     "set_camera", "use_camera"]
