"""Efficient layers with functional cores; no Lightning import here."""

__all__: list[str] = []
