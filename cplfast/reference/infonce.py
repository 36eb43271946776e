"""Reference for ``infonce`` (SPEC §3.4): the CPR contrastive term, per location."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def infonce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float = 0.1,
    dim: int = 1,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE with one positive and K negatives at every location.

    anchor, positive ``(B,C,H,W)`` (or ``(N,D)`` with ``dim=-1``); negatives ``(K, *anchor.shape)``.
    With a, p, n_k L2-normalised along ``dim`` (eps 1e-12)::

        s_p = a.p / tau,  s_k = a.n_k / tau,  loss = logsumexp(s_p, s_1..s_K) - s_p

    ``reduction``: ``"mean"`` | ``"sum"`` | ``"none"`` (anchor's shape without ``dim``).
    """
    dim = dim % anchor.dim()
    a = F.normalize(anchor, dim=dim, eps=1e-12)
    p = F.normalize(positive, dim=dim, eps=1e-12)
    n = F.normalize(negatives, dim=dim + 1, eps=1e-12)
    s_pos = (a * p).sum(dim) / temperature
    s_neg = (a.unsqueeze(0) * n).sum(dim + 1) / temperature
    logits = torch.cat([s_pos.unsqueeze(0), s_neg], dim=0)
    return reduce(torch.logsumexp(logits, dim=0) - s_pos, reduction)
