"""Parameters that official code initialises to constants, moved to random values so parity tests see them."""

from __future__ import annotations

import torch


def perturb_(module: torch.nn.Module) -> torch.nn.Module:
    """LayerNorm weight 1 / bias 0, attention temperatures 1 and PIP's mix weights 0.2 → random values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("body.weight", "temperature")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("body.bias"):
                p.normal_(0.0, 0.1)
            elif ".attn.attn" in name:
                p.uniform_(0.05, 0.5)
    return module
