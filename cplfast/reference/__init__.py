"""The oracle: plain, float64-capable PyTorch for every op of SPEC §3. No Triton here.

These functions take already-validated arguments; use :mod:`cplfast.functional` for the public API.
"""

from .channel_attention import topm_channel_attention
from .infonce import infonce
from .prototype import prototype_assignment
from .sparse_prompt import sparse_prompt
from .supcon import supcon
from .token_attention import prompt_token_attention

__all__ = [
    "infonce",
    "prompt_token_attention",
    "prototype_assignment",
    "sparse_prompt",
    "supcon",
    "topm_channel_attention",
]
