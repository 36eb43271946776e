"""An independent, deliberately plain re-implementation of the official PromptIR network (test oracle).

Written for the tests from the published architecture (``net/model.py`` of va1shn9v/PromptIR, read for
names, shapes and the order of operations): same attribute names, so state_dicts are interchangeable
with ``cplfast.models.PromptIR(prompt="promptir")``, but none of cplfast's code paths — LayerNorm on a
``(B, HW, C)`` view, attention and the prompt mix written out with explicit broadcasting (the prompt mix
materialises the ``(B, N, D, S, S)`` tensor the official code builds), and the bilinear resize always
applied. It also stands in for "a model built from the official code" in the ``cplfast.patch`` tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _channels_last_3d(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def _back_to_4d(t, h, w):
    b, _, c = t.shape
    return t.transpose(1, 2).reshape(b, c, h, w)


class _Affine(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))


class Norm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = _Affine(c)

    def forward(self, x):
        h, w = x.shape[-2:]
        t = _channels_last_3d(x)
        centred = t - t.mean(-1, keepdim=True)
        var = (centred * centred).mean(-1, keepdim=True)
        t = centred / torch.sqrt(var + 1e-5) * self.body.weight + self.body.bias
        return _back_to_4d(t, h, w)


class Attention(nn.Module):
    def __init__(self, c, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(c, 3 * c, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * c, 3 * c, 3, 1, 1, groups=3 * c, bias=False)
        self.project_out = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv_dwconv(self.qkv(x))
        heads = self.num_heads
        q = qkv[:, :c].reshape(b, heads, c // heads, h * w)
        k = qkv[:, c:2 * c].reshape(b, heads, c // heads, h * w)
        v = qkv[:, 2 * c:].reshape(b, heads, c // heads, h * w)
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.temperature
        out = torch.matmul(scores.softmax(-1), v)
        return self.project_out(out.reshape(b, c, h, w))


class FeedForward(nn.Module):
    def __init__(self, c, factor):
        super().__init__()
        hidden = int(c * factor)
        self.project_in = nn.Conv2d(c, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, c, 1, bias=False)

    def forward(self, x):
        t = self.dwconv(self.project_in(x))
        half = t.shape[1] // 2
        return self.project_out(F.gelu(t[:, :half]) * t[:, half:])


class Block(nn.Module):
    def __init__(self, c, heads, factor):
        super().__init__()
        self.norm1, self.attn = Norm(c), Attention(c, heads)
        self.norm2, self.ffn = Norm(c), FeedForward(c, factor)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PromptBlock(nn.Module):
    def __init__(self, prompt_dim, prompt_len, prompt_size, lin_dim):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, 3, 1, 1, bias=False)

    def forward(self, x):
        b, _, h, w = x.shape
        weights = F.softmax(self.linear_layer(x.mean(dim=(2, 3))), dim=1)          # (B, N)
        pool = self.prompt_param.expand(b, -1, -1, -1, -1)                         # (B, N, D, S, S)
        mixed = (weights[:, :, None, None, None] * pool).sum(dim=1)
        return self.conv3x3(F.interpolate(mixed, size=(h, w), mode="bilinear", align_corners=False))


def _sampler(cin, cout, shuffle):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), shuffle)


class _Resize(nn.Module):
    def __init__(self, cin, down):
        super().__init__()
        self.body = _sampler(cin, cin // 2, nn.PixelUnshuffle(2)) if down else _sampler(cin, cin * 2, nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class _Embed(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.proj = nn.Conv2d(cin, c, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.proj(x)


class OfficialPromptIR(nn.Module):
    """The official ``PromptIR(decoder=True)`` (bias off, WithBias LayerNorm); widths configurable for tests."""

    def __init__(self, dim=48, num_blocks=(4, 6, 6, 8), refinement=4, heads=(1, 2, 4, 8), factor=2.66,
                 prompt_dims=(64, 128, 320), prompt_sizes=(64, 32, 16), prompt_len=5, unused_layers=True):
        super().__init__()
        w1, w2, w3, w4 = dim, 2 * dim, 4 * dim, 8 * dim
        p1, p2, p3 = prompt_dims

        def stage(n, c, h):
            return nn.Sequential(*[Block(c, h, factor) for _ in range(n)])

        self.patch_embed = _Embed(3, w1)
        self.prompt1 = PromptBlock(p1, prompt_len, prompt_sizes[0], w2)
        self.prompt2 = PromptBlock(p2, prompt_len, prompt_sizes[1], w3)
        self.prompt3 = PromptBlock(p3, prompt_len, prompt_sizes[2], w4)
        if unused_layers:  # present in the official model, never called
            self.chnl_reduce1 = nn.Conv2d(64, 64, 1, bias=False)
            self.chnl_reduce2 = nn.Conv2d(128, 128, 1, bias=False)
            self.chnl_reduce3 = nn.Conv2d(320, 256, 1, bias=False)
            self.reduce_noise_channel_1 = nn.Conv2d(w1 + 64, w1, 1, bias=False)
            self.reduce_noise_channel_2 = nn.Conv2d(w2 + 128, w2, 1, bias=False)
            self.reduce_noise_channel_3 = nn.Conv2d(w3 + 256, w3, 1, bias=False)
        self.encoder_level1 = stage(num_blocks[0], w1, heads[0])
        self.down1_2 = _Resize(w1, True)
        self.encoder_level2 = stage(num_blocks[1], w2, heads[1])
        self.down2_3 = _Resize(w2, True)
        self.encoder_level3 = stage(num_blocks[2], w3, heads[2])
        self.down3_4 = _Resize(w3, True)
        self.latent = stage(num_blocks[3], w4, heads[3])
        self.up4_3 = _Resize(w3, False)
        self.reduce_chan_level3 = nn.Conv2d(w2 + w3, w3, 1, bias=False)
        self.noise_level3 = Block(w4 + p3, heads[2], factor)
        self.reduce_noise_level3 = nn.Conv2d(w4 + p3, w3, 1, bias=False)
        self.decoder_level3 = stage(num_blocks[2], w3, heads[2])
        self.up3_2 = _Resize(w3, False)
        self.reduce_chan_level2 = nn.Conv2d(w3, w2, 1, bias=False)
        self.noise_level2 = Block(w3 + p2, heads[2], factor)
        self.reduce_noise_level2 = nn.Conv2d(w3 + p2, w3, 1, bias=False)
        self.decoder_level2 = stage(num_blocks[1], w2, heads[1])
        self.up2_1 = _Resize(w2, False)
        self.noise_level1 = Block(w2 + p1, heads[2], factor)
        self.reduce_noise_level1 = nn.Conv2d(w2 + p1, w2, 1, bias=False)
        self.decoder_level1 = stage(num_blocks[0], w2, heads[0])
        self.refinement = stage(refinement, w2, heads[0])
        self.output = nn.Conv2d(w2, 3, 3, 1, 1, bias=False)

    def forward(self, img):
        e1 = self.encoder_level1(self.patch_embed(img))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        z = self.latent(self.down3_4(e3))
        z = self.reduce_noise_level3(self.noise_level3(torch.cat((z, self.prompt3(z)), 1)))
        d3 = self.decoder_level3(self.reduce_chan_level3(torch.cat((self.up4_3(z), e3), 1)))
        d3 = self.reduce_noise_level2(self.noise_level2(torch.cat((d3, self.prompt2(d3)), 1)))
        d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat((self.up3_2(d3), e2), 1)))
        d2 = self.reduce_noise_level1(self.noise_level1(torch.cat((d2, self.prompt1(d2)), 1)))
        d1 = self.decoder_level1(torch.cat((self.up2_1(d2), e1), 1))
        return self.output(self.refinement(d1)) + img


TINY_ARGS = dict(dim=16, num_blocks=(1, 1, 1, 1), refinement=1, heads=(1, 1, 2, 2), prompt_dims=(16, 32, 64),
                 prompt_sizes=(16, 8, 4), unused_layers=False)
