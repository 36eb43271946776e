"""The prompt layers and losses of SPEC §4 (thin ``nn.Module`` wrappers over :mod:`cplfast.functional`)."""

from .prompt_gen import PromptGenBlock, SparsePromptModule

__all__ = ["PromptGenBlock", "SparsePromptModule"]
