"""Knowledge-distillation building blocks (kernels, losses)."""

__all__: list[str] = []
