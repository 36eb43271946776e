"""Exact streaming inference: the whole-image forward of a :class:`~cplfast.models.PromptIR` in row bands.

Why it is exact. Every global quantity of these networks is a sum over pixels or a resize of a small
map:

* channel ("transposed") attention (Restormer's MDTA, PIP's top-m attention) needs, per head, the
  ``c x c`` Gram matrix ``G = q kᵀ`` and the squared norms ``|q_i|², |k_j|²`` summed over all
  ``L = H*W`` pixels; then ``A = G / (max(|q_i|, eps) max(|k_j|, eps)) * temperature`` (which is
  ``normalize(q) normalize(k)ᵀ * temperature``), ``P = softmax(A)`` (or PIP's top-m mix of masked
  softmaxes), and ``out = P v`` is per pixel again;
* routing pools the whole feature (GAP) once; prompt maps are a small ``S x S`` map resized
  (bilinear, ``align_corners=False``) to the feature size, so any band of rows of the resized map is
  ``Ry[rows] @ small @ Rxᵀ`` with the interpolation matrices ``Ry (H,S)``, ``Rx (W,S)``.

Everything else is local: 1x1 and 3x3 (depthwise) convolutions, per-pixel LayerNorm, the gated FFNs,
per-pixel attention to prompt tokens, pixel (un)shuffle. A band of rows ``[a, b)`` of a local op needs
its input rows ``[a - h, b + h)`` (the halo ``h``: 1 for a 3x3 convolution); at the image's top and
bottom rows the convolution's own zero padding is the whole image's.

How it runs (:func:`stream_forward`). The network is walked block by block with the model's own
modules and parameters (no copies; 1x1 / depthwise weights are sliced as views). A block's input is
one whole tensor (``(B, C, h, w)`` of that level) that the block updates in place, band by band:

1. attention statistics: for every band, ``q, k`` of the band (halo 1) and ``G += q kᵀ``,
   ``|q|² += ..., |k|² += ...`` (accumulated in fp32 for fp16/bf16 inputs);
2. attention apply: ``x[band] += project_out(P v[band])`` with ``v`` from the band with halo 1;
3. FFN: ``x[band] += ffn(norm2(x))[band]`` (halo 1).

In-place bands go top to bottom; the next band's upper halo is the copy of the previous band's last
rows taken before they were overwritten. Between blocks, chains of local ops (downsample, upsample,
1x1 reductions, concatenation with a skip, the prompt map's resize + 3x3 convolution, the output
convolution + residual) are evaluated lazily, band by band, into the next block's input. So only
block-boundary activations and the skip connections exist whole; the per-block temporaries (qkv,
the FFN's hidden width, attention outputs) exist for one band at a time.

Bands: ``chunk_rows`` rows of the (padded) input image, a multiple of 8; at level ``l`` (stride
``2^(l-1)``) a band has ``chunk_rows / 2^(l-1)`` rows, so every level has ``ceil(H / chunk_rows)``
bands. Variants: ``promptir``, ``cpl`` (routing on the whole slot feature, prompt maps resized to the
whole feature and cropped per band), ``pip`` (universal prompt from the whole skip, its resized map
cropped per band; the selective interaction's top-m attention streamed in two passes), ``dppd``
(assignment on the whole latent, per-pixel token attention per band) and ``none``.

Memory: :func:`estimate_streaming_bytes` predicts the peak activation bytes of a call, and
:func:`chunk_rows_for_budget` picks the largest band that fits a budget. :class:`LiveTensorBytes`
measures the peak of live tensor bytes on any device (a ``TorchDispatchMode``; on CUDA prefer
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .restormer import TransformerBlock

MULTIPLE = 8
NORM_EPS = 1e-12  # F.normalize's eps, as in the channel-attention reference


class StreamingError(ValueError):
    """Arguments the streaming executor cannot run with (the message names the argument)."""


# --------------------------------------------------------------------------------------------- lazy maps
class _Map:
    """A virtual ``(B, C, H, W)`` map whose rows ``[a, b)`` can be computed on demand."""

    height: int

    def rows(self, a: int, b: int):
        raise NotImplementedError


class _Stored(_Map):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.height = tensor.shape[2]

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.tensor[:, :, a:b]


def _crop(out, start: int, count: int):
    if isinstance(out, tuple):
        return tuple(o[:, :, start:start + count] for o in out)
    return out[:, :, start:start + count]


class _Local(_Map):
    """``fn(*sources)`` for a local ``fn``: output row i depends on source rows within ``halo`` of it.

    ``scale``: ``"same"`` (same height), ``"down"`` (output height = source height / 2, e.g. conv +
    pixel-unshuffle; output row i reads source rows ``2i - halo .. 2i + 1 + halo``) or ``"up"`` (output
    height = 2 x source height, e.g. conv + pixel-shuffle). ``fn`` may return a tuple of maps.
    """

    def __init__(self, fn: Callable, sources: Sequence[_Map], *, halo: int = 0, scale: str = "same"):
        heights = {s.height for s in sources}
        if len(heights) != 1:
            raise RuntimeError(f"sources of one local op must have one height, got {sorted(heights)}")
        self.fn, self.sources, self.halo, self.scale = fn, list(sources), halo, scale
        src = heights.pop()
        self.source_height = src
        self.height = {"same": src, "down": src // 2, "up": src * 2}[scale]

    def rows(self, a: int, b: int):
        h, src = self.halo, self.source_height
        if self.scale == "same":
            lo, hi = max(0, a - h), min(src, b + h)
            start = a - lo
        elif self.scale == "down":
            h2 = -(-h // 2)  # in output rows, so the source band starts on an even row
            lo, hi = max(0, 2 * (a - h2)), min(src, 2 * (b + h2))
            start = a - lo // 2
        else:
            lo, hi = max(0, a // 2 - h), min(src, -(-b // 2) + h)
            start = a - 2 * lo
        return _crop(self.fn(*(s.rows(lo, hi) for s in self.sources)), start, b - a)


def interpolation_matrix(out_size: int, in_size: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """``R (out_size, in_size)`` with ``R @ v`` = ``F.interpolate(v, out_size, mode="linear",
    align_corners=False)`` along one axis (PyTorch's source index ``max(0, (i + 1/2) in/out - 1/2)``)."""
    i = torch.arange(out_size, dtype=torch.float64)
    src = ((i + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    mat.index_put_((torch.arange(out_size), i0), 1 - w1, accumulate=True)
    mat.index_put_((torch.arange(out_size), i1), w1, accumulate=True)
    return mat.to(device=device, dtype=dtype)


class _Resized(_Map):
    """Rows of ``F.interpolate(small, (H, W), mode="bilinear", align_corners=False)`` without the whole map."""

    def __init__(self, small: torch.Tensor, height: int, width: int):
        self.small, self.height = small, height
        s_h, s_w = small.shape[-2:]
        self.ry = interpolation_matrix(height, s_h, dtype=small.dtype, device=small.device)
        self.rx_t = interpolation_matrix(width, s_w, dtype=small.dtype, device=small.device).T.contiguous()

    def rows(self, a: int, b: int) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.ry[a:b], self.small), self.rx_t)


# ------------------------------------------------------------------------------------- small helpers
def _conv_part(conv: nn.Conv2d, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Output channels ``[lo, hi)`` of ``conv(x)`` (weights sliced as views); ``x`` holds the matching
    input channels when ``conv`` is depthwise."""
    bias = None if conv.bias is None else conv.bias[lo:hi]
    groups = 1 if conv.groups == 1 else hi - lo
    if conv.groups not in (1, conv.in_channels) or (groups > 1 and conv.in_channels != conv.out_channels):
        raise NotImplementedError("only dense or depthwise convolutions can be split by output channel")
    return F.conv2d(x, conv.weight[lo:hi], bias, conv.stride, conv.padding, conv.dilation, groups)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    return x[:, :channels] if c >= channels else F.pad(x, (0, 0, 0, 0, 0, channels - c))


def attention_probs(gram: torch.Tensor, q_sq: torch.Tensor, k_sq: torch.Tensor, temperature: torch.Tensor,
                    fractions: Sequence[float] | None = None, mix: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(B,h,c,c)`` attention weights of channel attention from whole-image statistics.

    ``gram = q kᵀ`` ``(B,h,c,c)``, ``q_sq = sum_L q²``, ``k_sq = sum_L k²`` ``(B,h,c)``, temperature ``(h,)``::

        A = gram / (max(|q|, eps) max(|k|, eps)ᵀ) * temperature[h]         (= q^ k^ᵀ, q^ = normalize(q))
        P = softmax(A)                                     if fractions is None (MDTA)
        P = sum_j mix[j] softmax(A masked to its top-int(c f_j) per row)   otherwise (ties: lower index)

    as :func:`cplfast.reference.channel_attention.topm_channel_attention` forms them before ``P @ v``.
    """
    qn = q_sq.sqrt().clamp_min(NORM_EPS)
    kn = k_sq.sqrt().clamp_min(NORM_EPS)
    scores = gram / (qn.unsqueeze(-1) * kn.unsqueeze(-2)) * temperature.reshape(1, -1, 1, 1).to(gram.dtype)
    if fractions is None:
        return torch.softmax(scores, dim=-1)
    c = scores.shape[-1]
    counts = [int(c * f) for f in fractions]
    if mix is None:
        mix = torch.full((len(counts),), 1.0 / len(counts), dtype=scores.dtype, device=scores.device)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(c, device=scores.device).expand_as(order))
    probs = torch.zeros_like(scores)
    for j, m in enumerate(counts):
        probs = probs + mix[j].to(scores.dtype) * torch.softmax(scores.masked_fill(rank >= m, float("-inf")), dim=-1)
    return probs


def _attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``P @ v`` per head: probs ``(B,h,c,c)``, v ``(B, h*c, r, W)`` -> ``(B, h*c, r, W)``."""
    b, ch, r, w = v.shape
    heads = probs.shape[1]
    out = torch.matmul(probs.to(v.dtype), v.reshape(b, heads, ch // heads, r * w))
    return out.reshape(b, ch, r, w)


# ----------------------------------------------------------------------------------- memory tracking
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the ``with`` block (any device).

    Every aten op's outputs are seen; an output whose storage is not one of the op's inputs' is a new
    allocation, counted until the last tensor object on it is freed (views and in-place results share
    their storage's count). Tensors that existed before (weights, the input) are not counted, nor
    workspaces an op allocates and frees internally. ``peak`` and ``live`` are in bytes.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}
        self._count: dict[int, int] = defaultdict(int)
        self._refs: dict[int, weakref.ref] = {}

    def _drop(self, tid: int, key: int) -> None:
        self._refs.pop(tid, None)
        self._count[key] -= 1
        if self._count[key] <= 0:
            self.live -= self._bytes.pop(key, 0)
            self._count.pop(key, None)

    def _watch(self, t: torch.Tensor, key: int) -> None:
        tid = id(t)
        if tid in self._refs:
            return
        self._refs[tid] = weakref.ref(t, lambda _, tid=tid, key=key: self._drop(tid, key))
        self._count[key] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key not in self._bytes:
                if key in inputs:
                    continue  # a view of (or in-place on) a tensor from before: not ours
                self._bytes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._watch(t, key)
        return out


# ----------------------------------------------------------------------------------------- executor
class _Stop(Exception):
    pass


def _bands(height: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, height)) for a in range(0, height, step)]


class _Streamer:
    def __init__(self, model, x: torch.Tensor, chunk_rows: int, forced: Mapping[str, torch.Tensor], tick):
        self.model, self.x, self.rows, self.forced, self.tick = model, x, chunk_rows, forced, tick
        self.height = x.shape[2]
        self.routing: dict[str, torch.Tensor] = {}
        self.acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    def bands(self, height: int) -> list[tuple[int, int]]:
        return _bands(height, max(1, self.rows * height // self.height))

    # ----------------------------------------------------------------- sweeps over bands
    def materialise(self, m: _Map, out: torch.Tensor | None = None) -> torch.Tensor:
        for a, b in self.bands(m.height):
            piece = m.rows(a, b)
            if out is None:
                out = piece.new_empty(piece.shape[0], piece.shape[1], m.height, piece.shape[3])
            out[:, :, a:b] = piece
            del piece
            self.tick()
        return out

    def update_inplace(self, x: torch.Tensor, fn: Callable, halo: int, extra: Sequence[_Map] = ()) -> None:
        """``x[:, :, a:b] = fn(x band with halo, *extra bands)[a:b]`` band by band, top to bottom."""
        height = x.shape[2]
        saved = None  # the original rows just above the current band
        for a, b in self.bands(height):
            lo, hi = max(0, a - halo), min(height, b + halo)
            band = x[:, :, lo:hi] if lo == a else torch.cat([saved[:, :, saved.shape[2] - (a - lo):], x[:, :, a:hi]], 2)
            if halo:
                saved = x[:, :, max(0, b - halo):b].clone()
            new = fn(band, *(m.rows(lo, hi) for m in extra))
            x[:, :, a:b] = new[:, :, a - lo:b - lo]
            del band, new
            self.tick()

    def statistics(self, qk: _Map, heads: int):
        """Whole-image ``(q kᵀ, sum q², sum k²)`` per head from a map of ``(q, k)`` bands."""
        gram = q_sq = k_sq = None
        for a, b in self.bands(qk.height):
            q, k = qk.rows(a, b)
            bsz, ch = q.shape[:2]
            q = q.reshape(bsz, heads, ch // heads, -1).to(self.acc_dtype)
            k = k.reshape(bsz, heads, ch // heads, -1).to(self.acc_dtype)
            g, qs, ks = q @ k.transpose(-2, -1), (q * q).sum(-1), (k * k).sum(-1)
            if gram is None:
                gram, q_sq, k_sq = g, qs, ks
            else:
                gram += g
                q_sq += qs
                k_sq += ks
            del q, k, g
            self.tick()
        return gram, q_sq, k_sq

    # ----------------------------------------------------------------- blocks
    def transformer_block(self, blk: TransformerBlock, x: torch.Tensor) -> None:
        """``x += attn(norm1(x)); x += ffn(norm2(x))`` in place (Restormer block, MDTA)."""
        norm1, attn = blk.norm1, blk.attn
        c = x.shape[1]

        def qk(t):
            t = _conv_part(attn.qkv_dwconv, _conv_part(attn.qkv, norm1(t), 0, 2 * c), 0, 2 * c)
            return t[:, :c], t[:, c:]

        gram, q_sq, k_sq = self.statistics(_Local(qk, [_Stored(x)], halo=1), attn.num_heads)
        probs = attention_probs(gram, q_sq, k_sq, attn.temperature.reshape(-1))

        def apply(t):
            v = _conv_part(attn.qkv_dwconv, _conv_part(attn.qkv, norm1(t), 2 * c, 3 * c), 2 * c, 3 * c)
            return t + attn.project_out(_attend(probs, v))

        self.update_inplace(x, apply, 1)
        self.update_inplace(x, lambda t: t + blk.ffn(blk.norm2(t)), 1)

    def stage(self, blocks: nn.Module, x: torch.Tensor) -> None:
        for blk in blocks:
            if not isinstance(blk, TransformerBlock):
                raise NotImplementedError(f"streaming has no rule for {type(blk).__name__}")
            self.transformer_block(blk, x)

    # ----------------------------------------------------------------- prompts
    def slot_prompt_map(self, level: int, feature: torch.Tensor) -> _Map:
        """promptir / cpl: ``conv3x3(resize(sum_n w_n P_n))`` with routing from the whole feature."""
        from .. import functional

        key = f"prompt{level}"
        gen = getattr(self.model, key)
        prompts = gen.prompts
        if key in self.forced:
            routing = self.forced[key]
            mixed = (routing.to(prompts.dtype) @ prompts.flatten(1)).view(routing.shape[0], *prompts.shape[1:])
        else:
            mixed, routing = functional.sparse_prompt(
                feature, gen.linear_layer.weight, gen.linear_layer.bias, prompts, k=gen.top_k,
                temperature=gen.temperature, renorm=gen.renorm, size=tuple(prompts.shape[-2:]))
        self.routing[key] = routing
        resized = _Resized(mixed.to(feature.dtype), feature.shape[2], feature.shape[3])
        return _Local(gen.conv3x3, [resized], halo=1)

    def pip_universal(self, level: int, skip: torch.Tensor) -> _Map:
        """pip: the universal prompt ``u (B,D,S,S)`` from the whole skip (the module's own forward,
        stopped after its prompt-to-prompt block), then ``outconv(resize(u, h x w))`` lazily."""
        key = f"prompt{level}"
        gen = getattr(self.model, key)
        captured = {}

        def hook(_module, _inputs, output):
            captured["u"] = output
            raise _Stop

        handle = gen.LGM.register_forward_hook(hook)
        forced = self.forced.get(key)
        saved = gen.training, gen.teacher_forcing, gen.last_aux
        try:
            if forced is None:
                gen(skip)
            else:  # the module's documented teacher-forced path mixes by the given weights
                gen.training, gen.teacher_forcing = True, True
                gen(skip, labels=forced.to(skip.dtype))
        except _Stop:
            pass
        finally:
            handle.remove()
            gen.training, gen.teacher_forcing = saved[0], saved[1]
        if "u" not in captured:
            raise NotImplementedError(f"{key}: the prompt-to-prompt block (LGM) did not run")
        routing = forced if forced is not None else gen.last_routing
        if routing is not None:
            self.routing[key] = routing
        resized = _Resized(captured["u"], skip.shape[2], skip.shape[3])
        return _Local(gen.outconv, [resized], halo=1)

    def pip_interaction(self, level: int, skip: torch.Tensor, prompt: _Map) -> None:
        """pip: ``skip <- interaction(skip, prompt)`` in place (selective top-m prompt-to-feature attention)."""
        m = getattr(self.model, f"interaction{level}")
        attn, d = m.attn, m.prompt_dim

        def qk(s, p):
            q = attn.q_dwconv(attn.q(_match_channels(m.norm11(s), d)))
            k = _conv_part(attn.kv_dwconv, _conv_part(attn.kv, m.norm12(p), 0, d), 0, d)
            return q, k

        gram, q_sq, k_sq = self.statistics(_Local(qk, [_Stored(skip), prompt], halo=1), attn.num_heads)
        probs = attention_probs(gram, q_sq, k_sq, attn.temperature.reshape(-1), attn.fractions, attn.mix)

        def apply(s, p):
            xn = m.norm11(s)
            query = _match_channels(xn, d)
            v = _conv_part(attn.kv_dwconv, _conv_part(attn.kv, m.norm12(p), d, 2 * d), d, 2 * d)
            y = query + attn.project_out(_attend(probs, v))
            if m.dim > d:
                y = torch.cat([y, xn[:, d:]], dim=1)
            elif m.dim < d:
                y = m.reduce_channel(y)
            return y

        self.update_inplace(skip, apply, 1, extra=[prompt])
        self.update_inplace(skip, lambda y: y + m.ffn(m.norm2(y)), 1)

    def slot(self, level: int, feature: torch.Tensor) -> _Map:
        """The prompt slot at ``level`` (see ``PromptIR._slot``) on the whole ``feature``, as a lazy map."""
        model, kind = self.model, self.model.prompt_type
        if kind == "pip":
            return _Local(model.chnl_reduce3, [_Stored(feature)]) if level == 3 else _Stored(feature)
        if kind in ("promptir", "cpl"):
            prompt = self.slot_prompt_map(level, feature)
            feature = self.materialise(_Local(lambda f, p: torch.cat([f, p], dim=1), [_Stored(feature), prompt]))
            del prompt
        elif kind == "dppd":
            tokens = getattr(model, f"prompt{level}")(self.assignment)
            fusion = getattr(model, f"fusion{level}")
            self.update_inplace(feature, lambda t: fusion(t, tokens), 0)
        self.transformer_block(getattr(model, f"noise_level{level}"), feature)
        return _Local(getattr(model, f"reduce_noise_level{level}"), [_Stored(feature)])

    # ----------------------------------------------------------------- network
    def run(self) -> torch.Tensor:
        model, kind = self.model, self.model.prompt_type
        image = _Stored(self.x)
        # decoder level 1 takes cat(up2_1(feature), enc1): enc1 lives in the second half of that buffer
        b, _, h, w = self.x.shape
        d1 = model.patch_embed.proj.out_channels
        level1 = self.x.new_empty(b, 2 * d1, h, w)
        enc1 = self.materialise(_Local(model.patch_embed, [image], halo=1), out=level1[:, d1:])
        self.stage(model.encoder_level1, enc1)
        enc2 = self.materialise(_Local(model.down1_2, [_Stored(enc1)], halo=1, scale="down"))
        self.stage(model.encoder_level2, enc2)
        enc3 = self.materialise(_Local(model.down2_3, [_Stored(enc2)], halo=1, scale="down"))
        self.stage(model.encoder_level3, enc3)
        latent = self.materialise(_Local(model.down3_4, [_Stored(enc3)], halo=1, scale="down"))
        self.stage(model.latent, latent)
        if kind == "pip":
            for level, skip in zip((1, 2, 3), (enc1, enc2, enc3)):
                prompt = self.pip_universal(level, skip)
                self.pip_interaction(level, skip, prompt)
                del prompt
        elif kind == "dppd":
            if "assignment" in self.forced:
                self.assignment = self.forced["assignment"]
            else:
                self.assignment = model.assignment(latent)
            self.routing["assignment"] = self.assignment

        feature = self.slot(3, latent)
        del latent
        up = _Local(model.up4_3, [feature], halo=1, scale="up")
        buf = self.materialise(_Local(lambda u, e: model.reduce_chan_level3(torch.cat([u, e], 1)), [up, _Stored(enc3)]))
        del feature, up, enc3
        self.stage(model.decoder_level3, buf)

        feature = self.slot(2, buf)
        del buf
        up = _Local(model.up3_2, [feature], halo=1, scale="up")
        buf = self.materialise(_Local(lambda u, e: model.reduce_chan_level2(torch.cat([u, e], 1)), [up, _Stored(enc2)]))
        del feature, up, enc2
        self.stage(model.decoder_level2, buf)

        feature = self.slot(1, buf)
        del buf
        del enc1
        buf = level1
        self.materialise(_Local(model.up2_1, [feature], halo=1, scale="up"), out=buf[:, :d1])
        del feature, level1
        self.stage(model.decoder_level1, buf)
        self.stage(model.refinement, buf)
        return self.materialise(_Local(lambda r, i: model.output(r) + i, [_Stored(buf), image], halo=1))


def count_sweeps(model) -> int:
    """Sweeps over all bands that :func:`stream_forward` makes (every sweep visits each band once)."""
    blocks = sum(len(getattr(model, name)) for name in (
        "encoder_level1", "encoder_level2", "encoder_level3", "latent", "decoder_level3", "decoder_level2",
        "decoder_level1", "refinement"))
    sweeps = 8 + 3 * blocks  # 8 materialisations: patch embed, 3 downsamples, 3 decoder inputs, output
    kind = model.prompt_type
    if kind == "pip":
        sweeps += 3 * 3  # per skip: statistics, apply, FFN
    else:
        sweeps += 3 * 3  # noise_level blocks
        if kind in ("promptir", "cpl", "dppd"):
            sweeps += 3  # concatenation with the prompt map / token fusion
    return sweeps


def check_chunk_rows(chunk_rows) -> int:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < MULTIPLE or chunk_rows % MULTIPLE:
        raise StreamingError(f"chunk_rows must be a positive multiple of {MULTIPLE}, got {chunk_rows!r}")
    return chunk_rows


@torch.no_grad()
def stream_forward(model, x: torch.Tensor, *, chunk_rows: int, routing: Mapping[str, torch.Tensor] | None = None,
                   return_routing: bool = False, progress=None):
    """``model(x)`` computed in row bands of ``chunk_rows`` rows (exact up to float rounding; no grad).

    Args:
        model: a :class:`~cplfast.models.PromptIR` (any variant, any preset); run in eval mode (it is
            switched to eval for the call and back).
        x: ``(B, in_channels, H, W)`` with H, W multiples of 8, as ``model.forward`` takes.
        chunk_rows: rows of ``x`` per band, a positive multiple of 8 (``>= H``: one band).
        routing: forced routing, as ``model(x, routing=...)``.
        return_routing: return ``(out, routing)`` with the routing the model used (as ``aux["routing"]``).
        progress: a callable ``progress(steps)`` called after each band of each sweep; there are
            ``count_sweeps(model) * ceil(H / chunk_rows)`` steps.

    Returns ``(B, out_channels, H, W)`` (and the routing dict with ``return_routing``).
    """
    model._check_input(x)
    chunk_rows = check_chunk_rows(chunk_rows)
    forced = model._check_routing(routing, x.shape[0])
    if model.prompt_type == "cpl" and getattr(model, "top_k", None) is None:
        raise StreamingError("cpl model without top_k")
    tick = (lambda: progress(1)) if progress is not None else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        streamer = _Streamer(model, x, min(chunk_rows, -(-x.shape[2] // MULTIPLE) * MULTIPLE), forced, tick)
        out = streamer.run()
    finally:
        model.train(was_training)
    return (out, streamer.routing) if return_routing else out


# ------------------------------------------------------------------------------------------ memory model
def _model_widths(model) -> dict:
    c = model.config
    d1, d2, d3, d4 = c.level_widths()
    kind = model.prompt_type
    p = tuple(c.prompt_dims) if kind in ("promptir", "cpl", "pip") else (0, 0, 0)
    return dict(d1=d1, d2=d2, d3=d3, d4=d4, p=p, e=float(c.ffn_expansion_factor), kind=kind)


def estimate_streaming_bytes(model, batch: int, height: int, width: int, chunk_rows: int,
                             dtype: torch.dtype = torch.float32) -> int:
    """Predicted peak bytes of the tensors :func:`stream_forward` allocates (not the weights, not the input).

    Two parts, in elements of ``dtype`` (``HW`` the padded image's pixels, ``r W`` a band's pixels at
    full resolution with ``r = chunk_rows + 4`` for the halos):

    * whole tensors alive at the worst moment of the walk: the skips, the block being updated, the
      next block's input being written, the output (:func:`_whole_elements`);
    * one band's temporaries at the widest level, the decoder's full-resolution width ``C = 2 d``: the
      gated FFN's ``2 e C`` hidden channels (project_in, depthwise conv, gelu, gate product) next to
      the band and its norm, about ``(4 e + 2) C`` elements per band pixel (PIP's dual-gate FFN at
      level 1: ``(5 e + 2) d``).

    Calibrated against :class:`LiveTensorBytes` on the CPU (the estimate is 1-1.6x the measured peak
    for every variant); convolution workspaces are not included.
    """
    w = _model_widths(model)
    h = -(-height // MULTIPLE) * MULTIPLE
    wd = -(-width // MULTIPLE) * MULTIPLE
    element = torch.empty((), dtype=dtype).element_size()
    whole = _whole_elements(w, h * wd)
    rows = min(chunk_rows, h) + 4
    per_pixel = (4 * w["e"] + 2) * w["d2"]
    if w["kind"] == "pip":
        per_pixel = max(per_pixel, (5 * w["e"] + 2) * w["d1"], 7 * w["p"][0])
    band = per_pixel * rows * wd
    return int(batch * (whole + band) * element)


def _whole_elements(w: dict, hw: int) -> float:
    d1, d2, d3, d4, (p1, p2, p3) = w["d1"], w["d2"], w["d3"], w["d4"], w["p"]
    image = 3 * hw
    level1 = 2 * d1 * hw  # decoder level 1's input buffer, holding enc1 from the start
    enc2, enc3, latent = d2 * hw / 4, d3 * hw / 16, d4 * hw / 64  # levels 2-4 at H/2, H/4, H/8
    slot3, slot2, slot1 = (d4 + p3) * hw / 64, (d3 + p2) * hw / 16, (d2 + p1) * hw / 4  # slot blocks' inputs
    base = image + level1
    stages = [
        base + enc2 + enc3 + latent + slot3,  # slot 3 input written next to the latent
        base + enc2 + enc3 + slot3 + d3 * hw / 16,  # decoder level 3 input written
        base + enc2 + enc3 + d3 * hw / 16 + slot2,  # slot 2 input written
        base + enc2 + slot2 + d2 * hw / 4,  # decoder level 2 input written
        base + enc2 + d2 * hw / 4 + slot1,  # slot 1 input written
        base + slot1,  # decoder level 1 input written
        base + 3 * hw,  # output written
    ]
    if w["kind"] == "pip":
        stages.append(base + enc2 + enc3 + latent + 2 * max(d1, p1) * hw)  # level-1 prompt: padded skip
    return max(stages)


def chunk_rows_for_budget(model, batch: int, height: int, width: int, budget: int,
                          dtype: torch.dtype = torch.float32) -> int | None:
    """The largest multiple of 8 rows (at most the padded height) whose estimated peak fits ``budget``
    bytes, or None when even 8 rows do not fit."""
    h = -(-height // MULTIPLE) * MULTIPLE
    best = None
    lo, hi = 1, h // MULTIPLE
    while lo <= hi:
        mid = (lo + hi) // 2
        if estimate_streaming_bytes(model, batch, height, width, mid * MULTIPLE, dtype) <= budget:
            best, lo = mid * MULTIPLE, mid + 1
        else:
            hi = mid - 1
    return best


__all__ = ["LiveTensorBytes", "StreamingError", "attention_probs", "check_chunk_rows", "chunk_rows_for_budget",
           "count_sweeps", "estimate_streaming_bytes", "interpolation_matrix", "stream_forward"]
