"""Restormer-style building blocks used by the prompt layers.

Submodule and parameter names follow the official Restormer / PromptIR / PIP code (``body.weight``,
``project_in``, ``dwconv``, ``project_out``) so that their checkpoints map onto these modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel of ``(B, C, H, W)`` (Restormer's ``WithBias`` form).

    ``y[b,:,i,j] = (x[b,:,i,j] - mean) / sqrt(var + 1e-5) * weight + bias`` (biased variance).
    ``bias=False`` is Restormer's ``BiasFree`` form, which does not subtract the mean.
    """

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.with_bias = bias
        self.body = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.permute(0, 2, 3, 1)
        if self.with_bias:
            out = self.body(channels_last)
        else:
            var = channels_last.var(-1, keepdim=True, unbiased=False)
            out = channels_last * torch.rsqrt(var + 1e-5) * self.body.weight
        return out.permute(0, 3, 1, 2)


class GatedDconvFFN(nn.Module):
    """Restormer's gated-Dconv feed-forward network: ``project_out(gelu(a) * b)``, ``(a, b) = dwconv(project_in(x))``."""

    def __init__(self, dim: int, ffn_expansion_factor: float = 2.66, bias: bool = False):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class DualGateFFN(GatedDconvFFN):
    """Dual-gate feed-forward network (LLFormer, used by PIP): ``project_out(gelu(b) * a + gelu(a) * b)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(b) * a + F.gelu(a) * b)


__all__ = ["DualGateFFN", "GatedDconvFFN", "LayerNorm2d"]
