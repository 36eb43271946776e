"""Triton kernels for ``sparse_prompt`` (SPEC §3.1), forward and backward, and their launchers.

Math (x ``(B,C,H,W)``, weight ``(N,C)``, bias ``(N,)``, prompts ``(N,D,S,S)``, output size ``(H',W')``)::

    emb    = mean_hw(x)                                   (B,C)
    logits = emb @ weight.T + bias                        (B,N)
    p      = softmax(logits / temperature)                (B,N)
    m      = top-k mask of p (ties: lower index)          (B,N)
    w      = m*p, or m*p / sum(m*p) with renorm (k < N)   (B,N)   = routing
    out[b] = sum_n w[b,n] * resize(prompts[n])            (B,D,H',W')

``resize`` is bilinear with ``align_corners=False`` (F.interpolate's source index
``max((o + 0.5) * in/out - 0.5, 0)``, upper tap clamped to the last row/column). Because the resize
is linear, ``resize(sum_n w_n P_n) = sum_n w_n resize(P_n)``: the mix kernel resizes each prompt
component at its output positions once and reuses that for every image of the batch. Neither the
``(B,N,D,S,S)`` repeat nor the pre-resize ``(B,D,S,S)`` mix is ever stored, forward or backward.

Forward, two launches:
  1. ``_gap_partial_kernel``  grid (B, C/BLOCK_C, SPLIT): partial spatial sums ``part (B,SPLIT,C)`` of x,
     read through its strides (NCHW, channels-last or any view), fp32.
  2. ``_route_mix_kernel``    grid (H'W'/BLOCK, D/D_PER): every program recomputes the router from ``part``
     (emb, logits, softmax, top-k, renorm; ``B*(SPLIT+N)*C`` loads that hit L2, no launch of its own),
     BLOCK_B = 16 images at a time as (BLOCK_B, N) tiles, takes the bilinear taps of the prompt
     components one of them selected (the others are not read) for each of its D_PER channels and writes
     the weighted sums of all BLOCK_B images with one (BLOCK_B, N) x (N, BLOCK) tl.dot (precision per
     ``_device.dot_precision``). Program (0, 0) also writes emb, probs, mixw and routing.

Backward (grad_out ``(B,D,H',W')``, grad_routing ``(B,N)``, either may be absent), two launches:
  3. ``_prompt_grad_kernel``  grid (S*S/BLOCK, D/D_PER): per prompt pixel and channel, the transposed
     resize of grad_out (a gather over the output window that reads it; no atomics), then
     ``grad_prompts[n] = sum_b w[b,n] G_b`` and this program's partial ``dL/dw[b,n] = <G_b, prompts[n]>``
     summed over its D_PER channels (``dmix_part (B, PARTS, BLOCK_N)``, PARTS = number of programs).
     Skipped when grad_out is absent (then grad_prompts is None).
  4. ``_router_grad_kernel``  grid (C/BLOCK_C,): every program reduces dmix_part (fixed order) and adds
     grad_routing, applies renorm / top-k / softmax Jacobian -> dlogits for every image, then writes its
     channel block of ``grad_emb = dlogits @ weight / (H*W)``, ``grad_weight = dlogits.T @ emb`` and
     (program 0) ``grad_bias = sum_b dlogits``.
``grad_x`` is ``grad_emb`` broadcast over (H, W); the autograd layer returns it as an expanded view,
so no (B,C,H,W) tensor is written. No zero fills, no atomics: the results are deterministic.

HBM bytes (e = element size; S^2 = S*S; prompts read only for selected components, at most N):
  forward : B*C*H*W*e (read x) + <= N*D*S^2*e (prompts) + B*D*H'*W'*e (write out)
            + 4*B*SPLIT*C (partials, written once, re-read from L2 by every mix program) + O(B*(C+N))
  backward: B*D*H'*W'*e (read grad_out) + N*D*S^2*e (read prompts) + N*D*S^2*e (write grad_prompts)
            + 4*B*PARTS*BLOCK_N (dL/dw partials, re-read from L2 by every router-grad program) + O(N*C + B*C)
Example, PromptIR level 1 at 128^2 training patches (B=8, C=96, H=W=S=64, D=64, N=5, fp32, H200 plan):
x 12.6 MB, out 8.4 MB, prompts 5.2 MB, partials 9 KB -> forward 26.2 MB; backward 8.4 + 2*5.2 MB +
164 KB of partials (PARTS = 640) = 19.0 MB: 45 MB, ~10-14 us at 3.3-4.8 TB/s, in four launches
(grids: GAP 8x24x3 = 576 programs (channels-last 8x3x8 = 192), route-mix 64x5 = 320, prompt-grad
128x5 = 640, router-grad 3) where there were six plus zero fills. The router recomputation costs each
mix program one pass over the 9 KB of partials and the 2 KB weight (L1/L2 hits, no HBM).
The eager reference additionally writes and re-reads the (B,D,S,S) mix, the interpolate output and a
full (B,C,H,W) grad_x.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import device_guard, dot_precision, sm_count

MAX_COMPONENTS = 64  # N above this would not fit the component tiles in registers without spills
MAX_SPLIT = 8  # GAP splits along H*W (every mix program re-reads all B*SPLIT*C partials)


@triton.jit
def _gap_partial_kernel(
    x_ptr, part_ptr,
    C, W, HW, hw_per_split, SPLIT,
    sxb, sxc, sxh, sxw,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """part[b, split, c] = sum of x[b, c] over this split's share of the H*W positions (fp32)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_ok = c < C
    base = x_ptr + b.to(tl.int64) * sxb + c[:, None].to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    start = split * hw_per_split
    for i in range(0, hw_per_split, BLOCK_HW):
        hw = start + i + tl.arange(0, BLOCK_HW)
        if FLAT:  # H and W fold into one stride (NCHW-contiguous or channels-last)
            offset = hw.to(tl.int64) * sxw
        else:
            offset = (hw // W).to(tl.int64) * sxh + (hw % W).to(tl.int64) * sxw
        mask = c_ok[:, None] & (hw < HW)[None, :]
        acc += tl.load(base + offset[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + (b * SPLIT + split) * C + c, tl.sum(acc, axis=1), mask=c_ok)


# Divisions are tl.fdiv (div.full.f32, <= 2 ulp): IEEE div.rn.f32 calls a slow-path subroutine around which
# ptxas spills live registers.


@triton.jit
def _topk_keep(p, n, n_ok, k, N, BLOCK_N: tl.constexpr):
    """Mask of the k largest entries of each row of p ``(rows, BLOCK_N)``, 0 <= p <= 1, ties to the lower index;
    ``n``/``n_ok`` are ``(1, BLOCK_N)``.

    Decides min(k, N-k) entries one at a time (the largest, lowest index first; or, for k > N/2, the
    smallest, highest index first, which are dropped): registers stay O(N) for any N.
    """
    select = k <= N - k
    key = tl.where(select, p, -p)  # the next entry decided: largest key, then smallest rank
    rank = tl.where(select, n, BLOCK_N - n)
    decided = (p < 0.0) & (n < 0)
    for _ in range(tl.where(select, k, N - k)):
        cand = tl.where(n_ok & ~decided, key, -3.0)
        best = tl.max(cand, axis=1)
        first = tl.min(tl.where(cand == best[:, None], rank, 2**30), axis=1)
        decided = decided | (rank == first[:, None])
    return tl.where(select, decided, n_ok & ~decided)


@triton.jit
def _route(
    part_ptr, weight_ptr, bias_ptr, emb_ptr, b0, emb_limit,
    B, C, N, SPLIT, inv_hw, temperature, k, swn, swc, sbn,
    HAS_BIAS: tl.constexpr, TOPK: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Router of images b0 .. b0+BLOCK_B-1 from the GAP partials: (p, w), ``(BLOCK_B, BLOCK_N)`` fp32
    (rows past B are zero). Every caller runs the same code on the same inputs, so every program gets
    bit-identical weights. emb[b, c] is written for c < ``emb_limit`` (C in one program, 0 in the others).
    """
    b = b0 + tl.arange(0, BLOCK_B)
    b_ok = b < B
    n = tl.arange(0, BLOCK_N)[None, :]
    n_ok = n < N
    logits = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        bc_mask = b_ok[:, None] & (c < C)[None, :]
        emb = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for s in range(SPLIT):
            emb += tl.load(part_ptr + (b[:, None] * SPLIT + s) * C + c[None, :], mask=bc_mask, other=0.0)
        emb = emb * inv_hw
        tl.store(emb_ptr + b[:, None] * C + c[None, :], emb, mask=b_ok[:, None] & (c < emb_limit)[None, :])
        w_tile = tl.load(
            weight_ptr + tl.arange(0, BLOCK_N)[:, None] * swn + c[None, :] * swc,
            mask=(tl.arange(0, BLOCK_N) < N)[:, None] & (c < C)[None, :], other=0.0,
        ).to(tl.float32)
        logits += tl.sum(emb[:, None, :] * w_tile[None, :, :], axis=2)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + n * sbn, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.where(n_ok, tl.fdiv(logits, temperature), float("-inf"))
    e = tl.where(n_ok, tl.exp(z - tl.max(z, axis=1)[:, None]), 0.0)
    p = tl.fdiv(e, tl.sum(e, axis=1)[:, None])
    w = p
    if TOPK:
        w = tl.where(_topk_keep(p, n, n_ok, k, N, BLOCK_N), p, 0.0)
        if RENORM:
            w = tl.fdiv(w, tl.sum(w, axis=1)[:, None])
    valid = b_ok[:, None] & n_ok
    return tl.where(valid, p, 0.0), tl.where(valid, w, 0.0)


@triton.jit
def _source_taps(dst, scale, in_size):
    """F.interpolate(bilinear, align_corners=False) taps of output index ``dst``: (i0, i1, l0, l1)."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    i1 = tl.minimum(i0 + 1, in_size - 1)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _tap_weight(dst, src_index, scale, in_size):
    """Weight of input index ``src_index`` in output index ``dst`` (0 where it is not a tap)."""
    i0, i1, l0, l1 = _source_taps(dst, scale, in_size)
    return tl.where(i0 == src_index, l0, 0.0) + tl.where(i1 == src_index, l1, 0.0)


@triton.jit
def _route_mix_kernel(
    part_ptr, weight_ptr, bias_ptr, prompts_ptr, out_ptr,
    emb_ptr, probs_ptr, mixw_ptr, routing_ptr,
    B, C, N, D, SPLIT, inv_hw, temperature, k,
    SH, SW, OH, OW, scale_h, scale_w,
    swn, swc, sbn, spn, spd, sph, spw, sob,
    HAS_BIAS: tl.constexpr, TOPK: tl.constexpr, RENORM: tl.constexpr, IDENTITY: tl.constexpr,
    D_PER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[b, d, o] = sum_n w[b, n] * resize(prompts[n, d])[o] for a block of output pixels o and the
    D_PER channels d of this program, with the router weights w recomputed here from the GAP partials,
    BLOCK_B images at a time (program (0, 0) also stores emb/probs/mixw/routing). The sum over n is a
    (BLOCK_B, BLOCK_N) x (BLOCK_N, BLOCK) tl.dot (all three >= 16; padding rows and components are 0)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    count = OH * OW
    o_ok = o < count
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = tl.arange(0, BLOCK_B)
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    emb_limit = tl.where(first, C, 0)  # masks as limits: the interpreter rejects scalar & tensor masks
    row_limit = tl.where(first, N, 0)
    oh = o // OW
    ow = o % OW
    if not IDENTITY:
        h0, h1, lh0, lh1 = _source_taps(oh, scale_h, SH)
        w0, w1, lw0, lw1 = _source_taps(ow, scale_w, SW)
    for b0 in range(0, B, BLOCK_B):
        p, mix = _route(part_ptr, weight_ptr, bias_ptr, emb_ptr, b0, emb_limit, B, C, N, SPLIT, inv_hw, temperature,
                        k, swn, swc, sbn, HAS_BIAS, TOPK, RENORM, BLOCK_B, BLOCK_N, BLOCK_C)  # row i: image b0 + i
        b = b0 + rows
        rows_mask = (b < B)[:, None] & (n < row_limit)[None, :]
        tl.store(probs_ptr + b[:, None] * N + n[None, :], p, mask=rows_mask)
        tl.store(mixw_ptr + b[:, None] * N + n[None, :], mix, mask=rows_mask)
        tl.store(routing_ptr + b[:, None] * N + n[None, :], mix.to(routing_ptr.dtype.element_ty), mask=rows_mask)
        # components selected by an image of this step; the others are not read
        selected = tl.max(tl.abs(mix), axis=0) != 0.0
        mask = (selected & n_ok)[:, None] & o_ok[None, :]
        for j in range(D_PER):
            d = tl.program_id(1) * D_PER + j
            d_mask = mask & (o < tl.where(d < D, count, 0))[None, :]
            base = prompts_ptr + d.to(tl.int64) * spd + n[:, None] * spn
            if IDENTITY:
                resized = tl.load(base + (oh * sph + ow * spw)[None, :], mask=d_mask, other=0.0).to(tl.float32)
            else:
                top = lw0[None, :] * tl.load(base + (h0 * sph + w0 * spw)[None, :], mask=d_mask, other=0.0).to(
                    tl.float32)
                top += lw1[None, :] * tl.load(base + (h0 * sph + w1 * spw)[None, :], mask=d_mask, other=0.0).to(
                    tl.float32)
                bot = lw0[None, :] * tl.load(base + (h1 * sph + w0 * spw)[None, :], mask=d_mask, other=0.0).to(
                    tl.float32)
                bot += lw1[None, :] * tl.load(base + (h1 * sph + w1 * spw)[None, :], mask=d_mask, other=0.0).to(
                    tl.float32)
                resized = lh0[None, :] * top + lh1[None, :] * bot
            # out[b0 + i, d, o] = sum_n mix[i, n] * resized[n, o] for the BLOCK_B images at once
            value = tl.dot(mix, resized, input_precision=PRECISION)
            b = b0 + rows
            out_rows = out_ptr + b[:, None].to(tl.int64) * sob + d.to(tl.int64) * count + o[None, :]
            store_mask = (b < B)[:, None] & (o < tl.where(d < D, count, 0))[None, :]
            tl.store(out_rows, value.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _first_reader(src_index, scale, in_size):
    """Smallest output index whose bilinear taps can include input ``src_index`` (i0 >= src_index - 1)."""
    t = tl.maximum(tl.fdiv(src_index.to(tl.float32) - 0.5, scale) - 0.5, 0.0)
    first = t.to(tl.int32)
    i0, _, _, _ = _source_taps(first, scale, in_size)
    return first + (i0 < src_index - 1).to(tl.int32)  # one step corrects the rounding of t


@triton.jit
def _prompt_grad_kernel(
    grad_out_ptr, prompts_ptr, mixw_ptr, grad_prompts_ptr, dmix_part_ptr,
    B, N, D, SH, SW, OH, OW, scale_h, scale_w, win_h, win_w,
    sgb, sgd, sgh, sgw, spn, spd, sph, spw,
    IDENTITY: tl.constexpr, D_PER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """For a block of prompt pixels s, channels d of this program's group and every image b:
    G_b[s] = resize^T(grad_out[b, d])[s]; grad_prompts[n, d, s] = sum_b mixw[b, n] G_b[s];
    dmix_part[b, prog, n] = sum_{d in group, s in block} G_b[s] prompts[n, d, s].

    Images are taken BLOCK_B at a time; the transposed resize gathers, for each pixel, the win_h x win_w
    output window that starts at its first reader (taps that miss the pixel weigh 0 and are not loaded).
    The program's dmix_part slots are accumulated over its channels in place (only this program touches them).
    """
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s_ok = s < SH * SW
    ih = s // SW
    iw = s % SW
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    parts = tl.num_programs(0) * tl.num_programs(1)
    prog = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if not IDENTITY:
        h_start = _first_reader(ih, scale_h, SH)
        w_start = _first_reader(iw, scale_w, SW)
    for j in range(D_PER):
        d = tl.program_id(1) * D_PER + j
        sd_ok = s < tl.where(d < D, SH * SW, 0)  # s_ok, and nothing past the last channel
        tile_mask = n_ok[:, None] & sd_ok[None, :]
        prompt_offsets = n[:, None] * spn + (ih * sph + iw * spw)[None, :]
        prompt_tile = tl.load(prompts_ptr + d.to(tl.int64) * spd + prompt_offsets, mask=tile_mask, other=0.0)
        prompt_tile = prompt_tile.to(tl.float32)
        grad_tile = tl.zeros([BLOCK_N, BLOCK], dtype=tl.float32)
        grad_base = grad_out_ptr + d.to(tl.int64) * sgd
        for b0 in range(0, B, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            b_ok = b < B
            rows = grad_base + b[:, None].to(tl.int64) * sgb
            bs_mask = b_ok[:, None] & sd_ok[None, :]
            if IDENTITY:
                g = tl.load(rows + (ih * sgh + iw * sgw)[None, :], mask=bs_mask, other=0.0).to(tl.float32)
            else:
                g = tl.zeros([BLOCK_B, BLOCK], dtype=tl.float32)
                for dy in range(win_h):
                    oh = h_start + dy
                    ah = tl.where(oh < OH, _tap_weight(oh, ih, scale_h, SH), 0.0)
                    for dx in range(win_w):
                        ow = w_start + dx
                        a = ah * tl.where(ow < OW, _tap_weight(ow, iw, scale_w, SW), 0.0)
                        hit = bs_mask & (a != 0.0)[None, :]
                        offsets = oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
                        window = tl.load(rows + offsets[None, :], mask=hit, other=0.0)
                        g += a[None, :] * window.to(tl.float32)
            bn_mask = b_ok[:, None] & n_ok[None, :]
            w = tl.load(mixw_ptr + b[:, None] * N + n[None, :], mask=bn_mask, other=0.0)
            grad_tile += tl.sum(w[:, :, None] * g[:, None, :], axis=0)
            dmix = tl.sum(g[:, None, :] * prompt_tile[None, :, :], axis=2)
            slots = dmix_part_ptr + (b[:, None].to(tl.int64) * parts + prog) * BLOCK_N + n[None, :]
            tl.debug_barrier()  # the previous channel's store of these slots is visible to every thread
            dmix += tl.load(slots, mask=(b < tl.where(j > 0, B, 0))[:, None] & n_ok[None, :], other=0.0)
            tl.store(slots, dmix, mask=bn_mask)
        gp_offsets = n[:, None].to(tl.int64) * (D * SH * SW) + (d * SH * SW + s)[None, :]
        tl.store(grad_prompts_ptr + gp_offsets, grad_tile.to(grad_prompts_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _router_grad_kernel(
    dmix_part_ptr, grad_routing_ptr, probs_ptr, mixw_ptr, emb_ptr, weight_ptr,
    grad_emb_ptr, grad_weight_ptr, grad_bias_ptr,
    B, C, N, PARTS, k, temperature, inv_hw,
    swn, swc, sgrb, sgrn,
    HAS_PARTS: tl.constexpr, HAS_GRAD_ROUTING: tl.constexpr, TOPK: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For a block of channels c and every image b (BLOCK_B at a time): dL/dw[b] = sum of the dmix partials
    + grad_routing[b]; (renorm, top-k, softmax Jacobian) -> dlogits[b]; grad_emb[b, c] = dlogits[b] @
    weight[:, c] / (H*W); grad_weight[:, c] = sum_b dlogits[b, :, None] emb[b, c]; program 0:
    grad_bias = sum_b dlogits[b]."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    nc_mask = n_ok[:, None] & c_ok[None, :]
    w_tile = tl.load(weight_ptr + n[:, None] * swn + c[None, :] * swc, mask=nc_mask, other=0.0).to(tl.float32)
    grad_w = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    grad_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < B
        bn_mask = b_ok[:, None] & n_ok[None, :]
        dw = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        if HAS_PARTS:
            acc = tl.zeros([BLOCK_B, BLOCK_P, BLOCK_N], dtype=tl.float32)
            for p0 in range(0, PARTS, BLOCK_P):
                p_idx = p0 + tl.arange(0, BLOCK_P)
                offsets = (b[:, None, None] * PARTS + p_idx[None, :, None]) * BLOCK_N + n[None, None, :]
                mask = bn_mask[:, None, :] & (p_idx < PARTS)[None, :, None]
                acc += tl.load(dmix_part_ptr + offsets, mask=mask, other=0.0)
            dw += tl.sum(acc, axis=1)
        if HAS_GRAD_ROUTING:
            dw += tl.load(grad_routing_ptr + b[:, None] * sgrb + n[None, :] * sgrn, mask=bn_mask, other=0.0).to(
                tl.float32)
        p = tl.load(probs_ptr + b[:, None] * N + n[None, :], mask=bn_mask, other=0.0)
        dp = dw
        if TOPK:
            keep = _topk_keep(p, n[None, :], n_ok[None, :], k, N, BLOCK_N)
            if RENORM:
                w = tl.load(mixw_ptr + b[:, None] * N + n[None, :], mask=bn_mask, other=0.0)
                kept_mass = tl.sum(tl.where(keep, p, 0.0), axis=1)
                kept_mass = tl.where(b_ok, kept_mass, 1.0)
                dp = tl.where(keep, tl.fdiv(dw - tl.sum(dw * w, axis=1)[:, None], kept_mass[:, None]), 0.0)
            else:
                dp = tl.where(keep, dw, 0.0)
        dlogits = tl.where(bn_mask, tl.fdiv(p * (dp - tl.sum(p * dp, axis=1)[:, None]), temperature), 0.0)
        grad_emb = tl.sum(dlogits[:, :, None] * w_tile[None, :, :], axis=1) * inv_hw
        bc_mask = b_ok[:, None] & c_ok[None, :]
        tl.store(grad_emb_ptr + b[:, None] * C + c[None, :], grad_emb.to(grad_emb_ptr.dtype.element_ty), mask=bc_mask)
        emb = tl.load(emb_ptr + b[:, None] * C + c[None, :], mask=bc_mask, other=0.0)
        grad_w += tl.sum(dlogits[:, :, None] * emb[:, None, :], axis=0)
        grad_b += tl.sum(dlogits, axis=0)
    tl.store(grad_weight_ptr + n[:, None] * C + c[None, :], grad_w.to(grad_weight_ptr.dtype.element_ty), mask=nc_mask)
    tl.store(grad_bias_ptr + n, grad_b.to(grad_bias_ptr.dtype.element_ty), mask=n < tl.where(pid == 0, N, 0))


# ----------------------------------------------------------------------------------------- launchers


class ForwardResult(NamedTuple):
    out: torch.Tensor  # (B, D, H', W') in x.dtype, contiguous
    routing: torch.Tensor  # (B, N) in x.dtype
    emb: torch.Tensor  # (B, C) fp32, saved for backward
    probs: torch.Tensor  # (B, N) fp32 softmax before the top-k mask, saved for backward
    mixw: torch.Tensor  # (B, N) fp32 routing, saved for backward


class BackwardResult(NamedTuple):
    grad_emb: torch.Tensor  # (B, C) in grad_out's (= x's) dtype, already divided by H*W: grad_x = broadcast
    grad_weight: torch.Tensor  # (N, C)
    grad_bias: torch.Tensor  # (N,) (the bias gradient, whether or not the op had a bias)
    grad_prompts: torch.Tensor | None  # (N, D, S, S); None when there was no grad_out


class ForwardPlan(NamedTuple):
    """Launch settings of the forward. ``split * hw_per_split >= H*W``; blocks are powers of two."""

    gap_block_c: int  # channels per GAP program
    gap_block_hw: int  # positions per GAP loop iteration
    split: int  # GAP programs along H*W (grid axis 2)
    hw_per_split: int  # positions per split, a multiple of gap_block_hw
    router_block_c: int  # channels per step of the router recomputed in every mix program
    block: int  # output pixels per mix program
    block_b: int  # images whose router weights a mix program holds at once
    d_per_program: int  # prompt channels per mix program (they share its router work)
    num_warps: int  # warps per mix program


class BackwardPlan(NamedTuple):
    """Launch settings of the backward (prompt-grad grid ``(cdiv(S*S, block), cdiv(D, d_per_program))``)."""

    block_b: int  # images per step of the prompt-grad kernel
    block: int  # prompt pixels per prompt-grad program
    d_per_program: int  # prompt channels per prompt-grad program
    router_block_b: int  # images per step of the router-grad kernel
    block_p: int  # dL/dw partials per reduction step of the router-grad kernel
    block_c: int  # channels per router-grad program


def _empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers use comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(int(n)))


def _check_components(n: int) -> None:
    if n > MAX_COMPONENTS:
        raise ValueError(
            f"sparse_prompt: the Triton kernel takes at most {MAX_COMPONENTS} prompt components, got N={n}; "
            "use the 'reference' backend"
        )


def forward_plan(
    b: int, c: int, h: int, w: int, n: int, d: int, out_size: tuple[int, int], *,
    channels_last: bool, cuda: bool, sms: int = 1, **overrides: int,
) -> ForwardPlan:
    """The forward's launch settings for x ``(b,c,h,w)`` (``channels_last``: channels are x's contiguous axis),
    N components of D channels and the output size. On CUDA the GAP is split along H*W until about 4 programs per SM
    (``sms``) run; the interpreter prefers few, big programs. ``overrides`` replace any field before the
    split is made consistent (tests use them to force several splits, loop iterations and blocks)."""
    hw = h * w
    count = int(out_size[0]) * int(out_size[1])
    block_n = _pow2(n, 2)
    if cuda and channels_last and c > 1:
        gap_block_c, gap_block_hw = min(_pow2(c), 32), min(_pow2(hw), 32)
    elif cuda:
        gap_block_c, gap_block_hw = min(_pow2(c), 4), min(_pow2(hw), 512)
    else:
        gap_block_c, gap_block_hw = min(_pow2(c), 64), min(_pow2(hw), 1024)
    gap_block_c = overrides.pop("gap_block_c", gap_block_c)
    gap_block_hw = overrides.pop("gap_block_hw", gap_block_hw)
    # every mix program re-reads the b*split*c partials: at most MAX_SPLIT splits
    split = min(triton.cdiv(4 * sms, b * triton.cdiv(c, gap_block_c)), triton.cdiv(hw, gap_block_hw), MAX_SPLIT)
    split = overrides.pop("split", max(1, split) if cuda else 1)
    hw_per_split = triton.cdiv(triton.cdiv(hw, split), gap_block_hw) * gap_block_hw
    split = triton.cdiv(hw, hw_per_split)
    # the (N, block) tiles of resized prompt components and their tap pointers stay in registers (ptxas
    # spills at N=64 unless the block is 16 pixels on 8 warps)
    block_n = max(block_n, 16)  # tl.dot operands
    num_warps = 8 if cuda and block_n >= 64 else 4
    if cuda:
        block = min(_pow2(count, 16), max(16 if block_n >= 64 else 32, 1024 // block_n))
    else:
        block = min(_pow2(count, 16), 1024)
    block = overrides.pop("block", block)
    block_b = overrides.pop("block_b", 16)  # images per router step and per dot (its minimum)
    # the router's (block_b, N, router_block_c) product tile: at most 2048 values
    router_block_c = min(_pow2(c), max(1, 2048 // (block_b * block_n)))
    # about 2 programs per SM: each computes the router of every image once for all its channels
    d_groups = max(1, min(d, triton.cdiv(2 * sms, triton.cdiv(count, block)))) if cuda else 1
    plan = ForwardPlan(gap_block_c, gap_block_hw, split, hw_per_split, router_block_c, block, block_b,
                       triton.cdiv(d, d_groups), num_warps)
    return plan._replace(**overrides)


def backward_plan(b: int, c: int, n: int, d: int, s: int, *, cuda: bool, sms: int = 1, **overrides: int) -> BackwardPlan:
    """The backward's launch settings for B images, C channels, N components and prompts ``(N,d,s,s)``.
    On CUDA the prompt-grad grid is about 4 programs per SM (``sms``); each program sums its dL/dw over
    ``d_per_program`` channels, so the router-grad kernel reduces that many partials per image."""
    block_n = _pow2(n, 2)
    if cuda:  # the (block_b, N, block) product tile stays in registers
        block_b = min(_pow2(b), 4, max(1, 128 // block_n))
        block = min(_pow2(s * s, 16), max(16, 1024 // (block_n * block_b)))
    else:
        block_b, block = min(_pow2(b), 16), min(_pow2(s * s), 1024)
    block_b = overrides.pop("block_b", block_b)
    block = overrides.pop("block", block)
    s_blocks = triton.cdiv(s * s, block)
    d_groups = max(1, min(d, triton.cdiv(4 * sms, s_blocks))) if cuda else 1
    d_per_program = overrides.pop("d_per_program", triton.cdiv(d, d_groups))
    parts = s_blocks * triton.cdiv(d, d_per_program)
    # router-grad: (router_block_b, block_p, N) partial tiles and (router_block_b, N, block_c) products
    router_block_b = min(_pow2(b), 2)
    block_p = min(_pow2(parts), max(1, 1024 // (router_block_b * block_n)))
    block_c = min(_pow2(c), max(4, 1024 // (router_block_b * block_n)), 32 if cuda else 64)
    plan = BackwardPlan(block_b, block, d_per_program, router_block_b, block_p, block_c)
    return plan._replace(**overrides)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prompts: torch.Tensor,
    k: int,
    temperature: float,
    renorm: bool,
    out_size: tuple[int, int],
    *,
    plan: ForwardPlan | None = None,
) -> ForwardResult:
    """Run the two forward kernels. Arguments are already validated (see cplfast.functional)."""
    b, c, h, w = x.shape
    n, d, sh, sw = prompts.shape
    oh, ow = int(out_size[0]), int(out_size[1])
    _check_components(n)
    device = x.device
    sxb, sxc, sxh, sxw = x.stride()
    if plan is None:
        plan = forward_plan(b, c, h, w, n, d, (oh, ow), channels_last=sxc == 1 and c > 1, cuda=x.is_cuda,
                            sms=sm_count(device))
    block_n = _pow2(n, 2)
    topk = k < n
    with device_guard(device):
        part = _empty((b, plan.split, c), dtype=torch.float32, device=device)
        _gap_partial_kernel[(b, triton.cdiv(c, plan.gap_block_c), plan.split)](
            x, part, c, w, h * w, plan.hw_per_split, plan.split, sxb, sxc, sxh, sxw,
            FLAT=h == 1 or sxh == w * sxw, BLOCK_C=plan.gap_block_c, BLOCK_HW=plan.gap_block_hw,
        )
        emb = _empty((b, c), dtype=torch.float32, device=device)
        probs = _empty((b, n), dtype=torch.float32, device=device)
        mixw = _empty((b, n), dtype=torch.float32, device=device)
        routing = _empty((b, n), dtype=x.dtype, device=device)
        out = _empty((b, d, oh, ow), dtype=x.dtype, device=device)
        _route_mix_kernel[(triton.cdiv(oh * ow, plan.block), triton.cdiv(d, plan.d_per_program))](
            part, weight, bias if bias is not None else weight, prompts, out,
            emb, probs, mixw, routing,
            b, c, n, d, plan.split, 1.0 / (h * w), float(temperature), int(k),
            sh, sw, oh, ow, sh / oh, sw / ow,
            weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
            *prompts.stride(), out.stride(0),
            HAS_BIAS=bias is not None, TOPK=topk, RENORM=bool(renorm) and topk, IDENTITY=(oh, ow) == (sh, sw),
            D_PER=plan.d_per_program, BLOCK_B=plan.block_b, BLOCK_N=max(block_n, 16), BLOCK_C=plan.router_block_c,
            BLOCK=plan.block, PRECISION=dot_precision(x.dtype, device), num_warps=plan.num_warps,
        )
    return ForwardResult(out, routing, emb, probs, mixw)


def backward(
    grad_out: torch.Tensor | None,
    grad_routing: torch.Tensor | None,
    weight: torch.Tensor,
    prompts: torch.Tensor,
    emb: torch.Tensor,
    probs: torch.Tensor,
    mixw: torch.Tensor,
    k: int,
    temperature: float,
    renorm: bool,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    *,
    plan: BackwardPlan | None = None,
) -> BackwardResult:
    """Gradients of (out, routing) w.r.t. the pooled x, weight, bias and prompts.

    ``grad_out`` ``(B,D,H',W')`` and ``grad_routing`` ``(B,N)`` are read through their strides (broadcast
    views included); either may be None (no gradient reached that output: nothing is read or zero-filled,
    and without grad_out the prompt-grad kernel is not launched and ``grad_prompts`` is None).
    ``emb``/``probs``/``mixw`` are the fp32 tensors the forward returned; ``in_size`` is x's (H, W) and
    ``out_size`` the output's.
    """
    b, c = emb.shape
    n, d, sh, sw = prompts.shape
    oh, ow = int(out_size[0]), int(out_size[1])
    _check_components(n)
    device = emb.device
    grad_dtype = grad_out.dtype if grad_out is not None else grad_routing.dtype
    if plan is None:
        plan = backward_plan(b, c, n, d, sh, cuda=emb.is_cuda, sms=sm_count(device))
    block_n = _pow2(n, 2)
    topk = k < n
    with device_guard(device):
        grad_prompts = None
        dmix_part, parts = emb, 0
        if grad_out is not None:
            s_blocks = triton.cdiv(sh * sw, plan.block)
            d_groups = triton.cdiv(d, plan.d_per_program)
            parts = s_blocks * d_groups
            dmix_part = _empty((b, parts, block_n), dtype=torch.float32, device=device)
            grad_prompts = _empty((n, d, sh, sw), dtype=prompts.dtype, device=device)
            _prompt_grad_kernel[(s_blocks, d_groups)](
                grad_out, prompts, mixw, grad_prompts, dmix_part,
                b, n, d, sh, sw, oh, ow, sh / oh, sw / ow, (2 * oh) // sh + 2, (2 * ow) // sw + 2,
                *grad_out.stride(), *prompts.stride(),
                IDENTITY=(oh, ow) == (sh, sw), D_PER=plan.d_per_program, BLOCK_B=plan.block_b,
                BLOCK_N=block_n, BLOCK=plan.block,
            )
        grad_emb = _empty((b, c), dtype=grad_dtype, device=device)
        grad_weight = _empty((n, c), dtype=weight.dtype, device=device)
        grad_bias = _empty((n,), dtype=weight.dtype, device=device)
        _router_grad_kernel[(triton.cdiv(c, plan.block_c),)](
            dmix_part, grad_routing if grad_routing is not None else probs, probs, mixw, emb, weight,
            grad_emb, grad_weight, grad_bias,
            b, c, n, parts, int(k), float(temperature), 1.0 / (in_size[0] * in_size[1]),
            weight.stride(0), weight.stride(1),
            *(grad_routing.stride() if grad_routing is not None else (0, 0)),
            HAS_PARTS=grad_out is not None, HAS_GRAD_ROUTING=grad_routing is not None, TOPK=topk,
            RENORM=bool(renorm) and topk, BLOCK_B=plan.router_block_b, BLOCK_N=block_n, BLOCK_P=plan.block_p,
            BLOCK_C=plan.block_c,
        )
    return BackwardResult(grad_emb, grad_weight, grad_bias, grad_prompts)


__all__ = [
    "BackwardPlan", "BackwardResult", "ForwardPlan", "ForwardResult", "MAX_COMPONENTS", "backward",
    "backward_plan", "forward", "forward_plan",
]


def audit_cases(dtype: torch.dtype):
    """Launches users reach (PromptIR's three prompt levels at SPEC §8 training and inference shapes, 4K,
    channels-last, renorm, a gradient on only one output, up to MAX_COMPONENTS components) for the compile
    audit (``cplfast.kernels.audit``)."""
    from .audit import AuditCase, fake

    def case(b, c, h, w, n, d, s, k, *, order=None, renorm=False, grads=(True, True)):
        def run():
            x = fake((b, c, h, w), dtype, order)
            weight, bias, prompts = fake((n, c), dtype), fake((n,), dtype), fake((n, d, s, s), dtype)
            res = forward(x, weight, bias, prompts, k, 1.0, renorm, (h, w))
            grad_out = fake((b, d, h, w), dtype) if grads[0] else None
            grad_routing = fake((b, n), dtype) if grads[1] else None
            backward(grad_out, grad_routing, weight, prompts, res.emb, res.probs, res.mixw,
                     k, 1.0, renorm, (h, w), (h, w))
        return run

    levels = [(96, 64, 64, 64), (192, 128, 32, 32), (384, 320, 16, 16)]  # (C, D, S, H=W) at 128² patches
    for i, (c, d, s, hw) in enumerate(levels, 1):
        yield AuditCase(f"prompt{i} train k=1", case(8, c, hw, hw, 5, d, s, 1), quick=i == 1)
        yield AuditCase(f"prompt{i} train dense", case(8, c, hw, hw, 5, d, s, 5))
        yield AuditCase(f"prompt{i} train channels-last", case(8, c, hw, hw, 5, d, s, 1, order=(0, 2, 3, 1)))
        yield AuditCase(f"prompt{i} train k=2 renorm, out grad only", case(8, c, hw, hw, 5, d, s, 2, renorm=True,
                                                                            grads=(True, False)))
        yield AuditCase(f"prompt{i} 512² infer", case(1, c, hw * 4, hw * 4, 5, d, s, 1))
        yield AuditCase(f"prompt{i} 3840x2160 infer", case(1, c, 2160 >> (i - 1), 3840 >> (i - 1), 5, d, s, 1))
    yield AuditCase("prompt1 routing grad only", case(8, 96, 64, 64, 5, 64, 64, 1, grads=(False, True)))
    yield AuditCase("prompt1 B=32", case(32, 96, 64, 64, 5, 64, 64, 1))
    yield AuditCase("N=64 k=3 renorm", case(4, 96, 64, 64, 64, 64, 64, 3, renorm=True))
    yield AuditCase("N=64 k=60 renorm", case(4, 96, 64, 64, 64, 64, 64, 60, renorm=True))
    yield AuditCase(f"N={MAX_COMPONENTS} k=1", case(2, 48, 32, 32, MAX_COMPONENTS, 32, 16, 1))
