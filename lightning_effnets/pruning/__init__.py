"""Structural channel pruning: importance criteria, dependency-aware surgery, schedules."""

__all__: list[str] = []
