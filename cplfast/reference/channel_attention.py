"""Reference for ``topm_channel_attention`` (SPEC §3.2): MDTA / PIP's top-m channel attention."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def topm_counts(c: int, fractions: Sequence[float]) -> list[int]:
    """Entries kept per row for each fraction: ``int(c * f)``."""
    return [int(c * f) for f in fractions]


def channel_scores(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``A = (q^ @ k^.T) * temperature[h]`` with q^, k^ L2-normalised over L; ``(B,h,c,c)``."""
    qn = F.normalize(q, dim=-1, eps=1e-12)
    kn = F.normalize(k, dim=-1, eps=1e-12)
    return (qn @ kn.transpose(-2, -1)) * temperature.view(1, -1, 1, 1).to(q.dtype)


def topm_channel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    *,
    fractions: Sequence[float] | None = (1 / 2, 2 / 3, 3 / 4, 4 / 5),
    mix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Channel ("transposed") attention over L = H*W.

    q, k, v ``(B,h,c,L)``; temperature ``(h,)``; mix ``(J,)`` for J fractions (default 1/J each)::

        A   = (q^ @ k^.T) * temperature[h]                                 (B,h,c,c)
        out = softmax(A) @ v                                  if fractions is None (MDTA)
        out = sum_j mix[j] * softmax(A masked to its top-int(c*f_j) per row) @ v   otherwise

    Top-m ties keep the lower index. Returns ``(B,h,c,L)``.
    """
    A = channel_scores(q, k, temperature)
    if fractions is None:
        return torch.softmax(A, dim=-1) @ v
    counts = topm_counts(q.shape[-2], fractions)
    if mix is None:
        mix = torch.full((len(counts),), 1.0 / len(counts), dtype=q.dtype, device=q.device)
    # rank[..., i, j] = position of A[i, j] in its row, sorted descending (stable: lower index first).
    order = torch.sort(A.detach(), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(A.shape[-1], device=A.device).expand_as(order))
    probs = A.new_zeros(A.shape)
    for j, m in enumerate(counts):
        masked = A.masked_fill(rank >= m, float("-inf"))
        probs = probs + mix[j].to(A.dtype) * torch.softmax(masked, dim=-1)
    return probs @ v
