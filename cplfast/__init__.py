"""cplfast: fast drop-in layers and losses for prompt-based all-in-one image restoration.

Functional ops live in :mod:`cplfast.functional`; the PyTorch oracle in :mod:`cplfast.reference`;
the Triton kernels in :mod:`cplfast.kernels`. Backends: :func:`set_backend` / :func:`use_backend` /
``CPLFAST_BACKEND`` (``auto``, ``triton``, ``reference``).
"""

from . import functional, reference
from ._backend import get_backend, set_backend, use_backend
from .layers import (
    DegradationPrototypeAssignment,
    PromptCrossFusion,
    PromptDistribution,
    PromptGenBlock,
    PromptInPrompt,
    SelectivePromptFeatureInteraction,
    SparsePromptModule,
)
from .losses import ContrastivePromptLoss, SupConLoss

from .patch import patch

__version__ = "0.1.0"

__all__ = [
    "ContrastivePromptLoss",
    "DegradationPrototypeAssignment",
    "PromptCrossFusion",
    "PromptDistribution",
    "PromptGenBlock",
    "PromptInPrompt",
    "SelectivePromptFeatureInteraction",
    "SparsePromptModule",
    "SupConLoss",
    "functional",
    "get_backend",
    "patch",
    "reference",
    "set_backend",
    "use_backend",
]
