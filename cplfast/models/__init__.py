"""Restoration networks (SPEC §5): the PromptIR backbone with pluggable PromptIR / CPL / PIP / DPPD prompts.

``PromptIR(prompt=..., preset=...)``; ``PromptIR.from_official(path_or_state_dict)`` loads an official
checkpoint; ``model.restore(image, tile=...)`` restores any size; :func:`summary` counts params and MACs.
"""

from .checkpoint import official_state_dict, read_state_dict_file, unwrap_state_dict
from .inference import restore
from .presets import PRESETS, PromptIRConfig, make_config
from .promptir import PROMPT_VARIANTS, PromptIR
from .restormer import MDTA, GatedDconvFFN, LayerNorm2d, TransformerBlock
from .summary import ModelSummary, summary

__all__ = [
    "GatedDconvFFN",
    "LayerNorm2d",
    "MDTA",
    "ModelSummary",
    "PRESETS",
    "PROMPT_VARIANTS",
    "PromptIR",
    "PromptIRConfig",
    "TransformerBlock",
    "make_config",
    "official_state_dict",
    "read_state_dict_file",
    "restore",
    "summary",
    "unwrap_state_dict",
]
