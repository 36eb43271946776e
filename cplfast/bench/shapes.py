"""The PromptIR shapes every benchmark is measured at (SPEC §8), written out once.

Facts of the official PromptIR (``net/model.py``, ``decoder=True``), which ``preset="base"`` reproduces:
feature width ``dim * (1, 2, 4, 8) = 48 / 96 / 192 / 384`` at ``H, H/2, H/4, H/8``, attention heads
``(1, 2, 4, 8)`` per level (so ``c = 48`` channels per head everywhere; 96 in the refinement blocks,
which run at full resolution with ``2*dim`` channels and one head), and three prompt slots:

=========  ==========  ========  ===========  ===========  ================
slot       resolution  lin_dim   prompt_dim   prompt_len   prompt_size
=========  ==========  ========  ===========  ===========  ================
prompt1    H/2         96        64           5            64
prompt2    H/4         192       128          5            32
prompt3    H/8         384       320          5            16
=========  ==========  ========  ===========  ===========  ================

This project's PIP variant (the official pip_universal network) runs ``topm_channel_attention`` on the
encoder skips of levels 1-3 at the prompt widths (64, 128, 256) with ``heads[2] = 4`` heads
(``c = 16 / 32 / 64``); its DPPD variant runs
``prompt_token_attention`` at the three slots (widths 96 / 192 / 384, ``heads[2] = 4`` heads, so
``d = 24 / 48 / 96``) over ``prompt_tokens = 4`` tokens. Training patches are 128x128 with batch 8;
inference is one 512x512 image.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_BATCH = 8
TRAIN_SIZE = 128
INFER_BATCH = 1
INFER_SIZE = 512


@dataclass(frozen=True)
class PromptSlot:
    """One PromptGenBlock / SparsePromptModule of PromptIR."""

    name: str
    downscale: int  # feature resolution is H / downscale
    lin_dim: int  # feature channels C (router input)
    prompt_dim: int  # D
    prompt_len: int  # N
    prompt_size: int  # S


PROMPT_SLOTS = (
    PromptSlot("prompt1", 2, 96, 64, 5, 64),
    PromptSlot("prompt2", 4, 192, 128, 5, 32),
    PromptSlot("prompt3", 8, 384, 320, 5, 16),
)

# Restormer/PromptIR levels: (name, downscale, width, heads).
LEVELS = (
    ("level1", 1, 48, 1),
    ("level2", 2, 96, 2),
    ("level3", 4, 192, 4),
    ("latent", 8, 384, 8),
)
REFINEMENT = ("refinement", 1, 96, 1)

# PIP's selective prompt-feature interaction (the official pip_universal network): (name, downscale,
# prompt width, heads) on skips 1-3; widths (64, 128, 256), heads[2] = 4 heads, so c = 16 / 32 / 64.
PIP_INTERACTIONS = (
    ("pip1", 1, 64, 4),
    ("pip2", 2, 128, 4),
    ("pip3", 4, 256, 4),
)

# DPPD's CrossFusion at the three slots: (name, downscale, width, heads); M prompt tokens.
DPPD_FUSIONS = (
    ("fusion1", 2, 96, 4),
    ("fusion2", 4, 192, 4),
    ("fusion3", 8, 384, 4),
)
DPPD_TOKENS = 4

# Contrastive losses (SPEC §8): CPR's InfoNCE and the prompt-level SupCon.
INFONCE_NEGATIVES = 4
INFONCE_CHANNELS = 64
SUPCON_DIM = 256
SUPCON_N = 16384
SUPCON_N_LARGE = 131072
SUPCON_CLASSES = 5  # degradation types of the 5-task setting

__all__ = [
    "DPPD_FUSIONS", "DPPD_TOKENS", "INFER_BATCH", "INFER_SIZE", "INFONCE_CHANNELS", "INFONCE_NEGATIVES",
    "LEVELS", "PIP_INTERACTIONS", "PROMPT_SLOTS", "PromptSlot", "REFINEMENT", "SUPCON_CLASSES", "SUPCON_DIM",
    "SUPCON_N", "SUPCON_N_LARGE", "TRAIN_BATCH", "TRAIN_SIZE",
]
