"""Binary networks as two callbacks: ``Binarization`` (the model transformation) and ``BopOptimizer``.

``Binarization`` converts ``pl_module.model`` with :func:`lightning_effnets.convert.to_binary` in
``setup`` (before the optimizer exists), so a checkpoint of the converted model reloads into the same
structure when the callback is present (``Trainer.fit(ckpt_path=...)``, ``trainer.test(ckpt_path=...)``);
outside the Trainer, :meth:`Binarization.restore` (or :meth:`Binarization.record_from_checkpoint` +
:func:`~lightning_effnets.convert.restore_binary`) rebuilds it. With ``strategy="ddp_spawn"`` the conversion
happens in the worker processes only: the launching process gets the trained weights back into its
*unconverted* model, so reload them from a checkpoint with :meth:`Binarization.restore` there.

``BopOptimizer`` trains the ±1 weights with Bop (arXiv:1906.02107) and every other parameter with a
real-valued optimizer. Lightning's automatic optimization drives one optimizer per step, so after the
task's ``configure_optimizers`` has run (``on_fit_start``) the callback wraps the task's optimizer and a
:class:`~lightning_effnets.optim.Bop` into one :class:`~lightning_effnets.optim.HybridOptimizer`. The
task's optimizer object stays the one that trains the real parameters, so its LR scheduler keeps
working; the binary weights are removed from it (they must never get its weight decay or momentum).
The hybrid's state is ``{"real", "binary"}`` in the checkpoint, restored on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_effnets.convert.binary import RELU_REPLACEMENTS, ReluReplacement, restore_binary, to_binary
from lightning_effnets.convert.core import _matches
from lightning_effnets.layers.binary import ESTIMATORS, Estimator, binary_parameters, iter_binary_layers
from lightning_effnets.optim.bop import Bop, HybridOptimizer, _validate_hyperparameters, check_partition
from lightning_effnets.tasks.base import OptimizerFactory

__all__ = ["Binarization", "BopOptimizer"]


def _task_model(pl_module: pl.LightningModule, who: str) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{who} acts on the task's network in `{type(pl_module).__name__}.model`, which is "
                         "missing; task modules keep their network there (EffnetsTaskMixin contract)")
    return model


class Binarization(pl.Callback):
    """Convert the task's network to a binary network in ``setup`` (see :func:`~lightning_effnets.convert.to_binary`).

    Args: those of :func:`~lightning_effnets.convert.to_binary` (``skip_first``, ``skip_last``, ``include``,
    ``exclude``, ``activation``, ``scale``, ``balanced``, ``latent``, ``relu``). With ``skip_last`` the task's
    ``output_modules()`` (all its output heads) stay real too, not only the last layer.

    Logs ``effnets/binary/converted_layers`` and ``effnets/binary/binary_weight_fraction`` (share of the
    network's parameters that are binary) at the start of training. Its state (the converted layer names
    and options) is saved in checkpoints; loading a checkpoint converted differently is an error.
    """

    def __init__(self, skip_first: bool = True, skip_last: bool = True, include: Any = None, exclude: Any = None,
                 activation: Estimator | None = "ste", scale: bool = False, balanced: bool = False,
                 latent: bool = False, relu: ReluReplacement | None = "identity") -> None:
        if activation is not None and activation not in ESTIMATORS:
            raise ValueError(f"Binarization(activation=...) must be None or one of {ESTIMATORS}, got {activation!r}")
        if relu is not None and relu not in RELU_REPLACEMENTS:
            raise ValueError(f"Binarization(relu=...) must be None or one of {RELU_REPLACEMENTS}, got {relu!r}")
        if balanced and not latent:
            raise ValueError("Binarization(balanced=True) needs latent=True (balanced binarisation centres latent "
                             "real weights; Bop trains ±1 weights, which it leaves unchanged)")
        self.skip_first, self.skip_last = skip_first, skip_last
        self.include, self.exclude = include, exclude
        self.options: dict[str, Any] = dict(activation=activation, scale=scale, balanced=balanced, latent=latent,
                                            relu=relu)
        #: What the conversion did: ``{"converted": [...], "kept": {...}, "options": {...}}``.
        self.record: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = _task_model(pl_module, "Binarization")
        if self.record is not None and _is_converted(model, self.record):
            return  # setup runs once per stage (fit, then test, ...): convert only once
        exclude = self.exclude
        outputs = pl_module.output_modules() if self.skip_last and hasattr(pl_module, "output_modules") else []
        if outputs:  # every output head of the task stays real (detection has several), not only the last layer
            output_names = {name for name, m in model.named_modules() if any(m is o for o in outputs)}
            user_exclude = self.exclude
            exclude = lambda name, m: name in output_names or _matches(user_exclude, name, m)  # noqa: E731
        report = to_binary(model, self.skip_first, self.skip_last, self.include, exclude, **self.options)
        self.record = {"converted": list(report.converted), "kept": dict(report.kept), "options": dict(self.options)}
        layers = sum(1 for _ in iter_binary_layers(model))
        rank_zero_info(f"Binarization: {layers} binary layer(s), kept full precision: "
                       f"{', '.join(report.kept) or 'none'}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = _task_model(pl_module, "Binarization")
        binary = sum(p.numel() for _, m in iter_binary_layers(model) for p in [m.weight])
        total = sum(p.numel() for p in model.parameters())
        pl_module.log("effnets/binary/converted_layers", float(sum(1 for _ in iter_binary_layers(model))))
        pl_module.log("effnets/binary/binary_weight_fraction", binary / max(total, 1))

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
                "Binarization: the checkpoint was converted differently from this run "
                f"(only in checkpoint: {sorted(saved - now)[:6]}, only now: {sorted(now - saved)[:6]}); "
                "use the same Binarization options (include/exclude/skip_first/skip_last) as the run that saved it")
        if self.record is not None and dict(state_dict["options"]) != self.record["options"]:
            raise ValueError(f"Binarization: the checkpoint used options {state_dict['options']}, this run "
                             f"{self.record['options']}; use the same options to resume")
        if self.record is None:
            self.record = {"converted": list(state_dict["converted"]), "kept": dict(state_dict.get("kept", {})),
                           "options": dict(state_dict["options"])}

    @staticmethod
    def record_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The conversion record a Binarization callback stored in a Lightning checkpoint dict.

        Pass it to :func:`~lightning_effnets.convert.restore_binary` to rebuild the binary structure of a
        fresh model before ``load_state_dict``.
        """
        states = [v for k, v in checkpoint.get("callbacks", {}).items() if str(k).startswith("Binarization") and v]
        if len(states) != 1:
            raise ValueError(f"expected one Binarization state in the checkpoint's 'callbacks', found {len(states)}; "
                             "was it saved by a Trainer with the Binarization callback?")
        return states[0]

    @staticmethod
    def restore(model: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Convert a fresh ``model`` (the task's ``.model``) exactly as recorded in ``checkpoint``."""
        restore_binary(model, Binarization.record_from_checkpoint(checkpoint))


def _is_converted(model: nn.Module, record: dict[str, Any]) -> bool:
    binary = {name for name, _ in iter_binary_layers(model)}
    layer_names = [n for n in record["converted"] if n in binary]
    return bool(layer_names)


def _default_real_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """Adam(lr=0.01), the real-valued optimizer of Bop's CIFAR-10 recipe (arXiv:1906.02107)."""
    return torch.optim.Adam(params, lr=0.01)


def _is_mock(optimizer: Any) -> bool:
    """Lightning's placeholder when ``configure_optimizers`` returns None."""
    return type(optimizer).__name__ == "_MockOptimizer"


class BopOptimizer(pl.Callback):
    """Train binary (±1) weights with Bop and all other parameters with a real-valued optimizer.

    Args:
        real_optimizer: ``None`` (default) keeps the task's own optimizer from ``configure_optimizers`` for the
            real parameters, with its LR scheduler; if the task has none, Adam(lr=0.01) as in the paper. A
            ``params -> Optimizer`` factory (YAML ``class_path``/``init_args``) replaces the task's optimizer;
            that is refused when a task LR scheduler is bound to the replaced optimizer (configure the real
            optimizer on the task instead).
        gamma: Bop adaptivity rate (paper default 1e-4).
        threshold: Bop flip threshold (paper default 1e-8).
        log_flips: log ``effnets/bop/flip_ratio``, the fraction of binary weights flipped in the step, on the
            steps Lightning writes logs (every ``Trainer(log_every_n_steps)``); counting flips costs about as
            much as the Bop update itself, so it is done only on those steps.

    Raises ``ValueError`` at fit start when the model has no binary (±1) parameters, when a parameter is
    claimed by both optimizers or a trainable one by none, with several task optimizers, or with fp16
    loss scaling (``precision="16-mixed"``), which would feed Bop scaled gradients.
    """

    def __init__(self, real_optimizer: OptimizerFactory | None = None, gamma: float = 1e-4,
                 threshold: float = 1e-8, log_flips: bool = True) -> None:
        _validate_hyperparameters(gamma, threshold)
        self.real_optimizer = real_optimizer
        self.gamma, self.threshold = gamma, threshold
        self.log_flips = log_flips
        self.optimizer: HybridOptimizer | None = None
        self._logged_step = -1

    # ------------------------------------------------------------------ building the hybrid optimizer
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        binary = [p for p in binary_parameters(pl_module) if p.requires_grad]
        if not binary:
            latent = [n for n, m in iter_binary_layers(pl_module) if m.latent]
            hint = (f" Its binary layers ({', '.join(latent[:4])}) use latent real weights (latent=True), which a "
                    "real optimizer trains; use latent=False for Bop." if latent else
                    " Add the Binarization callback (before BopOptimizer), or build the network from "
                    "lightning_effnets.layers.BinaryConv2d/BinaryLinear.")
            raise ValueError(f"BopOptimizer: {type(pl_module).__name__} has no binary (±1) parameters to optimise."
                             + hint)
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("BopOptimizer: fp16 loss scaling (precision='16-mixed') would hand Bop scaled "
                             "gradients and break its threshold; use precision='bf16-mixed' or '32-true'")
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"BopOptimizer supports tasks with exactly one optimizer, found {len(optimizers)}")
        task_optimizer = optimizers[0]
        if isinstance(task_optimizer, HybridOptimizer):
            self.optimizer = task_optimizer
            return
        binary_ids = {id(p) for p in binary}
        if self.real_optimizer is None and not _is_mock(task_optimizer):
            real = task_optimizer
            for group in real.param_groups:  # binary weights belong to Bop only
                group["params"] = [p for p in group["params"] if id(p) not in binary_ids]
            for p in binary:
                real.state.pop(p, None)
        else:
            bound = [type(c.scheduler).__name__ for c in trainer.strategy.lr_scheduler_configs
                     if getattr(c.scheduler, "optimizer", None) is task_optimizer]
            if bound and not _is_mock(task_optimizer):
                raise ValueError(
                    f"BopOptimizer(real_optimizer=...) would replace the task's optimizer, but the task's LR "
                    f"scheduler ({', '.join(bound)}) is bound to it and would drive nothing. Configure the real "
                    "optimizer on the task instead (e.g. model.init_args.optimizer in YAML) and leave "
                    "real_optimizer=None.")
            factory = self.real_optimizer or _default_real_optimizer
            seen: set[int] = set()
            params = []
            for p in pl_module.parameters():
                if p.requires_grad and id(p) not in binary_ids and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            real = factory(params)
        bop = Bop(binary, gamma=self.gamma, threshold=self.threshold)
        check_partition(pl_module, {type(real).__name__: real, "Bop": bop})
        self.optimizer = HybridOptimizer(real, bop)
        trainer.strategy.optimizers = [self.optimizer]
        rank_zero_info(f"BopOptimizer: {len(binary)} binary tensor(s) ({sum(p.numel() for p in binary):,} weights) "
                       f"-> Bop(gamma={self.gamma}, threshold={self.threshold}); the rest -> {type(real).__name__}")

    # ------------------------------------------------------------------ logging
    @staticmethod
    def _logs_this_step(trainer: pl.Trainer) -> bool:
        """Whether Lightning writes step metrics after the coming optimizer step (its own rule)."""
        every = trainer.log_every_n_steps
        return every > 0 and (trainer.global_step + 1) % every == 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.optimizer is not None:
            self.optimizer.binary.track_flips = self.log_flips and self._logs_this_step(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.optimizer is None or trainer.global_step == self._logged_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._logged_step = trainer.global_step
        bop = self.optimizer.binary
        ratio = bop.last_flip_ratio
        if ratio is None:
            return
        group = bop.param_groups[0]
        pl_module.log("effnets/bop/flip_ratio", ratio.float(), on_step=True, on_epoch=False)
        pl_module.log("effnets/bop/gamma", float(group["gamma"]), on_step=True, on_epoch=False)
        pl_module.log("effnets/bop/threshold", float(group["threshold"]), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "threshold": self.threshold, "logged_step": self._logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logged_step = int(state_dict.get("logged_step", -1))
        saved = (state_dict.get("gamma"), state_dict.get("threshold"))
        if saved != (self.gamma, self.threshold):
            rank_zero_warn(f"BopOptimizer: resuming a run trained with gamma, threshold = {saved}; the checkpoint's "
                           f"optimizer state carries those values and overrides {(self.gamma, self.threshold)}")
