"""Restormer building blocks as PromptIR uses them (parameter names match the official code).

* :class:`LayerNorm2d` — LayerNorm over the channels of an NCHW map (``WithBias`` or ``BiasFree``).
* :class:`GatedDconvFFN` — ``project_out(gelu(a) * b)``, ``(a, b) = dwconv3x3(project_in(x))`` split in two.
* :class:`MDTA` — multi-Dconv-head transposed attention: channel attention whose ``(c x c)`` score
  matrix is built from L2-normalised rows over all pixels, routed through
  :func:`cplfast.functional.topm_channel_attention` (``fractions=None``) so CUDA runs the fused kernel.
* :class:`TransformerBlock` — ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``.
* :class:`OverlapPatchEmbed`, :class:`Downsample` (conv C->C/2, pixel-unshuffle: -> 2C at H/2),
  :class:`Upsample` (conv C->2C, pixel-shuffle: -> C/2 at 2H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional

LAYERNORM_TYPES = ("WithBias", "BiasFree")


class _WithBiasNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x_last: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_last, x_last.shape[-1:], self.weight, self.bias, eps=1e-5)


class _BiasFreeNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_last: torch.Tensor) -> torch.Tensor:
        variance = x_last.var(dim=-1, keepdim=True, unbiased=False)
        return x_last * torch.rsqrt(variance + 1e-5) * self.weight


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels of ``(B,C,H,W)`` (eps 1e-5, biased variance).

    ``WithBias``: ``(x - mean) / sqrt(var + eps) * w + b``; ``BiasFree``: ``x / sqrt(var + eps) * w``.
    Parameters live in ``body`` (``body.weight``, ``body.bias``) as in the official checkpoints.
    """

    def __init__(self, dim: int, layernorm_type: str = "WithBias"):
        super().__init__()
        if layernorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
        self.body = _WithBiasNorm(dim) if layernorm_type == "WithBias" else _BiasFreeNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedDconvFFN(nn.Module):
    """Gated-Dconv feed-forward network; hidden width ``int(dim * expansion)``."""

    def __init__(self, dim: int, expansion: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, kernel_size=3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention (Restormer).

    ``q, k, v = split(dwconv3x3(conv1x1(x)))``, each viewed as ``(B, h, C/h, H*W)``;
    ``out = project_out(softmax(norm(q) @ norm(k).T * temperature[h]) @ v)`` with rows normalised over
    the H*W pixels. ``temperature`` has the official shape ``(h, 1, 1)``.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, kernel_size=3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        out = functional.topm_channel_attention(q, k, v, self.temperature.view(heads), fractions=None)
        return self.project_out(out.reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    """Restormer block: ``x += attn(norm1(x)); x += ffn(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, layernorm_type)
        self.attn = MDTA(dim, num_heads, bias)
        self.norm2 = LayerNorm2d(dim, layernorm_type)
        self.ffn = GatedDconvFFN(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stage(count: int, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                      layernorm_type: str) -> nn.Sequential:
    return nn.Sequential(
        *(TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, layernorm_type) for _ in range(count))
    )


class OverlapPatchEmbed(nn.Module):
    """3x3 convolution from the image to the first feature width (``proj``)."""

    def __init__(self, in_channels: int, dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """``(B,C,H,W) -> (B,2C,H/2,W/2)``: conv3x3 to C/2 channels, then pixel-unshuffle by 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """``(B,C,H,W) -> (B,C/2,2H,2W)``: conv3x3 to 2C channels, then pixel-shuffle by 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


__all__ = [
    "GatedDconvFFN",
    "LayerNorm2d",
    "MDTA",
    "OverlapPatchEmbed",
    "TransformerBlock",
    "Downsample",
    "Upsample",
    "transformer_stage",
]
