"""Backend selection for the fused ops (SPEC §2).

Three backends:

* ``auto`` (default): CUDA tensors run the Triton kernels, everything else the PyTorch reference.
* ``triton``: always the Triton kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` in the
  environment before ``triton`` is imported; it is how the kernels are tested without a GPU.
* ``reference``: always the plain PyTorch oracle in :mod:`cplfast.reference`.

The process-wide default comes from ``CPLFAST_BACKEND`` and :func:`set_backend`;
:func:`use_backend` overrides it inside a ``with`` block. Both are plain module state, which
``torch.compile`` reads and guards on: a compiled function re-traces when the backend changes.
They are process-wide, not per thread.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_name(name: object, argument: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


_default = _check_name(os.environ.get("CPLFAST_BACKEND", "auto"), "CPLFAST_BACKEND")
_overrides: list[str] = []
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"``, ``"triton"`` or ``"reference"``."""
    global _default
    _default = _check_name(name, "name")


def get_backend() -> str:
    """The backend in force here: the innermost :func:`use_backend`, else the process default."""
    return _overrides[-1] if _overrides else _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with cplfast.use_backend("reference"): ...`` runs the block on that backend."""
    _overrides.append(_check_name(name, "name"))
    try:
        yield
    finally:
        _overrides.pop()


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(op: str, *tensors: torch.Tensor | None) -> str:
    """Pick ``"triton"`` or ``"reference"`` for one call of ``op`` on these tensors.

    Raises a clear error when the ``triton`` backend is forced but cannot run here.
    """
    backend = get_backend()
    present = [t for t in tensors if t is not None]
    if backend == "reference":
        return "reference"
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    kernel_dtypes = all(t.dtype in TRITON_DTYPES for t in present if t.is_floating_point())
    if backend == "auto":
        return "triton" if on_cuda and kernel_dtypes and triton_available() else "reference"
    # backend == "triton": the user asked for the kernels; refuse loudly rather than fall back.
    if not triton_available():
        raise RuntimeError(f"{op}: backend 'triton' needs the 'triton' package (pip install triton)")
    if not kernel_dtypes:
        bad = sorted({str(t.dtype) for t in present if t.is_floating_point() and t.dtype not in TRITON_DTYPES})
        raise TypeError(
            f"{op}: the Triton kernels take float32, float16 or bfloat16 tensors, got {', '.join(bad)}; "
            "use the 'reference' backend for float64"
        )
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported "
            "(or move the tensors to a CUDA device, or use the 'reference' backend)"
        )
    return "triton"
