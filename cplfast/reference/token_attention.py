"""Reference for ``prompt_token_attention`` (SPEC §3.3): pixels attend over a few prompt tokens."""

from __future__ import annotations

import torch


def prompt_token_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """``softmax(q @ k.T * scale) @ v`` with q ``(B,h,L,d)``, k/v ``(B,h,M,d)``; scale defaults to d**-0.5.

    Returns ``(B,h,L,d)``. Written out (not ``F.scaled_dot_product_attention``) so it works in float64
    and serves as an independent oracle.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    return torch.softmax(scores, dim=-1) @ v
