"""The public Lightning face of every method: one callback (or a small family) per file."""

from lightning_effnets.callbacks.cost import CostReport

__all__ = ["CostReport"]
