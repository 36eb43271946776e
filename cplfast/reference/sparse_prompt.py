"""Reference for ``sparse_prompt`` (SPEC §3.1): routed mix of learned prompt maps, resized."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of each row of ``w`` (ties: lower index first)."""
    order = torch.sort(w, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, order, True)


def routing_weights(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    temperature: float,
    renorm: bool,
) -> torch.Tensor:
    """``w = topk(softmax((mean_hw(x) @ weight.T + bias) / temperature))`` of shape ``(B, N)``."""
    emb = x.mean(dim=(2, 3))
    logits = F.linear(emb, weight, bias)
    w = torch.softmax(logits / temperature, dim=1)
    if k < w.shape[1]:
        w = w * topk_mask(w, k)
        if renorm:
            w = w / w.sum(dim=1, keepdim=True)
    return w


def sparse_prompt(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prompts: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    renorm: bool = False,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed prompt map.

    x ``(B,C,H,W)``, weight ``(N,C)``, bias ``(N,)`` or None, prompts ``(N,D,S,S)``::

        w   = softmax((mean_hw(x) @ weight.T + bias) / temperature)      (B,N)
        w   = w * top-k mask (ties: lower index), optionally / kept sum
        P   = sum_n w[:, n] * prompts[n]                                  (B,D,S,S)
        out = bilinear resize of P to ``size`` (default (H,W)), align_corners=False

    Returns ``(out (B,D,*size), w (B,N))``. The mix is one contraction over N: PromptIR's
    ``(B,N,D,S,S)`` repeat is never built.
    """
    w = routing_weights(x, weight, bias, k, temperature, renorm)
    mixed = torch.einsum("bn,nds->bds", w, prompts.flatten(2)).view(w.shape[0], *prompts.shape[1:])
    target = tuple(size) if size is not None else tuple(x.shape[-2:])
    # Under torch.export the sizes are symbolic: resize unconditionally (a same-size bilinear resize
    # is the identity) so the exported graph does not guard on H, W != S.
    if torch.compiler.is_exporting() or target != tuple(mixed.shape[-2:]):
        mixed = F.interpolate(mixed, size=target, mode="bilinear", align_corners=False)
    return mixed, w
