"""Reference for ``supcon`` (SPEC §3.5): supervised contrastive loss ("L_out")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_rows(z: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                self_index: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query loss and positive count, queries ``z`` against ``keys`` (both already normalised).

    ``self_index[i]`` is the column of query i among the keys (excluded from both sums).
    """
    S = (z @ keys.T) / temperature
    self_mask = torch.zeros_like(S, dtype=torch.bool)
    self_mask[torch.arange(z.shape[0], device=z.device), self_index] = True
    lse = torch.logsumexp(S.masked_fill(self_mask, float("-inf")), dim=1)
    pos = (labels[:, None] == key_labels[None, :]) & ~self_mask
    n_pos = pos.sum(dim=1)
    mean_pos = (S * pos).sum(dim=1) / n_pos.clamp(min=1)
    return (lse - mean_pos) * (n_pos > 0), n_pos


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    reduction: str = "mean",
    gather: bool = False,
) -> torch.Tensor:
    """Supervised contrastive loss over a batch of embeddings.

    z ``(N,D)`` (L2-normalised here), labels ``(N,)``; ``S = z z^T / tau``, diagonal excluded::

        loss_i = -(1/|P(i)|) sum_{j in P(i)} (S_ij - logsumexp_{j' != i} S_ij'),  P(i) = {j != i: y_j = y_i}

    Rows without a positive count 0 and are left out of the mean; with none at all the loss is 0 (with
    a graph). ``reduction="none"`` gives ``(N,)``. ``gather=True`` under ``torch.distributed`` uses every
    rank's z as keys, gradients flowing back to their owners.
    """
    zn = F.normalize(z, dim=1, eps=1e-12)
    keys, key_labels, offset = zn, labels, 0
    if gather:
        from ..distributed import gather_keys

        keys, key_labels, offset = gather_keys(zn, labels)
    self_index = torch.arange(z.shape[0], device=z.device) + offset
    loss, n_pos = supcon_rows(zn, labels, keys, key_labels, self_index, temperature)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    valid = (n_pos > 0).sum()
    return loss.sum() / valid.clamp(min=1)
