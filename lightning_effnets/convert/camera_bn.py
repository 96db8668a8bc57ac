"""``to_camera_bn``: swap the batch norm layers of any model for camera-based BN (arXiv:2001.08680).

CamBN keeps the network and its affine parameters and only gives every camera its own BN statistics, so every
BN layer converts by default (``keep_first``/``keep_last`` are False, unlike the adder/binary conversions that
keep the stem and classifier in full precision). Each converted layer starts with the source layer's affine
parameters and its running statistics copied into every camera slot, so a converted pretrained model computes
exactly what it computed before until camera statistics are estimated.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_effnets.convert.core import ConversionReport, replace_layers
from lightning_effnets.layers.camera_bn import CameraBatchNorm1d, CameraBatchNorm2d

__all__ = ["to_camera_bn"]


def _is_bn(name: str, module: nn.Module) -> bool:
    # timm's BatchNormAct2d subclasses nn.BatchNorm2d; SyncBatchNorm has no fixed dimensionality, so convert
    # before Lightning applies sync_batchnorm (CameraBN converts in setup(), which runs first).
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))


def _build(num_cameras: int) -> Callable[[str, nn.Module], nn.Module]:
    def build(name: str, bn: nn.Module) -> nn.Module:
        cls = CameraBatchNorm2d if isinstance(bn, nn.BatchNorm2d) else CameraBatchNorm1d
        ref = bn.weight if bn.weight is not None else bn.running_mean
        layer = cls(bn.num_features, num_cameras, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        if bn.affine:
            layer.weight.data.copy_(bn.weight.data)
            layer.bias.data.copy_(bn.bias.data)
            layer.weight.requires_grad_(bn.weight.requires_grad)
            layer.bias.requires_grad_(bn.bias.requires_grad)
        if bn.track_running_stats and bn.running_mean is not None:
            layer.running_mean.copy_(bn.running_mean.expand_as(layer.running_mean))
            layer.running_var.copy_(bn.running_var.expand_as(layer.running_var))
            layer.num_batches_tracked.fill_(int(bn.num_batches_tracked))
        for extra in ("drop", "act"):  # timm BatchNormAct2d: keep its dropout / activation, same names
            module = getattr(bn, extra, None)
            if isinstance(module, nn.Module):
                layer.add_module(extra, module)
        layer.train(bn.training)
        return layer

    return build


def to_camera_bn(model: nn.Module, num_cameras: int, *, include: object = None, exclude: object = None,
                 keep_first: bool = False, keep_last: bool = False) -> ConversionReport:
    """Replace ``nn.BatchNorm1d``/``nn.BatchNorm2d`` layers of ``model`` by camera BN layers, in place.

    Args:
        model: any network (a timm backbone, a task's ``self.model``).
        num_cameras: camera slots per layer (unseen cameras can get slots later).
        include / exclude: names (shell patterns) or a predicate restricting which BN layers convert.
        keep_first / keep_last: leave the first / last BN layer as it is.

    Raises:
        ValueError: ``num_cameras < 1``, or the model has no BN layer (or ``include`` matches none).
    """
    if int(num_cameras) < 1:
        raise ValueError(f"to_camera_bn: num_cameras must be >= 1, got {num_cameras}")
    build = _build(int(num_cameras))
    return replace_layers(model, kind="camera_bn", candidate=_is_bn, build=build,
                          include=include, exclude=exclude, keep_first=keep_first, keep_last=keep_last)
