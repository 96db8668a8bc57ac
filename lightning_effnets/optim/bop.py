"""Bop, the binary optimizer (Helwegen et al., "Latent Weights Do Not Exist", arXiv:1906.02107).

A binary network trained with Bop has no latent real-valued weights: its weights are ±1 and the
gradient is taken w.r.t. them. Bop keeps an exponential moving average ``m`` of that gradient and flips
a weight when the average agrees with it strongly enough::

    m <- m + gamma * (g - m)            # m starts at 0
    w <- -w  where  w * m > threshold   # using the updated m

Ties: a weight with ``w * m == threshold`` exactly is *not* flipped (the paper's strict inequality), so
with ``threshold=0`` a weight whose average gradient is exactly 0 keeps its sign. (larq's reference
implementation, ``sign(-sign(w * m - threshold) * w)`` with ``sign(0) = +1``, sets such weights to +1.)

Implementation. For ``threshold > 0`` the state holds ``q = m / threshold``; then "flip iff ``w*m > threshold``"
is "flip iff ``w*q > 1``", and ``sign(lerp(w, q, -K))`` with a large power of two ``K`` gives the new
weight in one fused pass: ``-sign(q - w)`` wherever ``q != w`` and ``w`` at the tie ``q == w``. The update
is four ``torch._foreach_*`` calls over all parameters (momentum decay, gradient accumulation, lerp,
sign), against three for ``SGD(momentum, foreach=True)``; ``bench/bop.py`` measures the ratio. The
per-tensor path (``foreach=False``) computes the same ``q`` and flips with ``torch.where(w*q > 1, -w, w)``;
both are bit-identical. For ``threshold=0`` (and thresholds below 1e-20, where ``m / threshold`` could
overflow) the state is ``m`` itself and the new weight is ``sign(w - 2 sign(m - threshold w))``, two more
passes. ``gamma`` and ``threshold`` are ordinary param-group entries, so anything that
edits param groups between steps (a scheduler, a callback) schedules them; when ``threshold`` changes the
stored ``q`` is rescaled so ``m`` is continuous. Half/bfloat16 weights keep a float32 momentum (``1 - gamma``
rounds to 1 in bfloat16). A non-finite momentum (diverged training) makes the weight NaN on the vectorised
path, where the per-tensor path would flip it.

:class:`HybridOptimizer` puts Bop (binary weights) and any real-valued optimizer (everything else) behind
one ``torch.optim.Optimizer`` so frameworks that drive a single optimizer (Lightning's automatic
optimization) train both; see :class:`lightning_effnets.callbacks.BopOptimizer`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_effnets.layers.binary import binary_parameters

__all__ = ["Bop", "HybridOptimizer", "check_partition", "split_binary_parameters"]


def _validate_hyperparameters(gamma: float, threshold: float) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"Bop gamma (adaptivity rate) must be in (0, 1], got {gamma}")
    if not threshold >= 0.0:
        raise ValueError(f"Bop threshold must be >= 0, got {threshold}")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _state_dtype(p: Tensor) -> torch.dtype:
    """float32 momentum for half/bfloat16 weights: ``1 - gamma`` (1e-4) would round to 1 in 8 mantissa bits."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


#: Below this threshold ``m / threshold`` could overflow float32; such thresholds use the unscaled update.
_MIN_SCALED_THRESHOLD = 1e-20


def _lerp_gain(dtype: torch.dtype) -> float:
    """A power of two ``K`` large enough that ``sign(lerp(w, q, -K))`` is exact for this dtype.

    The smallest non-zero ``|q - w|`` near ``|q| = 1`` is one ulp below 1, ``eps / 2``; ``K = 16 / eps``
    makes ``K*|q - w|`` at least 8, i.e. at least twice any ``|q| <= 2`` (and ``|q - w| >= |q|/2`` beyond), so
    the lerp result has the sign of ``w - q`` and is never rounded to 0. Overflow to ±inf keeps the sign.
    """
    return 16.0 / torch.finfo(dtype).eps


class Bop(Optimizer):
    """Binary optimizer for ±1 parameters (arXiv:1906.02107); see the module docstring for the rule.

    Args:
        params: ±1 parameters (or param groups). Every value must be exactly +1 or -1; give real-valued
            parameters to another optimizer (:class:`HybridOptimizer` combines the two).
        gamma: adaptivity rate of the gradient moving average, in (0, 1].
        threshold: flip threshold ``tau >= 0`` on ``w * m``.
        foreach: use the vectorised ``torch._foreach_*`` path (default) or a per-tensor loop.
        track_flips: count flipped weights in every step (:attr:`last_flips`, :attr:`last_flip_ratio`);
            costs a copy of the weights, a subtraction and a norm per step.

    Never applies weight decay or gradient clipping: a group with ``weight_decay`` is refused.
    """

    def __init__(self, params: Iterable[Any], gamma: float = 1e-4, threshold: float = 1e-8, *,
                 foreach: bool | None = None, track_flips: bool = False) -> None:
        _validate_hyperparameters(gamma, threshold)
        self.foreach = True if foreach is None else bool(foreach)
        self.track_flips = track_flips
        #: Weights flipped in the last step (a tensor on the parameters' device; None if not tracked).
        self.last_flips: Tensor | None = None
        #: Number of weights the last step updated (those with a gradient).
        self.last_numel: int = 0
        super().__init__(params, {"gamma": gamma, "threshold": threshold})

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyper-parameters and that every parameter is exactly ±1."""
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        if group.get("weight_decay", 0):
            raise ValueError("Bop never applies weight decay to binary weights (it would only push "
                             "them towards 0 and they must stay ±1); remove 'weight_decay' from the group")
        _validate_hyperparameters(group.get("gamma", self.defaults["gamma"]),
                                  group.get("threshold", self.defaults["threshold"]))
        index = len(self.param_groups)
        for i, p in enumerate(group["params"]):
            if not isinstance(p, Tensor):
                raise TypeError(f"Bop param group {index}: element {i} is a {type(p).__name__}, not a tensor")
            bad = (p.detach().abs() != 1).sum()
            if int(bad):
                sample = p.detach().flatten()[(p.detach().flatten().abs() != 1).nonzero()[0, 0]]
                raise ValueError(
                    f"Bop optimises only binary (±1) parameters, but parameter {i} of group {index} "
                    f"(shape {tuple(p.shape)}) has {int(bad)} value(s) other than ±1 (e.g. {float(sample):.4g}). "
                    "Give Bop only the weights of BinaryConv2d/BinaryLinear layers with latent=False "
                    "(lightning_effnets.layers.binary_parameters(model)) and the rest to a real optimizer "
                    "(HybridOptimizer / the BopOptimizer callback do this split).")
        super().add_param_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, keeping float32 momenta of half/bfloat16 weights float32."""
        saved = {k: v.get("scaled_momentum") for k, v in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, momentum in saved.items():
            if momentum is not None and params[index] in self.state:
                p = params[index]
                self.state[p]["scaled_momentum"] = momentum.to(device=p.device, dtype=_state_dtype(p), copy=True)

    # ------------------------------------------------------------------ helpers
    def momentum(self, p: Tensor) -> Tensor:
        """The gradient moving average ``m`` of parameter ``p`` (zeros before its first step)."""
        state = self.state.get(p)
        if not state:
            return torch.zeros_like(p)
        return state["scaled_momentum"] * state["momentum_scale"]

    @property
    def last_flip_ratio(self) -> Tensor | None:
        """Fraction of the updated weights that the last step flipped (None if not tracked)."""
        if self.last_flips is None:
            return None
        return self.last_flips / max(self.last_numel, 1)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Bop update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flips: list[Tensor] = []
        numel = 0
        for group in self.param_groups:
            gamma, threshold = group["gamma"], group["threshold"]
            _validate_hyperparameters(gamma, threshold)
            scaled = threshold >= _MIN_SCALED_THRESHOLD
            scale = threshold if scaled else 1.0
            params, grads, moms = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Bop does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["scaled_momentum"] = torch.zeros_like(p, dtype=_state_dtype(p),
                                                                memory_format=torch.preserve_format)
                    state["momentum_scale"] = scale
                elif state["momentum_scale"] != scale:  # threshold was rescheduled: keep m continuous
                    state["scaled_momentum"].mul_(state["momentum_scale"] / scale)
                    state["momentum_scale"] = scale
                params.append(p)
                grads.append(p.grad)
                moms.append(state["scaled_momentum"])
                numel += p.numel()
            if not params:
                continue
            update = _multi_tensor_bop if self.foreach else _single_tensor_bop
            count = update(params, grads, moms, gamma=gamma, scale=scale, threshold=threshold,
                           track_flips=self.track_flips)
            if count is not None:
                flips.append(count)
        self.last_numel = numel
        if self.track_flips and flips:
            device = flips[0].device
            self.last_flips = torch.stack([f.to(device) for f in flips]).sum()
        else:
            self.last_flips = None
        return loss


def _group_by_device_dtype(*lists: Sequence[Tensor]) -> dict[tuple[Any, Any], list[list[Tensor]]]:
    """Split parallel tensor lists into buckets of one device and dtype (what ``_foreach_*`` needs)."""
    buckets: dict[tuple[Any, Any], list[list[Tensor]]] = defaultdict(lambda: [[] for _ in lists])
    for items in zip(*lists):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for dst, t in zip(bucket, items):
            dst.append(t)
    return buckets


def _count_sign_changes(before: list[Tensor], after: list[Tensor]) -> Tensor:
    """Number of elements whose ±1 value changed: ``sum ||before - after||_2^2 / 4`` (exact below 2**22 per tensor)."""
    torch._foreach_sub_(before, after)  # 0 where kept, ±2 where flipped
    norms = torch.stack(torch._foreach_norm(before, 2)).double()
    return (norms * 0.5).square().round().sum()


def _multi_tensor_bop(params: list[Tensor], grads: list[Tensor], moms: list[Tensor], *, gamma: float,
                      scale: float, threshold: float, track_flips: bool) -> Tensor | None:
    counts = []
    for (_, dtype), (ps, gs, qs) in _group_by_device_dtype(params, grads, moms).items():
        # q <- (1 - gamma) q + (gamma / scale) g, i.e. m <- m + gamma (g - m) with q = m / scale
        torch._foreach_mul_(qs, 1.0 - gamma)
        torch._foreach_add_(qs, gs, alpha=gamma / scale)
        # half/bfloat16 weights flip in float32, the dtype of their momentum
        ws = [p.float() for p in ps] if dtype in _LOW_PRECISION else ps
        before = torch._foreach_clone(ws) if track_flips else None
        if scale == threshold:  # q = m / threshold: flip iff w q > 1
            torch._foreach_lerp_(ws, qs, -_lerp_gain(qs[0].dtype))  # sign = -sign(q - w), or w where q == w
        else:
            # q = m (threshold 0 or tiny): flip iff sign(m - threshold w) == w, so the new weight is
            # sign(w - 2 sign(m - threshold w)); where m == threshold w the weight keeps its sign
            e = torch._foreach_sub(qs, ws, alpha=threshold) if threshold else torch._foreach_sign(qs)
            if threshold:
                torch._foreach_sign_(e)
            torch._foreach_add_(ws, e, alpha=-2.0)
        torch._foreach_sign_(ws)
        if ws is not ps:
            torch._foreach_copy_(ps, ws)
        if before is not None:
            counts.append(_count_sign_changes(before, ws))
    if not counts:
        return None
    return torch.stack([c.to(counts[0].device) for c in counts]).sum()


def _single_tensor_bop(params: list[Tensor], grads: list[Tensor], moms: list[Tensor], *, gamma: float,
                       scale: float, threshold: float, track_flips: bool) -> Tensor | None:
    total: Tensor | None = None
    for p, g, q in zip(params, grads, moms):
        q.mul_(1.0 - gamma).add_(g, alpha=gamma / scale)
        flip = p * q > threshold / scale  # w * m > threshold, with q = m / scale (exact: p is ±1)
        if track_flips:
            n = flip.sum(dtype=torch.float64)
            total = n if total is None else total + n.to(total.device)
        p.copy_(torch.where(flip, -p, p))
    return total if track_flips else None


# ---------------------------------------------------------------------- splitting and combining
def split_binary_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(binary, real)`` trainable parameters of ``module`` (binary: ±1 weights of binary layers)."""
    binary = [p for p in binary_parameters(module) if p.requires_grad]
    ids = {id(p) for p in binary}
    seen: set[int] = set()
    real = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in ids and id(p) not in seen:
            seen.add(id(p))
            real.append(p)
    return binary, real


def check_partition(module: nn.Module, optimizers: dict[str, Optimizer]) -> None:
    """Raise unless every trainable parameter of ``module`` is claimed by exactly one of ``optimizers``.

    ``optimizers`` maps a display name (``"Bop"``, ``"Adam"``) to an optimizer; the error names the
    parameters claimed twice or by none, and how to fix it.
    """
    owners: dict[int, list[str]] = defaultdict(list)
    for opt_name, opt in optimizers.items():
        for group in opt.param_groups:
            for p in group["params"]:
                if opt_name not in owners[id(p)]:
                    owners[id(p)].append(opt_name)
    twice, none = [], []
    for name, p in module.named_parameters():
        claims = owners.get(id(p), [])
        if len(claims) > 1:
            twice.append(f"{name} ({' and '.join(claims)})")
        elif not claims and p.requires_grad:
            none.append(name)
    if twice:
        raise ValueError(f"parameters claimed by two optimizers: {', '.join(twice[:8])}"
                         f"{' ...' if len(twice) > 8 else ''}. Binary (±1) weights belong to Bop only and "
                         "every other parameter to the real optimizer.")
    if none:
        raise ValueError(f"trainable parameters claimed by no optimizer: {', '.join(none[:8])}"
                         f"{' ...' if len(none) > 8 else ''}. Add them to the real optimizer, or freeze them "
                         "with requires_grad_(False).")


class _MergedState(Mapping):
    """Read-only view of several optimizers' ``state`` (disjoint keys).

    Unlike ``collections.ChainMap`` a lookup never writes: ``ChainMap`` would call the first optimizer's
    ``defaultdict`` and silently create empty entries for the other optimizer's parameters.
    """

    def __init__(self, *states: Mapping[Any, Any]) -> None:
        self._states = states

    def __getitem__(self, key: Any) -> Any:
        for state in self._states:
            if key in state:
                return state[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        for state in self._states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self._states)


class HybridOptimizer(Optimizer):
    """``real`` and ``binary`` (a :class:`Bop`) stepped together behind one optimizer object.

    * ``step(closure)`` evaluates the closure once (forward + backward), then steps both.
    * ``param_groups`` are the *real* optimizer's groups (the same list): learning-rate schedulers,
      learning-rate monitors and gradient clipping see only real-valued parameters, as they should (binary
      weights must never be clipped or decayed); the Bop groups are ``hybrid.binary.param_groups``.
    * ``state_dict()`` is ``{"real": ..., "binary": ...}``; ``load_state_dict`` restores both.
    * ``zero_grad`` clears the gradients of both.

    Raises ``ValueError`` when a parameter belongs to both optimizers.
    """

    def __init__(self, real: Optimizer, binary: Bop) -> None:
        if not isinstance(binary, Bop):
            raise TypeError(f"HybridOptimizer(binary=...) must be a Bop, got {type(binary).__name__}")
        if not isinstance(real, Optimizer):
            raise TypeError(f"HybridOptimizer(real=...) must be a torch.optim.Optimizer, got {type(real).__name__}")
        real_ids = {id(p) for g in real.param_groups for p in g["params"]}
        both = [tuple(p.shape) for g in binary.param_groups for p in g["params"] if id(p) in real_ids]
        if both:
            raise ValueError(f"{len(both)} parameter(s) are claimed by both the real optimizer and Bop "
                             f"(shapes {both[:4]}); remove the binary weights from the real optimizer")
        # Optimizer.__init__ sets up the hook registries; the groups and state are the two optimizers'.
        super().__init__([{"params": []}], {})
        self.real = real
        self.binary = binary
        self.defaults = real.defaults
        self.param_groups = real.param_groups
        self.state = _MergedState(real.state, binary.state)  # type: ignore[assignment]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (once), then step the real optimizer and Bop."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.real.step()
        self.binary.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.real.zero_grad(set_to_none=set_to_none)
        self.binary.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"real": self.real.state_dict(), "binary": self.binary.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or set(state_dict) != {"real", "binary"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a HybridOptimizer state (keys {keys}): this checkpoint was saved without "
                             "Bop (BopOptimizer callback); resume it with the same optimizer set-up it was "
                             "trained with, or load only its weights")
        self.real.load_state_dict(state_dict["real"])
        self.binary.load_state_dict(state_dict["binary"])
        self.param_groups = self.real.param_groups
        self.state = _MergedState(self.real.state, self.binary.state)  # type: ignore[assignment]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of *real-valued* parameters (to Bop: ``hybrid.binary.add_param_group``)."""
        if "real" not in self.__dict__:  # called by Optimizer.__init__ for the empty placeholder group
            super().add_param_group(param_group)
            return
        self.real.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\nreal={self.real!r},\nbinary={self.binary!r})"
