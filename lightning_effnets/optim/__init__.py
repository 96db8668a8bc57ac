"""Optimizers for efficient networks."""

__all__: list[str] = []
