"""The prompt layers and losses of SPEC §4 (thin ``nn.Module`` wrappers over :mod:`cplfast.functional`)."""

from .dppd import DegradationPrototypeAssignment, PromptCrossFusion, PromptDistribution
from .pip import PromptInPrompt, SelectivePromptFeatureInteraction
from .prompt_gen import PromptGenBlock, SparsePromptModule

__all__ = [
    "DegradationPrototypeAssignment",
    "PromptCrossFusion",
    "PromptDistribution",
    "PromptGenBlock",
    "PromptInPrompt",
    "SelectivePromptFeatureInteraction",
    "SparsePromptModule",
]
