"""Reference for ``prototype_assignment`` (SPEC §3.6): DPPD's soft degradation assignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototype_assignment(e: torch.Tensor, prototypes: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """``a = softmax(cos(e, prototypes) / temperature)``; e ``(B,E)``, prototypes ``(T,E)`` -> ``(B,T)``."""
    cos = F.normalize(e, dim=1, eps=1e-12) @ F.normalize(prototypes, dim=1, eps=1e-12).T
    return torch.softmax(cos / temperature, dim=1)
