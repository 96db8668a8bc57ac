"""Optimizers for efficient networks."""

from lightning_effnets.optim.bop import Bop, HybridOptimizer, check_partition, split_binary_parameters

__all__: list[str] = ["Bop", "HybridOptimizer", "check_partition", "split_binary_parameters"]
