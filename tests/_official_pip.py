"""An independent, deliberately plain re-implementation of the official PIP network (test oracle).

Written for the tests from the published architecture (``PIPNet_Restormer_onskip_inter`` of
longzilicart/pip_universal with ``prompt_interaction_mode="pip_cross_topm"``, as its ``Main_trainer.py``
builds it), read for names, shapes, initial values and the order of operations only. Attribute names are
the official ones, so ``OfficialPIP().state_dict()`` has the official checkpoint's keys (612 at the
official configuration). None of cplfast's code paths are used: LayerNorm on a ``(B, HW, C)`` view, the
top-m attention written with ``torch.topk`` masks and ``-inf`` fills, the degradation prompt built as the
official ``(B, T, D, 1, 1)`` product and averaged over T, the bilinear resizes always applied.

Facts of the official network this copy keeps:

* Restormer backbone; the latent goes through a 1x1 ``chnl_reduce3`` (8d -> 4d) before ``up4_3``; the
  decoder has no PromptIR ``noise_level`` blocks.
* ``prompt{i}`` (level i skip, i = 1..3): ``detask_prompt_param`` ``(1, T, D, 1, 1)``, ``low_prompt_param``
  ``(1, D, S, S)``, a prompt-to-prompt block ``LGM`` with 2 heads, ``outconv`` 3x3; the degradation prompt
  is the MEAN over T of ``onehot_t * P_t``.
* ``low_prompt_interaction_level{i}.prompt_transformer_cross``: top-m cross-attention with ``heads[2]``
  heads, fractions 1/2, 2/3, 3/4, 4/5 (``m = int(C * a / b)``), mixing weights ``attn1..attn4`` (init 0.2),
  ``reduce_channel`` (D -> width) when the feature is narrower than the prompt, dual-gate FFN.
* ``reduce_noise_channel_1..3`` are built and never called (they are in every checkpoint).
* ``reduce_chan_level3`` is ``Conv2d(2d + 192, 4d)`` in the official code; 192 = 4d at d = 48, written as
  4d here so the smaller test widths work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FRACTIONS = ((1, 2), (2, 3), (3, 4), (4, 5))


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


def _unit_rows(t):
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _split_heads(t, heads):
    b, c, h, w = t.shape
    return t.reshape(b, heads, c // heads, h * w)


class SelfAttention(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.num_heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(c, 3 * c, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * c, 3 * c, 3, 1, 1, groups=3 * c, bias=False)
        self.project_out = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv_dwconv(self.qkv(x))
        q, k, v = (_split_heads(qkv[:, i * c:(i + 1) * c], self.num_heads) for i in range(3))
        scores = torch.matmul(_unit_rows(q), _unit_rows(k).transpose(2, 3)) * self.temperature
        return self.project_out(torch.matmul(scores.softmax(-1), v).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """q from ``x_q``, k/v from ``x_kv``; plain softmax, or the top-m mixture when ``topm``."""

    def __init__(self, c, heads, topm):
        super().__init__()
        self.num_heads = heads
        self.topm = topm
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.kv = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.kv_dwconv = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c, bias=False)
        self.q = nn.Conv2d(c, c, 1, bias=False)
        self.q_dwconv = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.project_out = nn.Conv2d(c, c, 1, bias=False)
        if topm:
            for j in range(1, 5):
                setattr(self, f"attn{j}", nn.Parameter(torch.tensor([0.2])))

    def forward(self, x_q, x_kv):
        b, c, h, w = x_q.shape
        q = _split_heads(self.q_dwconv(self.q(x_q)), self.num_heads)
        kv = self.kv_dwconv(self.kv(x_kv))
        k, v = _split_heads(kv[:, :c], self.num_heads), _split_heads(kv[:, c:], self.num_heads)
        scores = torch.matmul(_unit_rows(q), _unit_rows(k).transpose(2, 3)) * self.temperature
        if not self.topm:
            out = torch.matmul(scores.softmax(-1), v)
        else:
            rows = scores.shape[-1]
            out = 0
            for j, (num, den) in enumerate(FRACTIONS, start=1):
                keep = torch.zeros_like(scores, dtype=torch.bool)
                keep.scatter_(-1, scores.topk(int(rows * num / den), dim=-1).indices, True)
                masked = scores.masked_fill(~keep, float("-inf"))
                out = out + torch.matmul(masked.softmax(-1), v) * getattr(self, f"attn{j}")
        return self.project_out(out.reshape(b, c, h, w))


class FeedForward(nn.Module):
    def __init__(self, c, factor, dual_gate=False):
        super().__init__()
        hidden = int(c * factor)
        self.dual_gate = dual_gate
        self.project_in = nn.Conv2d(c, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, c, 1, bias=False)

    def forward(self, x):
        t = self.dwconv(self.project_in(x))
        half = t.shape[1] // 2
        a, g = t[:, :half], t[:, half:]
        mixed = F.gelu(g) * a + F.gelu(a) * g if self.dual_gate else F.gelu(a) * g
        return self.project_out(mixed)


class Block(nn.Module):
    def __init__(self, c, heads, factor):
        super().__init__()
        self.norm1, self.attn = Norm(c), SelfAttention(c, heads)
        self.norm2, self.ffn = Norm(c), FeedForward(c, factor)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PromptToPrompt(nn.Module):
    """The official ``LGM``: the basic prompt queries the semantic prompt (2 heads, gated FFN)."""

    def __init__(self, c, factor, heads=2):
        super().__init__()
        self.norm11, self.norm12 = Norm(c), Norm(c)
        self.attn = CrossAttention(c, heads, topm=False)
        self.norm2, self.ffn = Norm(c), FeedForward(c, factor)

    def forward(self, x_q, x_kv):
        y = x_q + self.attn(self.norm11(x_q), self.norm12(x_kv))
        return y + self.ffn(self.norm2(y))


class PromptInPrompt(nn.Module):
    def __init__(self, prompt_dim, prompt_size, classes, factor):
        super().__init__()
        self.classes, self.prompt_size = classes, prompt_size
        self.detask_prompt_param = nn.Parameter(torch.randn(1, classes, prompt_dim, 1, 1))
        self.low_prompt_param = nn.Parameter(torch.randn(1, prompt_dim, prompt_size, prompt_size))
        self.LGM = PromptToPrompt(prompt_dim, factor)
        self.outconv = nn.Conv2d(prompt_dim, prompt_dim, 3, 1, 1, bias=False)

    def forward(self, x, labels):
        b, c, h, w = x.shape
        d, s = self.low_prompt_param.shape[1], self.prompt_size
        if labels.is_floating_point():
            onehot = labels.to(x.dtype)
        else:
            onehot = F.one_hot(labels, self.classes).to(x.dtype)
        prompts = onehot[:, :, None, None, None] * self.detask_prompt_param.expand(b, -1, -1, -1, -1)
        degradation = prompts.mean(dim=1)                                    # (B, D, 1, 1): mean over T
        feature = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        if c > d:
            feature = feature[:, :d]
        elif c < d:
            feature = torch.cat([feature, feature.new_zeros(b, d - c, s, s)], dim=1)
        basic = self.low_prompt_param.expand(b, -1, -1, -1)
        universal = self.LGM(basic, degradation * feature)
        return self.outconv(F.interpolate(universal, size=(h, w), mode="bilinear", align_corners=False))


class SelectiveInteraction(nn.Module):
    def __init__(self, feat_dim, prompt_dim, heads, factor):
        super().__init__()
        self.norm11, self.norm12 = Norm(feat_dim), Norm(prompt_dim)
        self.attn = CrossAttention(prompt_dim, heads, topm=True)
        if feat_dim < prompt_dim:
            self.reduce_channel = nn.Conv2d(prompt_dim, feat_dim, 1, bias=False)
        self.norm2, self.ffn = Norm(feat_dim), FeedForward(feat_dim, factor, dual_gate=True)

    def forward(self, x, prompt):
        x, prompt = self.norm11(x), self.norm12(prompt)
        fc, pc = x.shape[1], prompt.shape[1]
        if fc >= pc:
            inter, rest = x[:, :pc], x[:, pc:]
        else:
            inter, rest = torch.cat([x, x.new_zeros(x.shape[0], pc - fc, *x.shape[2:])], dim=1), None
        y = inter + self.attn(inter, prompt)
        if fc > pc:
            y = torch.cat([y, rest], dim=1)
        elif fc < pc:
            y = self.reduce_channel(y)
        return y + self.ffn(self.norm2(y))


class _Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.prompt_transformer_cross = inner

    def forward(self, x, prompt):
        return self.prompt_transformer_cross(x, prompt)


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


class OfficialPIP(nn.Module):
    """``PIPNet_Restormer_onskip_inter`` as trained (pip_cross_topm); widths configurable for tests.

    ``forward(img, labels)``: labels ``(B,)`` class indices or ``(B, T)`` weights (the official code needs
    them at test time too).
    """

    def __init__(self, dim=48, num_blocks=(4, 6, 6, 8), refinement=4, heads=(1, 2, 4, 8), factor=2.66,
                 prompt_dims=(64, 128, 256), prompt_sizes=(64, 32, 16), classes=5):
        super().__init__()
        w1, w2, w3, w4 = dim, 2 * dim, 4 * dim, 8 * dim

        def stage(n, c, h):
            return nn.Sequential(*[Block(c, h, factor) for _ in range(n)])

        for i in range(3):
            setattr(self, f"prompt{i + 1}", PromptInPrompt(prompt_dims[i], prompt_sizes[i], classes, factor))
        self.patch_embed = _Embed(3, w1)
        self.chnl_reduce3 = nn.Conv2d(w4, w3, 1, bias=False)
        self.reduce_noise_channel_1 = nn.Conv2d(w1 + 64, w1, 1, bias=False)     # never called
        self.encoder_level1 = stage(num_blocks[0], w1, heads[0])
        self.down1_2 = _Resize(w1, True)
        self.reduce_noise_channel_2 = nn.Conv2d(w2 + 128, w2, 1, bias=False)    # never called
        self.encoder_level2 = stage(num_blocks[1], w2, heads[1])
        self.down2_3 = _Resize(w2, True)
        self.reduce_noise_channel_3 = nn.Conv2d(w3 + 256, w3, 1, bias=False)    # never called
        self.encoder_level3 = stage(num_blocks[2], w3, heads[2])
        self.down3_4 = _Resize(w3, True)
        self.latent = stage(num_blocks[3], w4, heads[3])
        self.up4_3 = _Resize(w3, False)
        self.reduce_chan_level3 = nn.Conv2d(w2 + w3, w3, 1, bias=False)
        self.low_prompt_interaction_level3 = _Wrap(SelectiveInteraction(w3, prompt_dims[2], heads[2], factor))
        self.decoder_level3 = stage(num_blocks[2], w3, heads[2])
        self.up3_2 = _Resize(w3, False)
        self.reduce_chan_level2 = nn.Conv2d(w3, w2, 1, bias=False)
        self.low_prompt_interaction_level2 = _Wrap(SelectiveInteraction(w2, prompt_dims[1], heads[2], factor))
        self.decoder_level2 = stage(num_blocks[1], w2, heads[1])
        self.up2_1 = _Resize(w2, False)
        self.low_prompt_interaction_level1 = _Wrap(SelectiveInteraction(w1, prompt_dims[0], heads[2], factor))
        self.decoder_level1 = stage(num_blocks[0], w2, heads[0])
        self.refinement = stage(refinement, w2, heads[0])
        self.output = nn.Conv2d(w2, 3, 3, 1, 1, bias=False)

    def forward(self, img, labels):
        e1 = self.encoder_level1(self.patch_embed(img))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        z = self.latent(self.down3_4(e3))
        e3 = self.low_prompt_interaction_level3(e3, self.prompt3(e3, labels))
        z = self.chnl_reduce3(z)
        d3 = self.decoder_level3(self.reduce_chan_level3(torch.cat((self.up4_3(z), e3), 1)))
        e2 = self.low_prompt_interaction_level2(e2, self.prompt2(e2, labels))
        d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat((self.up3_2(d3), e2), 1)))
        e1 = self.low_prompt_interaction_level1(e1, self.prompt1(e1, labels))
        d1 = self.decoder_level1(torch.cat((self.up2_1(d2), e1), 1))
        return self.output(self.refinement(d1)) + img


# Widths of cplfast's "tiny" / "small" presets (prompt widths = level widths there).
TINY_ARGS = dict(dim=16, num_blocks=(1, 1, 1, 1), refinement=1, heads=(1, 1, 2, 2), prompt_dims=(16, 32, 64),
                 prompt_sizes=(16, 8, 4))
SMALL_ARGS = dict(dim=32, num_blocks=(2, 3, 3, 4), refinement=2, heads=(1, 2, 4, 8), prompt_dims=(32, 64, 128),
                  prompt_sizes=(32, 16, 8))
