"""Triton kernels for top-m channel attention (SPEC §3.2) and their launchers.

Shapes: q, k, v ``(B,h,c,L)``; temperature ``(h,)``; mix ``(J,)``; ``counts[j] = int(c * f_j)``::

    q^ = q / max(||q||_L, eps),  k^ likewise                       (rows normalised over L)
    G^ = q^ @ k^.T                                                 (c,c) per (b,h)
    A  = temperature[h] * G^
    S_j = softmax of A restricted, per row, to the counts[j] largest entries (ties: lower index)
    P  = sum_j mix[j] * S_j                      (one plain softmax when ``counts`` is empty: MDTA)
    out = P @ v

No kernel holds a c x c tile. Channels are cut into chunks of ``K`` (``ChannelPlan.chunk``, 32 on a
GPU, 16 for c <= 16; the last chunk is masked, so c = 96 / 160 run as 3 / 5 chunks of 32, never padded
to 128 / 256), and every grid is one-dimensional (axis 0 allows 2^31 - 1 programs, so 8K images launch).

Forward, three launches:

1. ``_gram_partials_kernel``  one program per (b,h, K x K tile of the Gram, split of L): sums its
   tile of q k^T and the squared row norms over its share of L into an fp32 partial (never
   normalised copies of q or k).
2. ``_channel_probs_kernel``  one program per (b,h, block of R rows): reduces the partials of its
   full rows (R x c), normalises, writes G^, ranks every entry of its rows and writes the mixed
   probabilities P. The masked softmaxes share one exponential; no masked copy of A is ever
   stored. The rank of an entry counts the entries of its row that beat it, compared against
   chunks of the row re-read from the G^ it just wrote (an R x c x chunk tile, not R x c x c).
3. ``_apply_probs_kernel``    one program per (b,h, block of L, block of K rows):
   out = sum over K-chunks of P[rows, chunk] @ v[chunk, :].

Backward (G^, the norms and P are saved by the forward; all are c x c or c sized):

1. ``_gram_partials_kernel`` again, on (grad_out, v): partial dP = grad_out @ v^T.
2. ``_channel_dscores_kernel`` one program per (b,h, block of R rows): through every masked softmax
   Jacobian, ``dA = sum_j mix_j S_j (dP - rowsum(dP S_j))``; partial d mix_j = sum dP S_j and
   d temperature = sum dA G^; then ``dG^ = t dA`` and the c x c / c sized terms of the
   normalisation backward::

       dq = W @ k - a_q * q,   dk = W^T @ q - a_k * k,   W = dG^ / (|q_r| |k_s|),
       a_q[r] = rowsum(dG^ * G^)[r] / |q_r|^2  (0 where |q_r| < eps, the clamp has no gradient)
       a_k[s] = colsum(dG^ * G^)[s] / |k_s|^2  (likewise; summed from per-row-block partials)

   (``q . dq^ = |q| rowsum(dG^ * G^)``, so the normalisation backward needs no extra pass over L).
3. ``_apply_probs_kernel`` again, reading P transposed: dv = P^T @ grad_out.
4. ``_channel_input_grads_kernel`` one program per (b,h, block of L, block of K rows): dq, dk as
   above, each a sum over K-chunks (dv has its own launch: three fp32 products in one program do
   not fit the registers).

plus two small torch reductions of the d temperature / d mix partials.

Every reduction over L is split into per-program partials that a later kernel sums in a fixed order:
deterministic, no atomics. Inputs are read through their strides (64-bit offsets); fp16/bf16 are
upcast to fp32 on load. Every ``tl.dot`` takes its precision from :func:`cplfast.kernels._device.
dot_precision` (PyTorch's float32 matmul precision for fp32, TF32 for fp16/bf16, IEEE on CPU).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._device import device_guard, sm_count
from ._device import dot_precision as _dot_precision

EPS = 1e-12  # F.normalize's eps


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (tests poison it with NaN)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gram_partials_kernel(
    a_ptr, b_ptr, gram_ws, asq_ws, bsq_ws,
    H, C, L, n_tiles, n_splits, blocks_per_split,
    sa_b, sa_h, sa_c, sa_l,
    sb_b, sb_h, sb_c, sb_l,
    WITH_NORMS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial ``a[rows] @ b[cols]^T`` (and squared row norms) of one (b,h), one K x K tile, one split of L.

    Program order: tile fastest, then split, then (b,h); the norms of a's rows are written by the
    tiles of column 0, those of b's rows by the tiles of row 0."""
    pid = tl.program_id(0)
    tiles = n_tiles * n_tiles
    tile = pid % tiles
    split = (pid // tiles) % n_splits
    bh = pid // (tiles * n_splits)
    tile_m = tile // n_tiles
    tile_n = tile % n_tiles
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)

    rows = tile_m * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tile_n * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < C
    col_ok = cols < C
    offs_l = tl.arange(0, BLOCK_L)
    a_rows = a_ptr + batch * sa_b + head * sa_h + rows.to(tl.int64)[:, None] * sa_c
    b_rows = b_ptr + batch * sb_b + head * sb_h + cols.to(tl.int64)[:, None] * sb_c

    gram = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
    asq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bsq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split * BLOCK_L
    for i in range(0, blocks_per_split):
        pix = first + i * BLOCK_L + offs_l
        pix_ok = pix < L
        a = tl.load(a_rows + pix[None, :] * sa_l, mask=row_ok[:, None] & pix_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_rows + pix[None, :] * sb_l, mask=col_ok[:, None] & pix_ok[None, :], other=0.0).to(tl.float32)
        gram += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        if WITH_NORMS:
            asq += tl.sum(a * a, axis=1)
            bsq += tl.sum(b * b, axis=1)

    part = (bh.to(tl.int64) * n_splits + split) * C
    tl.store(gram_ws + (part + rows[:, None]) * C + cols[None, :], gram, mask=row_ok[:, None] & col_ok[None, :])
    if WITH_NORMS:
        if tile_n == 0:
            tl.store(asq_ws + part + rows, asq, mask=row_ok)
        if tile_m == 0:
            tl.store(bsq_ws + part + cols, bsq, mask=col_ok)


@triton.jit
def _row_ranks(ghat_ptr, rows, row_ok, scores, cols, t, C,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RANK_CHUNK: tl.constexpr):
    """Rank of each entry of ``scores`` (R x c) within its row, descending; ties go to the lower column
    (a stable sort). The competitors are re-read from G^ (``ghat_ptr``: this (b,h)'s c x c rows) in
    chunks of RANK_CHUNK columns and scaled by ``t`` exactly as ``scores`` was."""
    ranks = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    this = scores[:, :, None]
    this_col = cols[None, :, None]
    for s0 in range(0, C, RANK_CHUNK):
        s = s0 + tl.arange(0, RANK_CHUNK)
        s_ok = s < C
        other = tl.load(ghat_ptr + rows[:, None] * C + s[None, :], mask=row_ok[:, None] & s_ok[None, :], other=0.0)
        other = (other * t)[:, None, :]
        beats = (other > this) | ((other == this) & (s[None, None, :] < this_col))
        beats = beats & s_ok[None, None, :]
        ranks += tl.sum(beats.to(tl.int32), axis=2)
    return ranks


@triton.jit
def _fraction_weight(mix_ptr, s_mix, j, N_FRACS: tl.constexpr, UNIFORM: tl.constexpr):
    if UNIFORM:
        w = 1.0 / N_FRACS
    else:
        w = tl.load(mix_ptr + j * s_mix).to(tl.float32)
    return w


@triton.jit
def _channel_probs_kernel(
    gram_ws, qsq_ws, ksq_ws, temp_ptr, mix_ptr,
    gram_out, qnorm_out, knorm_out, probs_out,
    H, C, n_splits, n_row_blocks, s_temp, s_mix,
    COUNTS: tl.constexpr,
    N_FRACS: tl.constexpr,
    TOPM: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
):
    """Reduce the Gram partials of BLOCK_R full rows, normalise, and write G^ and the mixed top-m softmax P."""
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    bh = (pid // n_row_blocks).to(tl.int64)
    head = bh % H

    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < C
    col_ok = cols < C
    tile_mask = row_ok[:, None] & col_ok[None, :]
    tile = rows[:, None] * C + cols[None, :]

    gram = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    qsq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    ksq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in range(0, n_splits):
        part = (bh * n_splits + s) * C
        gram += tl.load(gram_ws + part * C + tile, mask=tile_mask, other=0.0)
        qsq += tl.load(qsq_ws + part + rows, mask=row_ok, other=0.0)
        ksq += tl.load(ksq_ws + part + cols, mask=col_ok, other=0.0)
    qnorm = tl.sqrt(qsq)
    knorm = tl.sqrt(ksq)
    ghat = gram / tl.maximum(qnorm, 1e-12)[:, None] / tl.maximum(knorm, 1e-12)[None, :]

    ghat_ptr = gram_out + bh * C * C
    tl.store(ghat_ptr + tile, ghat, mask=tile_mask)
    tl.store(qnorm_out + bh * C + rows, qnorm, mask=row_ok)
    if row_block == 0:
        tl.store(knorm_out + bh * C + cols, knorm, mask=col_ok)

    t = tl.load(temp_ptr + head * s_temp).to(tl.float32)
    scores = tl.where(col_ok[None, :], ghat * t, float("-inf"))
    expd = tl.exp(scores - tl.max(scores, axis=1)[:, None])  # the row max is kept by every fraction
    if TOPM:
        tl.debug_barrier()  # this program's G^ rows are in memory for _row_ranks to read
        ranks = _row_ranks(ghat_ptr, rows, row_ok, scores, cols, t, C, BLOCK_R, BLOCK_C, RANK_CHUNK)
    probs = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(N_FRACS):
        if TOPM:
            kept = tl.where(ranks < COUNTS[j], expd, 0.0)
        else:
            kept = expd
        w = _fraction_weight(mix_ptr, s_mix, j, N_FRACS, UNIFORM)
        probs += (w / tl.sum(kept, axis=1))[:, None] * kept
    tl.store(probs_out + bh * C * C + tile, probs, mask=tile_mask)


@triton.jit
def _apply_probs_kernel(
    probs_ptr, v_ptr, out_ptr,
    H, C, L, n_row_blocks, n_l_blocks,
    sv_b, sv_h, sv_c, sv_l,
    so_b, so_h, so_c, so_l,
    TRANSPOSE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[rows, block] = sum over K-chunks of P[rows, chunk] @ v[chunk, block] (P^T when TRANSPOSE: the
    backward's dv = P^T @ grad_out); one (b,h), K rows, one L block."""
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    l_block = (pid // n_row_blocks) % n_l_blocks
    bh = pid // (n_row_blocks * n_l_blocks)
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)
    rows = row_block * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < C
    pix = l_block.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    pix_ok = pix < L
    offs_k = tl.arange(0, BLOCK_K)
    probs_bh = probs_ptr + bh.to(tl.int64) * C * C
    v_base = v_ptr + batch * sv_b + head * sv_h + pix[None, :] * sv_l

    out = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < C
        if TRANSPOSE:
            p_offs = ks[None, :] * C + rows[:, None]
        else:
            p_offs = rows[:, None] * C + ks[None, :]
        p = tl.load(probs_bh + p_offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + ks.to(tl.int64)[:, None] * sv_c, mask=k_ok[:, None] & pix_ok[None, :], other=0.0)
        out += tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    out_ptrs = out_ptr + batch * so_b + head * so_h + rows.to(tl.int64)[:, None] * so_c + pix[None, :] * so_l
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & pix_ok[None, :])


@triton.jit
def _channel_dscores_kernel(
    dprobs_ws, gram_ptr, qnorm_ptr, knorm_ptr, temp_ptr, mix_ptr,
    w_out, aq_out, dk_ws, dtemp_ws, dmix_ws,
    H, C, n_splits, n_row_blocks, s_temp, s_mix,
    COUNTS: tl.constexpr,
    N_FRACS: tl.constexpr,
    TOPM: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
):
    """Backward through the mixed masked softmaxes and the normalisation, for BLOCK_R full rows."""
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    bh = (pid // n_row_blocks).to(tl.int64)
    head = bh % H

    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < C
    col_ok = cols < C
    tile_mask = row_ok[:, None] & col_ok[None, :]
    tile = rows[:, None] * C + cols[None, :]

    dprobs = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for s in range(0, n_splits):
        dprobs += tl.load(dprobs_ws + (bh * n_splits + s) * C * C + tile, mask=tile_mask, other=0.0)
    ghat_ptr = gram_ptr + bh * C * C
    ghat = tl.load(ghat_ptr + tile, mask=tile_mask, other=0.0)
    qnorm = tl.load(qnorm_ptr + bh * C + rows, mask=row_ok, other=1.0)
    knorm = tl.load(knorm_ptr + bh * C + cols, mask=col_ok, other=1.0)
    t = tl.load(temp_ptr + head * s_temp).to(tl.float32)

    scores = tl.where(col_ok[None, :], ghat * t, float("-inf"))
    expd = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    if TOPM:
        ranks = _row_ranks(ghat_ptr, rows, row_ok, scores, cols, t, C, BLOCK_R, BLOCK_C, RANK_CHUNK)
    dscores = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    part = bh * n_row_blocks + row_block
    for j in tl.static_range(N_FRACS):
        if TOPM:
            kept = tl.where(ranks < COUNTS[j], expd, 0.0)
        else:
            kept = expd
        probs_j = kept / tl.sum(kept, axis=1)[:, None]
        probs_j = tl.where(tile_mask, probs_j, 0.0)
        inner = tl.sum(dprobs * probs_j, axis=1)  # (BLOCK_R,): <dP_r, S_j,r>
        w = _fraction_weight(mix_ptr, s_mix, j, N_FRACS, UNIFORM)
        dscores += w * probs_j * (dprobs - inner[:, None])
        tl.store(dmix_ws + part * N_FRACS + j, tl.sum(inner, axis=0))

    tl.store(dtemp_ws + part, tl.sum(tl.sum(dscores * ghat, axis=1), axis=0))
    dgram = dscores * t
    inv_q = 1.0 / tl.maximum(qnorm, 1e-12)
    inv_k = 1.0 / tl.maximum(knorm, 1e-12)
    tl.store(w_out + bh * C * C + tile, dgram * inv_q[:, None] * inv_k[None, :], mask=tile_mask)
    along = dgram * ghat
    aq = tl.where(qnorm >= 1e-12, tl.sum(along, axis=1), 0.0) * inv_q * inv_q
    tl.store(aq_out + bh * C + rows, aq, mask=row_ok)
    tl.store(dk_ws + part * C + cols, tl.sum(along, axis=0), mask=col_ok)


@triton.jit
def _channel_input_grads_kernel(
    w_ptr, aq_ptr, dk_ws, knorm_ptr,
    q_ptr, k_ptr, dq_ptr, dk_ptr,
    H, C, L, n_row_blocks, n_l_blocks, n_score_blocks,
    sq_b, sq_h, sq_c, sq_l,
    sk_b, sk_h, sk_c, sk_l,
    sdq_b, sdq_h, sdq_c, sdq_l,
    sdk_b, sdk_h, sdk_c, sdk_l,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq = W @ k - a_q q, dk = W^T @ q - a_k k for K rows on one block of L, each product a sum over
    K-chunks of the c columns."""
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    l_block = (pid // n_row_blocks) % n_l_blocks
    bh = (pid // (n_row_blocks * n_l_blocks)).to(tl.int64)
    batch = bh // H
    head = bh % H
    rows = row_block * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < C
    pix = l_block.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    pix_ok = pix < L
    offs_k = tl.arange(0, BLOCK_K)
    square = bh * C * C
    q_base = q_ptr + batch * sq_b + head * sq_h + pix[None, :] * sq_l
    k_base = k_ptr + batch * sk_b + head * sk_h + pix[None, :] * sk_l

    dq = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
    dk = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < C
        sq_mask = row_ok[:, None] & k_ok[None, :]
        lk_mask = k_ok[:, None] & pix_ok[None, :]
        ks_l = ks.to(tl.int64)[:, None]
        w = tl.load(w_ptr + square + rows[:, None] * C + ks[None, :], mask=sq_mask, other=0.0)
        k = tl.load(k_base + ks_l * sk_c, mask=lk_mask, other=0.0).to(tl.float32)
        dq += tl.dot(w, k, input_precision=PRECISION)
        w_t = tl.load(w_ptr + square + ks[None, :] * C + rows[:, None], mask=sq_mask, other=0.0)
        q = tl.load(q_base + ks_l * sq_c, mask=lk_mask, other=0.0).to(tl.float32)
        dk += tl.dot(w_t, q, input_precision=PRECISION)

    aq = tl.load(aq_ptr + bh * C + rows, mask=row_ok, other=0.0)
    along_k = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for r in range(0, n_score_blocks):
        along_k += tl.load(dk_ws + (bh * n_score_blocks + r) * C + rows, mask=row_ok, other=0.0)
    knorm = tl.load(knorm_ptr + bh * C + rows, mask=row_ok, other=1.0)
    inv_k = 1.0 / tl.maximum(knorm, 1e-12)
    ak = tl.where(knorm >= 1e-12, along_k, 0.0) * inv_k * inv_k

    mask = row_ok[:, None] & pix_ok[None, :]
    rows_l = rows.to(tl.int64)[:, None]
    q_rows = tl.load(q_base + rows_l * sq_c, mask=mask, other=0.0).to(tl.float32)
    k_rows = tl.load(k_base + rows_l * sk_c, mask=mask, other=0.0).to(tl.float32)
    dq -= aq[:, None] * q_rows
    dk -= ak[:, None] * k_rows
    pix_b = pix[None, :]
    dq_ptrs = dq_ptr + batch * sdq_b + head * sdq_h + rows_l * sdq_c + pix_b * sdq_l
    dk_ptrs = dk_ptr + batch * sdk_b + head * sdk_h + rows_l * sdk_c + pix_b * sdk_l
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``tl.dot`` input precision: see :func:`cplfast.kernels._device.dot_precision` (kept here as an alias)."""
    return _dot_precision(dtype, device)


def default_splits(device: torch.device, programs: int, blocks: int) -> int:
    """Splits of L per (b,h) for the reductions: ~2 waves of ``programs`` on a GPU, 1 in the interpreter."""
    if device.type != "cuda":
        return 1
    return _splits_for(sm_count(device), programs, blocks)


def _splits_for(sms: int, programs: int, blocks: int) -> int:
    return max(1, min(blocks, triton.cdiv(2 * sms, max(programs, 1))))


def _pow2(name: str, value: int, low: int = 1) -> int:
    if value < low or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {low}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class ChannelPlan:
    """Launch settings for one shape (see :func:`make_plan`).

    ``chunk`` K: Gram tile side, rows per program and K-chunk of the kernels over L; ``block_l``:
    pixels per L block (``block_l_grads`` in the input-gradient kernel: 32 on a GPU); ``splits``: programs sharing one Gram tile's reduction over L; ``block_r``:
    rows per program of the c x c kernels (probs, dscores), which hold ``block_r x block_c`` with
    ``block_c = next_pow2(c)``; ``rank_chunk``: competitors per step of the rank count
    (a ``block_r x block_c x rank_chunk`` tile)."""

    c: int
    length: int
    chunk: int
    block_l: int
    block_l_grads: int
    splits: int
    block_r: int
    rank_chunk: int
    warps_gram: int
    stages_gram: int
    warps_rows: int
    warps_apply: int
    warps_grads: int
    stages_grads: int

    @property
    def block_c(self) -> int:
        return max(16, triton.next_power_of_2(self.c))

    @property
    def tiles(self) -> int:
        return triton.cdiv(self.c, self.chunk)

    @property
    def l_blocks(self) -> int:
        return triton.cdiv(self.length, self.block_l)

    @property
    def l_blocks_grads(self) -> int:
        return triton.cdiv(self.length, self.block_l_grads)

    @property
    def blocks_per_split(self) -> int:
        return triton.cdiv(self.l_blocks, self.splits)

    @property
    def row_blocks(self) -> int:
        return triton.cdiv(self.c, self.block_r)


def make_plan(
    shape: Sequence[int],
    *,
    gpu: bool,
    sms: int = 1,
    chunk: int | None = None,
    block_l: int | None = None,
    splits: int | None = None,
    block_r: int | None = None,
    rank_chunk: int | None = None,
) -> ChannelPlan:
    """Settings for q of ``shape`` (B,h,c,L): the CUDA plan when ``gpu`` (``sms`` streaming
    multiprocessors), else the interpreter's (largest blocks, fewest programs). Keywords override.

    CUDA: K = 32 (16 for c <= 16), which keeps the fp32 (FMA and 3xTF32) products of every kernel
    within registers on sm_80 and sm_90; rows of the c x c kernels such that ``block_r x block_c <=
    1024`` and the rank tile ``<= 8192`` elements (8 warps). The interpreter: one chunk of next_pow2(c), all rows."""
    batch, heads, c, length = (int(s) for s in shape)
    block_c = max(16, triton.next_power_of_2(c))
    if chunk is None:
        chunk = min(block_c, 32) if gpu else block_c
    _pow2("chunk", chunk, 16)
    if block_l is None:
        block_l = 64
    _pow2("block_l", block_l, 16)
    block_l_grads = min(block_l, 32) if gpu else block_l
    if block_r is None:
        block_r = max(1, min(triton.next_power_of_2(c), 1024 // block_c)) if gpu else triton.next_power_of_2(c)
    _pow2("block_r", block_r)
    if rank_chunk is None:
        rank_chunk = max(1, min(block_c, 8192 // (block_r * block_c))) if gpu else block_c
    _pow2("rank_chunk", rank_chunk)
    blocks = triton.cdiv(max(length, 1), block_l)
    tiles = triton.cdiv(c, chunk)
    if splits is None:
        splits = _splits_for(sms, batch * heads * tiles * tiles, blocks) if gpu else 1
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    splits = min(splits, blocks)
    return ChannelPlan(
        c=c, length=length, chunk=chunk, block_l=block_l, block_l_grads=block_l_grads, splits=splits, block_r=block_r, rank_chunk=rank_chunk,
        warps_gram=8 if gpu else 4, stages_gram=3, warps_rows=8 if gpu else 4,
        warps_apply=8 if chunk >= 32 else 4, warps_grads=8 if chunk >= 32 else 4, stages_grads=1,
    )


def _plan_for(q: torch.Tensor, plan: ChannelPlan | None, overrides: dict) -> ChannelPlan:
    if plan is None:
        plan = make_plan(q.shape, gpu=q.device.type == "cuda", sms=sm_count(q.device), **overrides)
    elif overrides:
        raise TypeError("pass either plan or keyword overrides, not both")
    if (plan.c, plan.length) != (q.shape[2], q.shape[3]):
        raise ValueError(f"plan is for c={plan.c}, L={plan.length}; q has shape {tuple(q.shape)}")
    return plan


def _fractions(counts: Sequence[int], c: int) -> tuple[tuple[int, ...], bool]:
    """(COUNTS constexpr, TOPM): one full softmax when ``counts`` is empty."""
    counts = tuple(int(m) for m in counts)
    if not counts:
        return (0,), False
    return counts, any(m < c for m in counts)


def _gram_partials(plan: ChannelPlan, a: torch.Tensor, b: torch.Tensor, with_norms: bool, precision: str):
    batch, heads, c, length = a.shape
    bh = batch * heads
    dev = a.device
    gram = _empty((bh, plan.splits, c, c), torch.float32, dev)
    asq = _empty((bh, plan.splits, c), torch.float32, dev) if with_norms else gram
    bsq = _empty((bh, plan.splits, c), torch.float32, dev) if with_norms else gram
    _gram_partials_kernel[(bh * plan.splits * plan.tiles * plan.tiles,)](
        a, b, gram, asq, bsq,
        heads, c, length, plan.tiles, plan.splits, plan.blocks_per_split,
        *a.stride(), *b.stride(),
        WITH_NORMS=with_norms, BLOCK_K=plan.chunk, BLOCK_L=plan.block_l, PRECISION=precision,
        num_warps=plan.warps_gram, num_stages=plan.stages_gram,
    )
    return gram, asq, bsq


def channel_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    mix: torch.Tensor | None,
    counts: Sequence[int],
    *,
    plan: ChannelPlan | None = None,
    **overrides,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launches. ``counts`` empty = plain softmax (MDTA); ``mix`` None = uniform over counts.
    ``plan`` or keyword overrides of :func:`make_plan` (tests) set the launch settings.

    Returns ``(out (B,h,c,L) in q's dtype, G^ (B,h,c,c) fp32, |q| (B,h,c) fp32, |k| (B,h,c) fp32,
    P (B,h,c,c) fp32)``; everything after ``out`` is saved for the backward.
    """
    plan = _plan_for(q, plan, overrides)
    fracs, topm = _fractions(counts, q.shape[2])
    batch, heads, c, length = q.shape
    bh = batch * heads
    dev = q.device
    precision = dot_precision(q.dtype, dev)
    with device_guard(dev):
        gram_ws, qsq_ws, ksq_ws = _gram_partials(plan, q, k, True, precision)
        gram = _empty((batch, heads, c, c), torch.float32, dev)
        qnorm = _empty((batch, heads, c), torch.float32, dev)
        knorm = _empty((batch, heads, c), torch.float32, dev)
        probs = _empty((batch, heads, c, c), torch.float32, dev)
        _channel_probs_kernel[(bh * plan.row_blocks,)](
            gram_ws, qsq_ws, ksq_ws, temperature, mix if mix is not None else temperature,
            gram, qnorm, knorm, probs,
            heads, c, plan.splits, plan.row_blocks, temperature.stride(0), mix.stride(0) if mix is not None else 0,
            COUNTS=fracs, N_FRACS=len(fracs), TOPM=topm, UNIFORM=mix is None,
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, RANK_CHUNK=plan.rank_chunk,
            num_warps=plan.warps_rows,
        )
        out = _empty((batch, heads, c, length), q.dtype, dev)
        _apply_probs_kernel[(bh * plan.l_blocks * plan.tiles,)](
            probs, v, out,
            heads, c, length, plan.tiles, plan.l_blocks,
            *v.stride(), *out.stride(),
            TRANSPOSE=False, BLOCK_K=plan.chunk, BLOCK_L=plan.block_l, PRECISION=precision,
            num_warps=plan.warps_apply,
        )
    return out, gram, qnorm, knorm, probs


def channel_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    mix: torch.Tensor | None,
    gram: torch.Tensor,
    qnorm: torch.Tensor,
    knorm: torch.Tensor,
    probs: torch.Tensor,
    counts: Sequence[int],
    *,
    plan: ChannelPlan | None = None,
    **overrides,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launches. Returns ``(dq, dk, dv, dtemperature, dmix)``; dmix is ``(0,)`` when mix is None."""
    plan = _plan_for(q, plan, overrides)
    fracs, topm = _fractions(counts, q.shape[2])
    batch, heads, c, length = q.shape
    bh = batch * heads
    dev = q.device
    precision = dot_precision(q.dtype, dev)
    with device_guard(dev):
        dprobs_ws, _, _ = _gram_partials(plan, grad_out, v, False, precision)
        w = _empty((batch, heads, c, c), torch.float32, dev)
        aq = _empty((batch, heads, c), torch.float32, dev)
        dk_ws = _empty((bh, plan.row_blocks, c), torch.float32, dev)
        dtemp_ws = _empty((batch, heads, plan.row_blocks), torch.float32, dev)
        dmix_ws = _empty((bh, plan.row_blocks, len(fracs)), torch.float32, dev)
        _channel_dscores_kernel[(bh * plan.row_blocks,)](
            dprobs_ws, gram, qnorm, knorm, temperature, mix if mix is not None else temperature,
            w, aq, dk_ws, dtemp_ws, dmix_ws,
            heads, c, plan.splits, plan.row_blocks, temperature.stride(0), mix.stride(0) if mix is not None else 0,
            COUNTS=fracs, N_FRACS=len(fracs), TOPM=topm, UNIFORM=mix is None,
            BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, RANK_CHUNK=plan.rank_chunk,
            num_warps=plan.warps_rows,
        )
        dq = _empty(q.shape, q.dtype, dev)
        dk = _empty(k.shape, k.dtype, dev)
        dv = _empty(v.shape, v.dtype, dev)
        _apply_probs_kernel[(bh * plan.l_blocks * plan.tiles,)](
            probs, grad_out, dv,
            heads, c, length, plan.tiles, plan.l_blocks,
            *grad_out.stride(), *dv.stride(),
            TRANSPOSE=True, BLOCK_K=plan.chunk, BLOCK_L=plan.block_l, PRECISION=precision,
            num_warps=plan.warps_apply,
        )
        _channel_input_grads_kernel[(bh * plan.l_blocks_grads * plan.tiles,)](
            w, aq, dk_ws, knorm,
            q, k, dq, dk,
            heads, c, length, plan.tiles, plan.l_blocks_grads, plan.row_blocks,
            *q.stride(), *k.stride(), *dq.stride(), *dk.stride(),
            BLOCK_K=plan.chunk, BLOCK_L=plan.block_l_grads, PRECISION=precision,
            num_warps=plan.warps_grads, num_stages=plan.stages_grads,
        )
        dtemperature = dtemp_ws.sum(dim=(0, 2)).to(temperature.dtype)
        if mix is None:
            dmix = _empty((0,), torch.float32, dev)
        else:
            dmix = dmix_ws.sum(dim=(0, 1)).to(mix.dtype)
    return dq, dk, dv, dtemperature, dmix


def audit_cases(dtype: torch.dtype):
    """Launches users reach (every MDTA of PromptIR/CPL/DPPD, PIP's top-m levels, channels per head 32…256
    and odd ones, 512² and 3840x2160 inference, 8K images) for the compile audit (``cplfast.kernels.audit``)."""
    from .audit import AuditCase, fake

    default = (1 / 2, 2 / 3, 3 / 4, 4 / 5)

    def case(b, h, c, length, topm, *, backward=True):
        def run():
            q, k, v = (fake((b, h, c, length), dtype) for _ in range(3))
            temperature = fake((h,), dtype)
            counts = [int(c * f) for f in default] if topm else []
            mix = fake((len(default),), dtype) if topm else None
            out, *saved = channel_attention_forward(q, k, v, temperature, mix, counts)
            if backward:
                channel_attention_backward(fake((b, h, c, length), dtype), q, k, v, temperature, mix, *saved, counts)
        return run

    # PromptIR base at 128² patches: (heads, c per head, L) of the encoder/decoder levels and refinement
    for h, c, side in [(1, 48, 128), (2, 48, 64), (4, 48, 32), (8, 48, 16), (1, 96, 128), (2, 96, 64)]:
        yield AuditCase(f"mdta train h={h} c={c} {side}²", case(8, h, c, side * side, False), quick=c == 96 and h == 1)
    for c in (32, 40, 48, 64, 80, 96, 128, 160, 192, 256):
        yield AuditCase(f"topm train c={c}", case(8, 2, c, 64 * 64, True), quick=c == 160)
        yield AuditCase(f"mdta train c={c}", case(8, 2, c, 64 * 64, False))
    for c in (48, 96, 160):
        yield AuditCase(f"mdta 512² infer c={c}", case(1, 1, c, 512 * 512, False, backward=False))
        yield AuditCase(f"mdta 1920x1200 infer c={c}", case(1, 1, c, 1920 * 1200, False, backward=False))
        yield AuditCase(f"mdta 3840x2160 infer c={c}", case(1, 1, c, 3840 * 2160, False, backward=False),
                        quick=c == 96)
        yield AuditCase(f"topm 3840x2160 infer c={c}", case(1, 1, c, 3840 * 2160, True, backward=False))
    for c in (48, 96):
        yield AuditCase(f"mdta 7680x4320 infer c={c}", case(1, 1, c, 7680 * 4320, False, backward=False))
    yield AuditCase("topm 7680x4320 infer c=160", case(1, 2, 160, 7680 * 4320, True, backward=False))
