"""Knowledge distillation."""

__all__: list[str] = []
