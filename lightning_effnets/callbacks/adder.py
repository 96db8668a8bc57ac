"""AdderNets as two callbacks: ``AdderConversion`` (the model transformation) and ``AdaptiveAdderLR``.

``AdderConversion`` converts ``pl_module.model`` with :func:`lightning_effnets.convert.to_adder` in ``setup``
(before the optimizer exists, so the adder weights are what the optimizer trains). The task's output layers
(``output_modules()``) always stay multiplicative. Its state records exactly which layers were converted, so a
checkpoint reloads into the converted structure: with the callback present (``Trainer.fit(ckpt_path=...)``,
``trainer.test(ckpt_path=...)``) the same conversion is made before the weights are restored, and a checkpoint
converted differently is refused; outside the Trainer, :meth:`AdderConversion.load_from_checkpoint` (or
:meth:`AdderConversion.record_from_checkpoint` + :func:`~lightning_effnets.convert.restore_adder`) rebuilds it.

``AdaptiveAdderLR`` is the paper's adaptive learning rate (arXiv:1912.13200, Eq. 13): per adder layer ``l``
``grad_l <- eta * sqrt(numel(W_l)) * grad_l / ||grad_l||_2`` (eta = 0.2 in the authors' code). It rescales the
*gradient*, before the optimizer adds weight decay and momentum, which a per-layer learning rate would not
reproduce. It runs in ``on_before_optimizer_step``: after every backward pass of an accumulation window and after
DDP's gradient all-reduce (and AMP unscaling), so the norm is that of the gradient the optimizer will use, and
every rank scales identically. (The authors' DDP code normalises each device's gradient before averaging; ours is
the well-defined version: one normalisation of the averaged, accumulated gradient per optimizer step.)
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_effnets.convert.adder import restore_adder, to_adder
from lightning_effnets.convert.core import _matches
from lightning_effnets.layers.adder import Adder2d
from lightning_effnets.tasks.base import set_lr_scale

__all__ = ["AdderConversion", "AdaptiveAdderLR", "adder_layers"]


def _task_model(pl_module: pl.LightningModule, who: str) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{who} acts on the task's network in `{type(pl_module).__name__}.model`, which is "
                         "missing; task modules keep their network there (EffnetsTaskMixin contract)")
    return model


def adder_layers(module: nn.Module) -> list[tuple[str, Adder2d]]:
    """``(qualified name, layer)`` of every :class:`Adder2d` in ``module``."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Adder2d)]


class AdderConversion(pl.Callback):
    """Convert the task's network to an AdderNet in ``setup`` (see :func:`~lightning_effnets.convert.to_adder`).

    Args: those of :func:`~lightning_effnets.convert.to_adder` (``skip_first``, ``skip_last``, ``include``,
    ``exclude``, ``self_shortcut``, ``power_activation``, ``norm``, ``copy_weights``, ``unfreeze_bn``), plus
    ``lr_scale``: the task optimizer's learning rate on adder weights is multiplied by it (their N(0, 1) scale
    is far larger than a conv's, so an Adam-type optimizer, whose steps are ~lr per element, moves them slowly;
    AdaptiveAdderLR cannot help there, Adam undoes any gradient scaling). Needs the task's optimizer builder
    (``EffnetsTaskMixin.optimizer_param_groups``); not recorded in checkpoints (it changes no structure); ``unfreeze_bn``
    defaults to True here: adder detectors must keep adapting BN statistics.

    Logs ``effnets/adder/converted_layers`` and ``effnets/adder/adder_weight_fraction`` (share of the
    network's parameters in adder layers) when training starts.
    """

    def __init__(self, skip_first: bool = True, skip_last: bool = True, include: Any = None, exclude: Any = None,
                 self_shortcut: bool = False, power_activation: bool = False, norm: bool = False,
                 copy_weights: bool = False, unfreeze_bn: bool = True, lr_scale: float = 1.0) -> None:
        if not (isinstance(lr_scale, (int, float)) and math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"AdderConversion(lr_scale=...) must be a positive number, got {lr_scale!r}")
        self.lr_scale = float(lr_scale)
        self.skip_first, self.skip_last = skip_first, skip_last
        self.include, self.exclude = include, exclude
        self.copy_weights = copy_weights
        self.options: dict[str, Any] = dict(self_shortcut=self_shortcut, power_activation=power_activation,
                                            unfreeze_bn=unfreeze_bn)
        if norm:  # recorded only when set, so checkpoints saved before the option existed still match
            self.options["norm"] = True
        #: What the conversion did: ``{"converted": [...], "kept": {...}, "options": {...}}``.
        self.record: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = _task_model(pl_module, "AdderConversion")
        if self.record is not None and _is_converted(model, self.record):
            return  # setup runs once per stage (fit, then test, ...): convert only once
        if self.record is not None:  # state loaded before setup: rebuild exactly what was recorded
            report = restore_adder(model, self.record)
        else:
            outputs = {id(m) for m in getattr(pl_module, "output_modules", lambda: [])()}
            user_exclude = self.exclude

            def exclude(name: str, module: nn.Module) -> bool:
                return id(module) in outputs or _matches(user_exclude, name, module)

            report = to_adder(model, self.skip_first, self.skip_last, self.include, exclude,
                              copy_weights=self.copy_weights, **self.options)
            for name, why in list(report.kept.items()):
                if why == "excluded" and id(model.get_submodule(name)) in outputs:
                    report.kept[name] = "task output layer kept full precision"
            self.record = {"converted": list(report.converted), "kept": dict(report.kept),
                           "options": dict(self.options)}
        if self.lr_scale != 1.0:
            set_lr_scale([layer.weight for _, layer in adder_layers(model)], self.lr_scale)
        rank_zero_info(f"AdderConversion: {len(report.converted)} adder layer(s); kept full precision: "
                       f"{', '.join(report.kept) or 'none'}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = _task_model(pl_module, "AdderConversion")
        layers = adder_layers(model)
        adder = sum(m.weight.numel() for _, m in layers)
        total = sum(p.numel() for p in model.parameters())
        pl_module.log("effnets/adder/converted_layers", float(len(layers)))
        pl_module.log("effnets/adder/adder_weight_fraction", adder / max(total, 1))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.record is None else {"converted": list(self.record["converted"]),
                                               "kept": dict(self.record["kept"]),
                                               "options": dict(self.record["options"])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.record is not None and list(state_dict["converted"]) != self.record["converted"]:
            saved, now = set(state_dict["converted"]), set(self.record["converted"])
            raise ValueError(
                "AdderConversion: the checkpoint was converted differently from this run "
                f"(only in checkpoint: {sorted(saved - now)[:6]}, only now: {sorted(now - saved)[:6]}); use the "
                "same AdderConversion options (include/exclude/skip_first/skip_last) as the run that saved it")
        if self.record is not None and dict(state_dict["options"]) != self.record["options"]:
            raise ValueError(f"AdderConversion: the checkpoint used options {state_dict['options']}, this run "
                             f"{self.record['options']}; use the same options to resume")
        if self.record is None:
            self.record = {"converted": list(state_dict["converted"]), "kept": dict(state_dict.get("kept", {})),
                           "options": dict(state_dict["options"])}

    @staticmethod
    def record_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The conversion record an AdderConversion callback stored in a Lightning checkpoint dict."""
        states = [v for k, v in checkpoint.get("callbacks", {}).items()
                  if str(k).startswith("AdderConversion") and v]
        if len(states) != 1:
            raise ValueError(f"expected one AdderConversion state in the checkpoint's 'callbacks', found "
                             f"{len(states)}; was it saved by a Trainer with the AdderConversion callback?")
        return states[0]

    @staticmethod
    def restore(model: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Convert a fresh ``model`` (the task's ``.model``) exactly as recorded in ``checkpoint``."""
        restore_adder(model, AdderConversion.record_from_checkpoint(checkpoint))

    @staticmethod
    def load_from_checkpoint(task_cls: type[pl.LightningModule], checkpoint_path: Any, map_location: Any = "cpu",
                             **hparams_overrides: Any) -> pl.LightningModule:
        """``task_cls.load_from_checkpoint`` for a checkpoint of an adder-converted task.

        Builds the task from the checkpoint's hyper-parameters (plus overrides), converts its ``.model`` as
        recorded, then loads the weights strictly::

            task = AdderConversion.load_from_checkpoint(ImageClassifier, "last.ckpt")
        """
        checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
        task = task_cls(**{**checkpoint.get("hyper_parameters", {}), **hparams_overrides})
        AdderConversion.restore(_task_model(task, "AdderConversion.load_from_checkpoint"), checkpoint)
        task.on_load_checkpoint(checkpoint)
        task.load_state_dict(checkpoint["state_dict"])
        return task


def _is_converted(model: nn.Module, record: dict[str, Any]) -> bool:
    adders = [name for name, _ in adder_layers(model)]  # the layer itself, or inside its wrappers
    return any(a == n or a.startswith(n + ".") for n in record["converted"] for a in adders)


class AdaptiveAdderLR(pl.Callback):
    """Scale each adder layer's weight gradient to norm ``eta * sqrt(numel)`` once per optimizer step.

    ``grad_l <- eta * sqrt(numel(W_l)) * grad_l / ||grad_l||_2`` for every :class:`Adder2d` weight that the
    stepping optimizer holds (arXiv:1912.13200; eta = 0.2 as in the authors' code). Biases and all other
    parameters are untouched; a zero gradient stays zero. See the module docstring for when it runs
    (after accumulation and DDP all-reduce).

    Args:
        eta: the paper's hyper-parameter; the scaled gradient has RMS ``eta`` per element.
        log_norms: log ``effnets/adder/grad_norm/<layer>`` (the norm *before* scaling) every step.

    Pair it with SGD, as the paper does: Adam-type optimizers divide each element's step by its own gradient
    scale, which absorbs most of a per-layer rescaling (what remains is the per-step normalisation).

    State: ``eta`` is saved for the record; the constructor's value is the one used after resuming.
    """

    def __init__(self, eta: float = 0.2, log_norms: bool = True) -> None:
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"AdaptiveAdderLR: eta must be a positive number, got {eta!r}")
        self.eta = float(eta)
        self.log_norms = log_norms
        self._layers: list[tuple[str, Adder2d]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup (AdderConversion may be listed after this callback).
        self._layers = adder_layers(pl_module)
        if not self._layers:
            raise ValueError(f"AdaptiveAdderLR: {type(pl_module).__name__} has no Adder2d layers to scale; add "
                             "lightning_effnets.callbacks.AdderConversion to the callbacks (it converts in setup) "
                             "or convert the model with lightning_effnets.convert.to_adder")

    def scale_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """Apply the scaling to the current gradients; returns each layer's norm before scaling.

        With ``optimizer``, only layers whose weight that optimizer holds are scaled (several optimizers).
        """
        held = None
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        norms: dict[str, torch.Tensor] = {}
        for name, layer in self._layers:
            weight = layer.weight
            if weight.grad is None or (held is not None and id(weight) not in held):
                continue
            grad = weight.grad
            norm = torch.linalg.vector_norm(grad.detach().float())
            factor = self.eta * math.sqrt(weight.numel()) / norm.clamp_min(torch.finfo(torch.float32).tiny)
            grad.mul_(torch.where(norm > 0, factor, torch.zeros_like(factor)).to(grad.dtype))
            norms[name] = norm
        return norms

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        norms = self.scale_gradients(optimizer)
        if self.log_norms and norms:
            for name, norm in norms.items():
                pl_module.log(f"effnets/adder/grad_norm/{name}", norm, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # stateless: the scaling depends only on the current gradient and the constructor's eta
