"""PEP 562 lazy re-exports for the packages' `__init__` files: a public name's module is imported
on first use, so importing a package stays cheap (no torch, megatron or DALI until needed)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The module-level `__getattr__` of `package`: `exports` maps each name to its module."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
