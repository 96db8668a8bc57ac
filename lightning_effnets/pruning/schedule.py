"""When pruning steps happen: one-shot at an epoch, or ``steps`` equal steps spread over [start, end] epochs.

Iterative pruning with fine-tuning between steps recovers accuracy better than one large step (Molchanov et al.,
arXiv:1611.06440; Zhu & Gupta, arXiv:1710.01878). Step ``k`` (1-based) reaches ``k/steps`` of the final target.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PruningSchedule"]


@dataclass(frozen=True)
class PruningSchedule:
    """Pruning steps at the start of epochs ``start_epoch .. end_epoch`` (inclusive), evenly spaced."""

    start_epoch: int = 0
    end_epoch: int | None = None
    steps: int = 1

    def __post_init__(self) -> None:
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {self.start_epoch}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        end = self.start_epoch if self.end_epoch is None else self.end_epoch
        if end < self.start_epoch:
            raise ValueError(f"end_epoch ({end}) must be >= start_epoch ({self.start_epoch})")
        if self.steps > 1 and end - self.start_epoch + 1 < self.steps:
            raise ValueError(f"{self.steps} pruning steps need at least {self.steps} epochs in "
                             "[start_epoch, end_epoch] "
                             f"= [{self.start_epoch}, {end}]; set end_epoch >= {self.start_epoch + self.steps - 1}")

    @property
    def last_epoch(self) -> int:
        return self.epochs()[-1]

    def epochs(self) -> list[int]:
        """Epoch of each step."""
        if self.steps == 1:
            return [self.start_epoch]
        end = self.start_epoch if self.end_epoch is None else self.end_epoch
        span = end - self.start_epoch
        return [self.start_epoch + round(k * span / (self.steps - 1)) for k in range(self.steps)]

    def steps_due(self, epoch: int) -> int:
        """How many steps should have happened by the start of ``epoch``."""
        return sum(1 for e in self.epochs() if e <= epoch)

    def fraction(self, step: int) -> float:
        """Share of the final target reached after 1-based step ``step``."""
        return min(step, self.steps) / self.steps
