"""Progressive distillation weight: how strongly the student follows a teacher that is still learning.

In PKKD (arXiv:2009.13044) the CNN teacher starts from scratch together with the adder student, so early in
training its outputs carry little information. The distillation terms are therefore multiplied by a factor that
ramps from ``start`` to 1 over the first ``ramp`` fraction of training (``"linear"`` or ``"cosine"``), or stays 1
(``"constant"``). The factor is a pure function of the global step, so a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["ScheduleName", "progressive_weight"]

ScheduleName = Literal["constant", "linear", "cosine"]


def progressive_weight(step: int, total_steps: int, schedule: ScheduleName = "linear", ramp: float = 0.25,
                       start: float = 0.0) -> float:
    """The distillation factor at optimizer step ``step`` of ``total_steps``.

    ``ramp``: fraction of training over which the factor rises from ``start`` to 1 (0 means constant 1).
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must be a fraction of training in [0, 1], got {ramp}")
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start must be in [0, 1], got {start}")
    ramp_steps = ramp * max(total_steps, 1)
    if schedule == "constant" or ramp_steps <= 0:
        return 1.0
    progress = min(max(step, 0) / ramp_steps, 1.0)
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (1.0 - start) * progress
