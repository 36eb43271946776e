"""cplfast: fast drop-in layers and losses for prompt-based all-in-one image restoration.

Functional ops live in :mod:`cplfast.functional`; the PyTorch oracle in :mod:`cplfast.reference`;
the Triton kernels in :mod:`cplfast.kernels`. Backends: :func:`set_backend` / :func:`use_backend` /
``CPLFAST_BACKEND`` (``auto``, ``triton``, ``reference``).
"""

from . import functional, reference
from ._backend import get_backend, set_backend, use_backend
from .layers import PromptGenBlock, SparsePromptModule

__version__ = "0.1.0"

__all__ = [
    "PromptGenBlock",
    "SparsePromptModule",
    "functional",
    "get_backend",
    "reference",
    "set_backend",
    "use_backend",
]
