"""Single-image super-resolution with an EDSR-style network (compression-agnostic).

EDSR (Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution",
arXiv:1707.02921): a head conv, residual blocks without batch norm (conv-ReLU-conv, scaled, plus the
input), a conv closing the body with a long skip from the head, a pixel-shuffle upsampler
(Shi et al., arXiv:1609.05158) and a tail conv; trained with an L1 loss. It is the reference workload
of AdderSR (arXiv:2009.08891) and GhostSR (arXiv:2101.08525): every conv of :class:`EDSR` lives in
``task.model``, so conversions, pruning and cost profiling act on all of it, while the upsampler convs
(whose channels the pixel shuffle regroups) and the tail (RGB out) are the task's
:meth:`~SuperResolver.output_modules`.

Evaluation follows the SR benchmarks: the output is clamped to [0, 1] and rounded to 8-bit levels,
converted to the Y channel of ITU-R BT.601 YCbCr (MATLAB ``rgb2ycbcr``, :func:`rgb_to_y`), ``border``
pixels (default: the scale) are shaved from each side, and PSNR / SSIM are computed per image and
averaged (torchmetrics). The same figures for plain bicubic upsampling of the same LR images are logged
next to them (``*_bicubic``), with the gain ``psnr_gain = psnr - psnr_bicubic``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_effnets.tasks.base import EffnetsTaskMixin, OptimizerFactory, SchedulerFactory

__all__ = ["EDSR", "ResBlock", "SuperResolver", "Upsampler", "bicubic_upsample", "quantize_8bit", "rgb_to_y",
           "shave"]

#: mean RGB of DIV2K, subtracted at the input and added back at the output (EDSR's MeanShift)
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
#: ITU-R BT.601 luma for RGB in [0, 1] -> Y in [16, 235] / 255 (MATLAB ``rgb2ycbcr``)
_Y_WEIGHTS = (65.481, 128.553, 24.966)


# --------------------------------------------------------------------------------------------- functional
def rgb_to_y(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` RGB in [0, 1] -> ``[B, 1, H, W]`` BT.601 luma in [16/255, 235/255]; 1 channel passes."""
    if images.shape[-3] == 1:
        return images
    if images.shape[-3] != 3:
        raise ValueError(f"rgb_to_y expects 1 or 3 channels, got shape {tuple(images.shape)}")
    weights = images.new_tensor(_Y_WEIGHTS).view(3, 1, 1)
    return ((images * weights).sum(dim=-3, keepdim=True) + 16.0) / 255.0


def quantize_8bit(images: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to the 256 levels of an 8-bit image (how SR outputs are saved and scored)."""
    return images.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def shave(images: Tensor, border: int) -> Tensor:
    """Drop ``border`` pixels on each side (the benchmarks ignore the borders, where padding dominates)."""
    return images[..., border:images.shape[-2] - border, border:images.shape[-1] - border] if border else images


def _bicubic(lr: Tensor, scale: int) -> Tensor:
    size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False)


def bicubic_upsample(lr: Tensor, scale: int) -> Tensor:
    """The reference every SR method is compared with: bicubic upsampling by ``scale``, clamped to [0, 1]."""
    return _bicubic(lr, scale).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------- network
class ResBlock(nn.Module):
    """EDSR residual block: ``x + res_scale * conv(relu(conv(x)))``, no batch norm (it hurts SR)."""

    def __init__(self, channels: int, kernel_size: int = 3, res_scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x))) * self.res_scale


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: ``log2(scale)`` stages of conv(C -> 4C) + PixelShuffle(2), or one conv(C -> 9C)
    + PixelShuffle(3) for scale 3 (arXiv:1609.05158)."""

    def __init__(self, scale: int, channels: int, kernel_size: int = 3) -> None:
        if scale == 3:
            factors = [3]
        elif scale >= 2 and scale & (scale - 1) == 0:
            factors = [2] * int(math.log2(scale))
        else:
            raise ValueError(f"scale must be 2, 3, 4 or 8 (a power of two or 3), got {scale}")
        layers: list[nn.Module] = []
        for r in factors:
            layers += [nn.Conv2d(channels, r * r * channels, kernel_size, padding=kernel_size // 2), nn.PixelShuffle(r)]
        super().__init__(*layers)


class EDSR(nn.Module):
    """``LR [B, C, h, w] -> SR [B, C, h*scale, w*scale]`` (EDSR, arXiv:1707.02921; no mean-shift convs:
    the mean is a buffer so that every Conv2d here is a trainable layer methods may convert).

    Args:
        scale: upscaling factor (2, 3, 4, 8).
        n_resblocks: residual blocks in the body (EDSR-baseline: 16, EDSR: 32).
        n_feats: feature channels (EDSR-baseline: 64, EDSR: 256).
        in_chans: image channels (3 for RGB).
        res_scale: residual scaling (0.1 stabilises wide EDSRs; 1 for small ones).
        kernel_size: kernel of every conv.
        mean: per-channel mean subtracted at the input and added at the output; ``None``: DIV2K's RGB mean
            (0.44 for one channel).
        bicubic_skip: add the bicubic upsampling of the input to the output, so the network learns only the
            missing detail (VDSR's global residual, arXiv:1511.04587; EDSR itself has none). It starts training
            at bicubic quality, which matters for short CPU budgets; the mean is then only subtracted.
    """

    def __init__(self, scale: int = 2, n_resblocks: int = 8, n_feats: int = 32, in_chans: int = 3,
                 res_scale: float = 1.0, kernel_size: int = 3, mean: Sequence[float] | None = None,
                 bicubic_skip: bool = False) -> None:
        super().__init__()
        if n_resblocks < 0 or n_feats < 1:
            raise ValueError(f"n_resblocks must be >= 0 and n_feats >= 1, got {n_resblocks} and {n_feats}")
        if mean is None:
            mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.44,) * in_chans
        if len(mean) != in_chans:
            raise ValueError(f"mean has {len(mean)} values for in_chans={in_chans}")
        self.scale, self.bicubic_skip = scale, bicubic_skip
        pad = kernel_size // 2
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, in_chans, 1, 1),
                             persistent=False)
        self.head = nn.Conv2d(in_chans, n_feats, kernel_size, padding=pad)
        self.body = nn.Sequential(*(ResBlock(n_feats, kernel_size, res_scale) for _ in range(n_resblocks)),
                                  nn.Conv2d(n_feats, n_feats, kernel_size, padding=pad))
        self.upsample = Upsampler(scale, n_feats, kernel_size)
        self.tail = nn.Conv2d(n_feats, in_chans, kernel_size, padding=pad)

    def forward(self, x: Tensor) -> Tensor:
        skip = _bicubic(x, self.scale) if self.bicubic_skip else self.mean
        h = self.head(x - self.mean)
        h = h + self.body(h)
        return self.tail(self.upsample(h)) + skip


# --------------------------------------------------------------------------------------------- task
class SuperResolver(EffnetsTaskMixin, pl.LightningModule):
    """Train an EDSR-style network on (LR, HR) pairs with an L1 loss; score PSNR/SSIM on Y against bicubic.

    Batches are ``(lr, hr)`` tuples of ``[B, C, h, w]`` and ``[B, C, h*scale, w*scale]`` tensors in [0, 1]
    (:mod:`lightning_effnets.data.super_resolution`). Logged: ``train/loss``; ``{val,test}/{loss, psnr,
    ssim, psnr_bicubic, ssim_bicubic, psnr_gain}``; LR (nearest-upsampled for display), bicubic, SR and HR
    crops of ``log_samples`` validation images as ``val/samples``.

    Args:
        scale: upscaling factor; checked against the datamodule's ``scale``.
        n_resblocks / n_feats / res_scale / kernel_size / bicubic_skip: the :class:`EDSR` network.
        in_chans: image channels; checked against the datamodule's ``in_chans``.
        border: pixels shaved from each side before scoring (``None``: ``scale``, the usual protocol).
        y_channel: score on the BT.601 Y channel (the usual protocol) instead of all channels.
        example_size: side of the LR ``example_input_array`` (tracing, pruning, cost profiling).
        optimizer: ``params -> Optimizer``; default AdamW(lr=1e-3, weight_decay=0.05) (SR recipes use 0 decay).
        scheduler: ``optimizer -> LRScheduler``; overrides ``lr_schedule``.
        lr_schedule: built-in per-step schedule, ``"cosine"`` or ``"constant"``.
        warmup_steps: linear warm-up steps of the built-in schedule.
        log_samples: validation images whose LR/bicubic/SR/HR crops are logged each epoch; 0 disables.
        sample_crop: side of the logged HR crops (centre of the image).
    """

    def __init__(
        self,
        scale: int = 2,
        n_resblocks: int = 8,
        n_feats: int = 32,
        in_chans: int = 3,
        res_scale: float = 1.0,
        kernel_size: int = 3,
        bicubic_skip: bool = False,
        border: int | None = None,
        y_channel: bool = True,
        example_size: int = 32,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        log_samples: int = 2,
        sample_crop: int = 128,
    ) -> None:
        super().__init__()
        if border is not None and border < 0:
            raise ValueError(f"border must be >= 0, got {border}")
        if y_channel and in_chans not in (1, 3):
            raise ValueError(f"y_channel=True needs in_chans 1 or 3 (got {in_chans}); set y_channel=False")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = EDSR(scale, n_resblocks, n_feats, in_chans, res_scale, kernel_size, bicubic_skip=bicubic_skip)
        self.scale = scale
        self.border = scale if border is None else border
        self.example_input_array = torch.zeros(1, in_chans, example_size, example_size)
        self.init_optimization(optimizer, scheduler, lr_schedule, warmup_steps)
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            for method in ("", "_bicubic"):
                # dim=(1, 2, 3): one PSNR per image, averaged over images (not the PSNR of the pooled MSE)
                self.metrics[f"{stage}_psnr{method}"] = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
                self.metrics[f"{stage}_ssim{method}"] = StructuralSimilarityIndexMeasure(data_range=1.0)

    def forward(self, lr: Tensor) -> Tensor:
        return self.model(lr)

    def output_modules(self) -> list[nn.Module]:
        """The upsampler convs (the pixel shuffle fixes their channel count) and the tail (image channels)."""
        upsample = [m for m in self.model.upsample.modules() if isinstance(m, nn.Conv2d)]  # type: ignore[union-attr]
        return [*upsample, self.model.tail]  # type: ignore[list-item]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("scale", "in_chans"):
            expected = getattr(datamodule, attr, None)
            if expected is not None and expected != self.hparams[attr]:
                raise ValueError(
                    f"{type(self).__name__}({attr}={self.hparams[attr]}) does not match the data: "
                    f"{type(datamodule).__name__}.{attr} = {expected}. Set model {attr}: {expected} "
                    f"(YAML: model.init_args.{attr}).")

    # ----------------------------------------------------------------- steps
    def _check_pair(self, lr: Tensor, hr: Tensor) -> None:
        expected = (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale)
        if lr.ndim != 4 or hr.ndim != 4 or tuple(hr.shape[-2:]) != expected or lr.shape[:2] != hr.shape[:2]:
            raise ValueError(f"{type(self).__name__}(scale={self.scale}) needs HR = LR x {self.scale}; got LR "
                             f"{tuple(lr.shape)} and HR {tuple(hr.shape)}. Check the datamodule's scale and that "
                             "HR sizes are multiples of it.")

    def _score_input(self, images: Tensor) -> Tensor:
        images = quantize_8bit(images)
        return shave(rgb_to_y(images) if self.hparams.y_channel else images, self.border)

    def task_loss(self, output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        """L1 between the super-resolved ``output`` and the HR images (EDSR's training loss)."""
        return F.l1_loss(output, batch[1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        lr, hr = batch
        self._check_pair(lr, hr)
        loss = self.task_loss(self(lr), batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss + self.pop_auxiliary_loss(loss)

    def _eval_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, Tensor]:
        lr, hr = batch
        self._check_pair(lr, hr)
        sr = self(lr)
        self.log(f"{stage}/loss", self.task_loss(sr, batch), on_step=False, on_epoch=True, batch_size=lr.shape[0])
        bicubic = bicubic_upsample(lr, self.scale)
        target = self._score_input(hr)
        if min(target.shape[-2:]) < 11:  # SSIM's 11x11 Gaussian window
            raise ValueError(f"images of {tuple(hr.shape[-2:])} px leave {tuple(target.shape[-2:])} px after "
                             f"shaving border={self.border}: too small to score (SSIM needs 11x11)")
        for method, output in (("", sr), ("_bicubic", bicubic)):
            scored = self._score_input(output)
            self.metrics[f"{stage}_psnr{method}"].update(scored, target)
            self.metrics[f"{stage}_ssim{method}"].update(scored, target)
        return sr, bicubic

    def _log_epoch_metrics(self, stage: str) -> None:
        values = {}
        for name in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"):
            metric = self.metrics[f"{stage}_{name}"]
            if not metric.update_called:
                return
            values[name] = metric.compute()  # synchronised across DDP ranks by torchmetrics
            metric.reset()
        values["psnr_gain"] = values["psnr"] - values["psnr_bicubic"]
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("psnr", "psnr_bicubic"))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        sr, bicubic = self._eval_step(batch, batch_idx, "val")
        if batch_idx < self.hparams.log_samples:
            self._log_samples(batch, sr, bicubic, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Super-resolve an LR batch (or the LR half of an ``(lr, hr)`` pair) to 8-bit levels in [0, 1]."""
        lr = batch[0] if isinstance(batch, (tuple, list)) else batch
        return quantize_8bit(self(lr))

    # ----------------------------------------------------------------- image logging
    def _log_samples(self, batch: tuple[Tensor, Tensor], sr: Tensor, bicubic: Tensor, batch_idx: int) -> None:
        """LR (nearest-neighbour upsampled, to see its pixels), bicubic, SR and HR crops of the first image."""
        lr, hr = batch
        s = self.scale
        side = min(self.hparams.sample_crop, hr.shape[-2], hr.shape[-1]) // s * s
        top = (hr.shape[-2] - side) // 2 // s * s
        left = (hr.shape[-1] - side) // 2 // s * s
        hr_crop = hr[0, :, top:top + side, left:left + side]
        lr_crop = lr[0:1, :, top // s:(top + side) // s, left // s:(left + side) // s]
        lr_nearest = F.interpolate(lr_crop, scale_factor=s, mode="nearest")[0]
        crops = [lr_nearest, bicubic[0, :, top:top + side, left:left + side],
                 quantize_8bit(sr[0, :, top:top + side, left:left + side]), hr_crop]
        names = [f"LR (x{s} nearest)", "bicubic", "SR", "HR"]
        self.log_images(f"val/samples/{batch_idx}", crops, [f"image {batch_idx}: {n}" for n in names])
