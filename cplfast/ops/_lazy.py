"""Deferred import of a kernel module: Triton is imported on the first real kernel call, not when
``cplfast`` is imported (so ``TRITON_INTERPRET`` can still be set, and CPU-only use never pays for it)."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module ``name``; the first attribute access imports it."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
