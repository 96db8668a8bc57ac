"""Progressive kernel knowledge distillation (PKKD, arXiv:2009.13044) for adder students, on any task.

A CNN teacher with the student's architecture is created from scratch and trained *together* with the adder
student ("progressive": the student learns from a teacher that is itself improving). Every training step:

1. the task runs the student as usual; hooks capture the raw (pre-normalisation) output of each matched adder
   layer;
2. when the student's forward returns, the teacher runs on the same input; hooks capture each matched conv layer's
   input and raw output;
3. the callback adds to the task loss, through the task contract (``add_auxiliary_loss``):

   * ``pkkd/teacher``: the teacher's own supervised loss (how it learns): the task's own loss through the task
     contract, ``pl_module.task_loss(teacher_output, batch)``, so the teacher trains on every task with the
     objective the task trains its network with (or a fixed loss / callable, see ``teacher_loss``);
   * ``pkkd/feature``: ``feature_weight * w(t) * mean_l ||conv1x1_l(laplace(adder_l)) - gaussian(conv_l)||^2``
     (:mod:`lightning_effnets.distill`), teacher side detached;
   * ``pkkd/output``: ``logit_weight * w(t) * KD`` between outputs: temperature-softened KL for logits, L1 for
     dense outputs (super-resolution), teacher side detached;

   where ``w(t)`` is the progressive schedule (:func:`~lightning_effnets.distill.progressive_weight`).

Design decisions:

* **One optimizer.** The teacher and the 1x1 mappings are registered as a submodule of the LightningModule
  (``pl_module.effnets_pkkd``) in ``setup``, before the optimizer and the DDP wrapper exist. They therefore join
  the task's optimizer through the contract (``optimizer_param_groups`` collects ``pl_module.parameters()``),
  follow the task's schedule, and DDP all-reduces their gradients and broadcasts their initial values like any
  other parameter: both ranks always hold the same teacher. (A second optimizer would need manual optimization
  in every task.) ``AdaptiveAdderLR`` only touches ``Adder2d`` weights, so the teacher's convolutions get plain
  gradients. The teacher's learning rate can still differ: ``teacher_lr_scale`` puts its parameters in their own
  param group (the contract's ``lr_scale``), since the CNN's best rate is not the adder student's.
* **Teacher = pre-conversion architecture.** With ``teacher=None`` the teacher is a copy of ``pl_module.model``
  taken before :class:`~lightning_effnets.callbacks.AdderConversion` converts it (same initial weights as the
  network the student was converted from). Callback order does not matter: if the model is not converted yet
  when this callback's ``setup`` runs, it copies the model and then runs ``AdderConversion.setup`` itself (which
  is idempotent); if it already is, the CNN twin is rebuilt from the adder layers' geometry
  (:func:`~lightning_effnets.distill.cnn_twin`, fresh conv initialisation).
* **The task's own loss for the teacher.** The teacher's loss comes from the task contract
  (``task_loss``), not from guessing at the batch: a detection or re-id batch says nothing about its loss, and
  a classification task's label smoothing is part of its objective. The teacher trains with the objective
  the task trains its own network with, on every task.
* **Clean student.** The teacher and mappings are invisible to ``pl_module.state_dict()``: they are saved in this
  callback's ``state_dict`` (checkpoint ``"callbacks"`` section) and restored from it on resume, so a checkpoint's
  ``state_dict`` loads into a plain (adder) task module, and they are detached from ``pl_module`` when fitting
  ends: the exported student never contains the teacher.

Sigmas are per-element bandwidths: a layer with fan-in ``n = C/groups * kh * kw`` uses
``exp(adder_out / (sigma_adder * n))`` and ``exp(-||x - w||^2 / (2 * sigma_cnn^2 * n))``, so one value suits every
layer (kernel values stay away from 0 and 1 whatever the width). The paper's sigmas and loss weights are not in
its abstract (unverified); the defaults (sigmas 1, weights 1, T = 4, linear ramp over the first 25% of steps) were
set before any experiment and are what ``recipes/classification/adder_pkkd.yaml`` uses, untuned.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_effnets.callbacks.adder import AdderConversion, _task_model, adder_layers
from lightning_effnets.distill.kernels import gaussian_kernel, laplace_kernel
from lightning_effnets.distill.losses import KernelFeatureLoss, output_distillation_loss, soft_logit_loss
from lightning_effnets.distill.schedule import ScheduleName, progressive_weight
from lightning_effnets.distill.teacher import adder_units, cnn_twin
from lightning_effnets.layers.adder import Adder2d
from lightning_effnets.tasks.base import EffnetsTaskMixin, set_lr_scale

__all__ = ["DistillationModules", "ProgressiveKernelDistillation"]

TeacherLoss = Literal["auto", "cross_entropy", "l1", "mse"] | Callable[[Any, Any], Tensor]
OutputLoss = Literal["auto", "kl", "l1", "mse", "none"]

#: Attribute of the LightningModule that holds the teacher and the mappings during ``fit``.
ATTRIBUTE = "effnets_pkkd"


class DistillationModules(nn.Module):
    """The teacher and the per-layer feature losses (1x1 mappings), as one submodule of the LightningModule.

    Registered as a submodule so the optimizer, device moves and DDP see its parameters, but left out of its
    parent's ``state_dict`` (and not required when the parent loads one): its state belongs to the callback.
    """

    def __init__(self, teacher: nn.Module, feature_losses: nn.ModuleDict) -> None:
        super().__init__()
        self.teacher = teacher
        self.feature_losses = feature_losses
        self.register_state_dict_post_hook(_drop_own_entries)
        self.register_load_state_dict_post_hook(_allow_own_missing)

    def extra_state(self) -> dict[str, Any]:
        """The callback's copy of this module's tensors (``state_dict`` of the module itself is empty)."""
        return {"teacher": self.teacher.state_dict(), "feature_losses": self.feature_losses.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.feature_losses.load_state_dict(state["feature_losses"])


def _drop_own_entries(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        own = prefix.rstrip(".")
        for key in [k for k in metadata if k == own or k.startswith(prefix)]:
            del metadata[key]


def _allow_own_missing(module: nn.Module, incompatible_keys: Any) -> None:
    own = [k for k in incompatible_keys.missing_keys if k.startswith(f"{ATTRIBUTE}.") or f".{ATTRIBUTE}." in k]
    for key in own:
        incompatible_keys.missing_keys.remove(key)


def _key(name: str) -> str:
    return name.replace(".", "__") or "__root__"


class ProgressiveKernelDistillation(pl.Callback):
    """Train an adder student jointly with a CNN teacher and distil in kernel space (PKKD, arXiv:2009.13044).

    Use it with :class:`~lightning_effnets.callbacks.AdderConversion` (in any order) on any task module of the
    contract; see the module docstring for what happens each step and why.

    Args:
        teacher: the teacher network; ``None`` (default) builds a CNN copy of the task model's pre-conversion
            architecture. A given teacher must take the student's input; ``layers`` then names its conv layers
            unless they sit at the student's names.
        layers: which layer pairs are matched in kernel space. ``"auto"``: every adder layer of the student with
            the teacher convolution at the same place; a list of student layer names (adder layers or their
            AdderSR wrappers); or ``{student layer: teacher conv layer}``.
        sigma_adder: per-element Laplace bandwidth of the adder side (see module docstring), > 0.
        sigma_cnn: per-element Gaussian bandwidth of the CNN side, > 0.
        feature_weight: weight of the kernel feature loss (0 disables it and its mappings).
        logit_weight: weight of the output distillation loss: softened-logit KD for (N, classes) outputs, L1 to
            the teacher's output for dense outputs (0 disables it).
        temperature: softmax temperature of the logit KD (the loss is scaled by ``T^2``).
        schedule: progressive ramp of the distillation weights: ``"linear"``, ``"cosine"`` or ``"constant"``.
        ramp: fraction of the training steps over which the weights ramp from ``ramp_start`` to 1.
        ramp_start: initial factor of the ramp.
        output_loss: ``"auto"`` (KL for 2-d logits, L1 for dense outputs, nothing for structured outputs such as
            detection heads), or force ``"kl"``, ``"l1"``, ``"mse"``, ``"none"``.
        teacher_loss: the teacher's supervised loss. ``"auto"``: the task's own training loss,
            ``pl_module.task_loss(teacher_output, batch)`` (:meth:`EffnetsTaskMixin.task_loss
            <lightning_effnets.tasks.base.EffnetsTaskMixin.task_loss>`; every task of the package implements it, so
            the teacher trains jointly on classification, detection, super-resolution, referring and re-id alike);
            a task that exposes no loss gets a clear error in ``setup``. Or ``"cross_entropy"``, ``"l1"``, ``"mse"`` against ``batch[1]`` of ``batch =
            (input, target, ...)``, or ``callable(teacher_output, batch) -> scalar``. Whatever the loss,
            ``effnets/pkkd/teacher_acc`` is logged when the batch is ``(input, integer labels [N], ...)`` and the
            output ``(N, classes)`` logits.
        train_teacher: train the teacher jointly (PKKD). ``False`` freezes a given, already trained teacher (kept
            in eval mode, no teacher loss): plain kernel distillation from a fixed CNN.
        teacher_lr_scale: the task optimizer's learning rate on the teacher's parameters is multiplied by it
            (> 0; via :func:`~lightning_effnets.tasks.base.set_lr_scale`, so the teacher gets its own param
            group). The teacher shares the student's optimizer, but a CNN's best learning rate is not an adder
            network's: on low-data digits with SGD the adder recipes use lr 0.2 while the CNN alone does best at
            0.1, so ``0.5`` gives the teacher its own best rate. The 1x1 mappings are trained for the student's
            loss and stay at the task's rate.

    Logged: epoch means ``effnets/pkkd/{teacher_loss, teacher_acc, feature_loss, output_loss}`` (unweighted;
    averaged over ranks), the same with a ``_step`` suffix plus ``effnets/pkkd/weight`` (the schedule's factor)
    every ``trainer.log_every_n_steps`` steps; the task logs the weighted sum of all terms as ``train/aux/pkkd``.
    (Per-step ``log`` calls cost ~1 ms each on CPU, a large share of a small model's step, hence the epoch
    accumulation.)
    """

    def __init__(self, teacher: nn.Module | None = None, layers: str | list[str] | dict[str, str] = "auto",
                 sigma_adder: float = 1.0, sigma_cnn: float = 1.0, feature_weight: float = 1.0,
                 logit_weight: float = 1.0, temperature: float = 4.0, schedule: ScheduleName = "linear",
                 ramp: float = 0.25, ramp_start: float = 0.0, output_loss: OutputLoss = "auto",
                 teacher_loss: TeacherLoss = "auto", train_teacher: bool = True,
                 teacher_lr_scale: float = 1.0) -> None:
        for name, value in (("sigma_adder", sigma_adder), ("sigma_cnn", sigma_cnn), ("temperature", temperature),
                            ("teacher_lr_scale", teacher_lr_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ProgressiveKernelDistillation: {name} must be a positive number, got {value!r}")
        for name, value in (("feature_weight", feature_weight), ("logit_weight", logit_weight)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ProgressiveKernelDistillation: {name} must be >= 0, got {value!r}")
        progressive_weight(0, 1, schedule, ramp, ramp_start)  # validates the schedule arguments
        if output_loss not in ("auto", "kl", "l1", "mse", "none"):
            raise ValueError(f"ProgressiveKernelDistillation: output_loss must be 'auto', 'kl', 'l1', 'mse' or "
                             f"'none', got {output_loss!r}")
        if not callable(teacher_loss) and teacher_loss not in ("auto", "cross_entropy", "l1", "mse"):
            raise ValueError(f"ProgressiveKernelDistillation: teacher_loss must be 'auto', 'cross_entropy', 'l1', "
                             f"'mse' or a callable(teacher_output, batch), got {teacher_loss!r}")
        if not train_teacher and teacher is None:
            raise ValueError("ProgressiveKernelDistillation(train_teacher=False) freezes the teacher, so it needs a "
                             "trained one: pass teacher=<module>, or keep train_teacher=True (PKKD)")
        if not (layers == "auto" or isinstance(layers, (Sequence, Mapping)) and not isinstance(layers, str)):
            raise ValueError(f"ProgressiveKernelDistillation: layers must be 'auto', a list of student layer names "
                             f"or a {{student: teacher}} mapping, got {layers!r}")
        self.given_teacher = teacher
        self.layers = layers
        self.sigma_adder, self.sigma_cnn = float(sigma_adder), float(sigma_cnn)
        self.feature_weight, self.logit_weight = float(feature_weight), float(logit_weight)
        self.temperature = float(temperature)
        self.schedule, self.ramp, self.ramp_start = schedule, float(ramp), float(ramp_start)
        self.output_loss, self.teacher_loss, self.train_teacher = output_loss, teacher_loss, train_teacher
        self.teacher_lr_scale = float(teacher_lr_scale)
        #: ``(student adder layer, teacher conv layer)`` pairs matched in kernel space.
        self.pairs: list[tuple[str, str]] = []
        self.teacher_source: str | None = None
        self.distillation: DistillationModules | None = None
        self._pending_state: dict[str, Any] | None = None
        self._handles: list[RemovableHandle] = []
        self._pl_module: pl.LightningModule | None = None
        self._batch: Any = None
        self._armed = False
        self._capture_teacher = False
        self._student_out: dict[str, Tensor] = {}
        self._teacher_io: dict[str, tuple[Tensor, Tensor]] = {}
        self._total_steps = 1
        self._converted: list[str] | None = None
        self._pair_info: list[tuple[str, str, nn.Conv2d, int, int, nn.Module]] = []
        self._teacher_acc: Tensor | None = None
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    # ------------------------------------------------------------------------------------------ public views
    @property
    def teacher(self) -> nn.Module:
        """The teacher network (available after ``setup``)."""
        if self.distillation is None:
            raise RuntimeError("ProgressiveKernelDistillation: the teacher is created in setup (Trainer.fit)")
        return self.distillation.teacher

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict use the student alone
        model = _task_model(pl_module, "ProgressiveKernelDistillation")
        if self.train_teacher and self.teacher_loss == "auto":
            _check_task_loss(pl_module)  # before the teacher is built: fail fast, naming the fix
        if self.distillation is None:
            self.distillation = self._build(trainer, pl_module, model, stage)
            if self._pending_state is not None:
                self._restore(self._pending_state)
                self._pending_state = None
        elif not adder_layers(model):  # a second fit with this callback: the model must be converted again
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, AdderConversion):
                    callback.setup(trainer, pl_module, stage)
        if hasattr(pl_module, ATTRIBUTE) and getattr(pl_module, ATTRIBUTE) is not self.distillation:
            raise ValueError(f"{type(pl_module).__name__} already has an attribute {ATTRIBUTE!r}: use one "
                             "ProgressiveKernelDistillation callback per Trainer")
        self.distillation.to(next(iter(model.parameters())).device)
        pl_module.add_module(ATTRIBUTE, self.distillation)
        if not self.train_teacher:
            self.distillation.teacher.requires_grad_(False)
        # Set on every teacher parameter, also at 1.0: a teacher copied from the task model must not inherit a
        # student-side scale (e.g. AdderConversion's on adder weights). Done in every setup (the attribute is not
        # checkpointed), before configure_optimizers builds the param groups.
        set_lr_scale(self.distillation.teacher.parameters(), self.teacher_lr_scale)
        self._attach(pl_module, model)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module,
               stage: str) -> DistillationModules:
        if self.given_teacher is not None:
            teacher, self.teacher_source = self.given_teacher, "given"
        elif adder_layers(model):
            teacher = cnn_twin(model, _converted_names(trainer))
            self.teacher_source = "cnn twin rebuilt from the adder layers"
        else:
            teacher, self.teacher_source = copy.deepcopy(model), "copy of the model before adder conversion"
        if not adder_layers(model):
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, AdderConversion):
                    callback.setup(trainer, pl_module, stage)  # idempotent: it converts once
        if not adder_layers(model):
            raise ValueError(f"ProgressiveKernelDistillation distils into an adder student, but "
                             f"{type(pl_module).__name__}.model has no Adder2d layer: add "
                             "lightning_effnets.callbacks.AdderConversion to the callbacks or convert the model with "
                             "lightning_effnets.convert.to_adder")
        self._converted = _converted_names(trainer)
        self.pairs = self._match(model, teacher) if self.feature_weight > 0 else []
        losses = nn.ModuleDict()
        for student_name, teacher_name in self.pairs:
            student_layer, teacher_layer = model.get_submodule(student_name), teacher.get_submodule(teacher_name)
            losses[_key(student_name)] = KernelFeatureLoss(student_layer.out_channels, teacher_layer.out_channels)
        modules = DistillationModules(teacher, losses)
        self._check_shapes(pl_module, model, teacher)
        rank_zero_info(f"ProgressiveKernelDistillation: teacher = {self.teacher_source}; {len(self.pairs)} layer "
                       f"pair(s) matched in kernel space")
        return modules

    def _match(self, model: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
        """Resolve ``layers`` into ``(student adder layer, teacher conv layer)`` pairs, with helpful errors."""
        units = adder_units(model, self._converted)  # adder name -> name of the unit that replaced the conv
        by_unit = {unit: adder for adder, unit in units.items()}
        convs = {n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)}

        def student(name: str) -> str:
            if name in units:
                return name
            if name in by_unit:
                return by_unit[name]
            raise ValueError(f"ProgressiveKernelDistillation: {name!r} is not an adder layer of the student; "
                             f"candidates: {_listing(sorted(set(units) | set(by_unit)))}")

        def conv(name: str, for_student: str) -> str:
            if name not in convs:
                raise ValueError(f"ProgressiveKernelDistillation: the teacher has no Conv2d layer {name!r} to "
                                 f"match student layer {for_student!r}; teacher conv layers: "
                                 f"{_listing(sorted(convs))}. Pass layers={{student: teacher}} to pair them")
            return name

        if self.layers == "auto":
            pairs = [(adder, conv(unit, adder)) for adder, unit in units.items()]
        elif isinstance(self.layers, Mapping):
            pairs = [(student(s), conv(t, s)) for s, t in self.layers.items()]
        else:
            pairs = [(student(s), conv(units[student(s)], s)) for s in self.layers]
        if not pairs:
            raise ValueError("ProgressiveKernelDistillation: no layer pair to match (layers is empty); use "
                             "layers='auto' or set feature_weight=0 for output distillation only")
        return pairs

    def _check_shapes(self, pl_module: pl.LightningModule, model: nn.Module, teacher: nn.Module) -> None:
        """Dry run on ``example_input_array`` (eval mode, no grad): spatial sizes of each pair must agree."""
        example = getattr(pl_module, "example_input_array", None)
        if example is None or not self.pairs:
            return
        shapes: dict[tuple[str, str], tuple[int, ...]] = {}

        def recorder(side: str, name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Tensor) -> None:
                shapes[(side, name)] = tuple(output.shape)
            return hook

        handles = [m.register_forward_hook(recorder("s", n)) for n, m in model.named_modules()
                   if isinstance(m, Adder2d)]
        handles += [m.register_forward_hook(recorder("t", n)) for n, m in teacher.named_modules()
                    if isinstance(m, nn.Conv2d)]
        modes = {m: m.training for m in (*model.modules(), *teacher.modules())}
        device = next(iter(model.parameters())).device
        args = example if isinstance(example, tuple) else (example,)
        args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
        try:
            model.eval(), teacher.eval()
            with torch.no_grad():
                model(*args), teacher(*args)
        finally:
            for handle in handles:
                handle.remove()
            for m, training in modes.items():
                m.training = training
        for s, t in self.pairs:
            s_shape, t_shape = shapes.get(("s", s)), shapes.get(("t", t))
            if s_shape is None or t_shape is None:
                continue  # not on this input's path: checked again when training
            if s_shape[2:] != t_shape[2:]:
                same = sorted(n for (side, n), shp in shapes.items() if side == "t" and shp[2:] == s_shape[2:])
                raise ValueError(f"ProgressiveKernelDistillation: student layer {s!r} outputs {s_shape} but teacher "
                                 f"layer {t!r} outputs {t_shape}: their spatial sizes differ. Teacher conv layers "
                                 f"with spatial size {s_shape[2:]}: {_listing(same)}")

    # ------------------------------------------------------------------------------------------ hooks
    def _attach(self, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self._detach_hooks()
        assert self.distillation is not None
        self._pl_module = pl_module
        teacher = self.distillation.teacher
        self._pair_info = []
        for s, t in self.pairs:
            adder, conv = model.get_submodule(s), teacher.get_submodule(t)
            self._pair_info.append((s, t, conv, adder.weight[0].numel(), conv.weight[0].numel(),  # type: ignore
                                    self.distillation.feature_losses[_key(s)]))
            self._handles.append(model.get_submodule(s).register_forward_hook(self._student_hook(s)))
            self._handles.append(teacher.get_submodule(t).register_forward_hook(self._teacher_hook(t)))
        self._handles.append(model.register_forward_hook(self._on_student_forward, with_kwargs=True))

    def _detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _student_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if self._armed:
                bias = module.bias
                self._student_out[name] = output if bias is None else output - bias.view(1, -1, 1, 1)
        return hook

    def _teacher_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if self._capture_teacher:
                self._teacher_io[name] = (args[0], output)
        return hook

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) and self.schedule != "constant" and self.ramp > 0:
            rank_zero_warn("ProgressiveKernelDistillation: the number of training steps is unbounded, so the "
                           "progressive ramp cannot be placed; distilling with full weight from the start")
        self._total_steps = int(total) if math.isfinite(total) else 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch, self._armed = batch, True
        self._student_out, self._teacher_io = {}, {}
        if not self.train_teacher and self.distillation is not None:
            self.distillation.teacher.eval()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch, self._armed = None, False
        self._student_out, self._teacher_io = {}, {}

    def _weight(self, step: int) -> float:
        if self._total_steps <= 0:
            return 1.0
        return progressive_weight(step, self._total_steps, self.schedule, self.ramp, self.ramp_start)

    def _on_student_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                            output: Any) -> None:
        """The student's forward inside a training step has returned: run the teacher, add the PKKD losses."""
        if not (self._armed and module.training and torch.is_grad_enabled()):
            return
        self._armed = False
        pl_module, modules = self._pl_module, self.distillation
        assert pl_module is not None and modules is not None
        weight = self._weight(pl_module.trainer.global_step)
        batch_size = _batch_size(args)
        terms: dict[str, Tensor] = {}

        self._capture_teacher = True
        try:
            with torch.set_grad_enabled(self.train_teacher):
                teacher_out = modules.teacher(*args, **kwargs)
        finally:
            self._capture_teacher = False

        total: Tensor | None = None
        if self.train_teacher:
            terms["teacher_loss"] = teacher_loss = self._teacher_task_loss(pl_module, teacher_out)
            total = teacher_loss
            if self._teacher_acc is not None:
                terms["teacher_acc"], self._teacher_acc = self._teacher_acc, None
        if self.pairs:
            terms["feature_loss"] = feature = self._feature_loss()
            weighted = feature * (self.feature_weight * weight)
            total = weighted if total is None else total + weighted
        kind = self._output_kind(output)
        if kind != "none" and self.logit_weight > 0:
            if not isinstance(teacher_out, Tensor) or teacher_out.shape != output.shape:
                raise ValueError(f"ProgressiveKernelDistillation: the teacher's output "
                                 f"{_describe(teacher_out)} does not match the student's {_describe(output)}")
            target = teacher_out.detach()
            terms["output_loss"] = out_loss = (soft_logit_loss(output, target, self.temperature) if kind == "kl"
                                               else output_distillation_loss(output, target, kind))
            weighted = out_loss * (self.logit_weight * weight)
            total = weighted if total is None else total + weighted
        if total is not None:
            # One auxiliary term (the task logs it as train/aux/pkkd); the parts are logged below.
            pl_module.add_auxiliary_loss("pkkd", total)
        self._record(pl_module, terms, weight, batch_size)
        self._student_out, self._teacher_io = {}, {}

    # ------------------------------------------------------------------------------------------ logging
    def _record(self, pl_module: pl.LightningModule, terms: dict[str, Tensor], weight: float,
                batch_size: int) -> None:
        """Accumulate the terms for epoch means (logged once per epoch: ``log`` costs ~1 ms a call on CPU) and
        log their step values at the trainer's logging cadence."""
        for name, value in terms.items():
            value = value.detach() * batch_size
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._count += batch_size
        trainer = pl_module.trainer
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            values = {f"effnets/pkkd/{name}_step": value.detach() for name, value in terms.items()}
            values["effnets/pkkd/weight"] = torch.tensor(weight)
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums, self._count = {}, 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._count:
            means = {f"effnets/pkkd/{name}": total / self._count for name, total in self._sums.items()}
            pl_module.log_dict(means, on_step=False, on_epoch=True, sync_dist=True)
        self._sums, self._count = {}, 0

    # ------------------------------------------------------------------------------------------ losses
    def _feature_loss(self) -> Tensor:
        total: Tensor | None = None
        for s, t, conv, fan_in_s, fan_in_t, loss_fn in self._pair_info:
            if s not in self._student_out or t not in self._teacher_io:
                missing = "student" if s not in self._student_out else "teacher"
                raise RuntimeError(f"ProgressiveKernelDistillation: the {missing} layer of pair ({s!r}, {t!r}) did "
                                   "not run in this training step's forward; match only layers on the forward path")
            student_kernel = laplace_kernel(self._student_out[s], self.sigma_adder * fan_in_s)
            x, conv_out = self._teacher_io[t]
            with torch.no_grad():
                if conv.bias is not None:
                    conv_out = conv_out - conv.bias.view(1, -1, 1, 1)
                padding: Any = conv.padding
                if conv.padding_mode != "zeros":
                    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
                    padding = 0
                teacher_kernel = gaussian_kernel(x, conv.weight, self.sigma_cnn * math.sqrt(fan_in_t), conv.stride,
                                                 padding, conv.dilation, conv.groups, conv_out=conv_out)
            loss = loss_fn(student_kernel, teacher_kernel)
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(self._pair_info)

    def _teacher_task_loss(self, pl_module: pl.LightningModule, teacher_out: Any) -> Tensor:
        """The teacher's supervised loss on the current batch (see ``teacher_loss``); sets ``_teacher_acc``."""
        batch = self._batch
        self._teacher_acc = _label_accuracy(teacher_out, batch)
        kind = self.teacher_loss
        if callable(kind):
            loss, source = kind(teacher_out, batch), "teacher_loss"
        elif kind == "auto":
            loss, source = pl_module.task_loss(teacher_out, batch), f"{type(pl_module).__name__}.task_loss"
            if loss is None:
                raise _no_task_loss(pl_module, "it returned None for this batch")
        else:
            target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
            if not isinstance(teacher_out, Tensor) or not isinstance(target, Tensor):
                raise ValueError(f"ProgressiveKernelDistillation(teacher_loss={kind!r}) needs batch = (input, target, "
                                 f"...) and a tensor output; got target {_describe(target)} and output "
                                 f"{_describe(teacher_out)}. Use teacher_loss='auto' (the task's own loss) or "
                                 "teacher_loss=callable(teacher_output, batch)")
            losses = {"cross_entropy": F.cross_entropy, "l1": F.l1_loss, "mse": F.mse_loss}
            return losses[kind](teacher_out, target)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"ProgressiveKernelDistillation: {source} must return a scalar tensor, got "
                             f"{_describe(loss)}")
        return loss.reshape(())

    def _output_kind(self, output: Any) -> str:
        if self.output_loss != "auto":
            return self.output_loss
        if isinstance(output, Tensor) and output.is_floating_point():
            return "kl" if output.dim() == 2 else "l1"
        return "none"  # structured outputs (detection heads): feature distillation only

    # ------------------------------------------------------------------------------------------ teardown / state
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._detach_hooks()
        if getattr(pl_module, ATTRIBUTE, None) is self.distillation:
            delattr(pl_module, ATTRIBUTE)  # the trained student leaves fit without its teacher
        self._pl_module, self._batch = None, None
        self._student_out, self._teacher_io = {}, {}

    def state_dict(self) -> dict[str, Any]:
        if self.distillation is None:
            return {} if self._pending_state is None else dict(self._pending_state)
        return {"pairs": [list(p) for p in self.pairs], "teacher_source": self.teacher_source,
                "modules": self.distillation.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.distillation is None:
            self._pending_state = dict(state_dict)  # restored when setup builds the modules
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.distillation is not None
        saved = [tuple(p) for p in state.get("pairs", [])]
        if saved != self.pairs:
            raise ValueError(f"ProgressiveKernelDistillation: the checkpoint matched layer pairs {saved[:4]}..., this "
                             f"run {self.pairs[:4]}...; resume with the same `layers` and AdderConversion options")
        try:
            self.distillation.load_extra_state(state["modules"])
        except RuntimeError as err:
            raise ValueError(f"ProgressiveKernelDistillation: the checkpoint's teacher does not fit this run's "
                             f"teacher ({self.teacher_source}): {err}") from None


def _converted_names(trainer: pl.Trainer) -> list[str] | None:
    """The layers AdderConversion callbacks converted (exact adder-unit names), if any recorded them."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    names = [n for cb in callbacks if isinstance(cb, AdderConversion) and cb.record for n in cb.record["converted"]]
    return names or None


def _no_task_loss(pl_module: pl.LightningModule, why: str) -> ValueError:
    name = type(pl_module).__name__
    return ValueError(f"ProgressiveKernelDistillation(teacher_loss='auto') trains the teacher with the task's own "
                      f"loss, {name}.task_loss(output, batch), but {why}. Implement {name}.task_loss (the "
                      "EffnetsTaskMixin contract: the task's training loss of a model output for a batch; the "
                      "package's tasks all do), or pass teacher_loss='cross_entropy' | 'l1' | 'mse' | "
                      "callable(teacher_output, batch), or a trained teacher with train_teacher=False")


def _check_task_loss(pl_module: pl.LightningModule) -> None:
    """Raise if the task cannot give the teacher a loss: no contract method, or the mixin's default (no loss)."""
    method = getattr(type(pl_module), "task_loss", None)
    if method is None:
        raise _no_task_loss(pl_module, "it has no task_loss method (it does not mix in EffnetsTaskMixin)")
    if method is EffnetsTaskMixin.task_loss:
        raise _no_task_loss(pl_module, "it does not implement it (EffnetsTaskMixin's default returns None: the task "
                                       "exposes no loss)")


def _label_accuracy(output: Any, batch: Any) -> Tensor | None:
    """Top-1 accuracy when ``batch = (input, integer labels [N], ...)`` and ``output`` is ``(N, classes)`` logits."""
    target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
    if (isinstance(output, Tensor) and isinstance(target, Tensor) and output.dim() == 2 and target.dim() == 1
            and output.is_floating_point() and not target.is_floating_point() and len(target) == len(output)):
        return (output.detach().argmax(dim=1) == target).float().mean()
    return None


def _batch_size(args: tuple[Any, ...]) -> int:
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)} ({value.dtype})"
    return type(value).__name__


def _listing(names: Sequence[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
