"""Triton kernels for top-m channel attention (SPEC §3.2) and their launchers.

Shapes: q, k, v ``(B,h,c,L)``; temperature ``(h,)``; mix ``(J,)``; ``counts[j] = int(c * f_j)``::

    q^ = q / max(||q||_L, eps),  k^ likewise                       (rows normalised over L)
    G^ = q^ @ k^.T                                                 (c,c) per (b,h)
    A  = temperature[h] * G^
    S_j = softmax of A restricted, per row, to the counts[j] largest entries (ties: lower index)
    P  = sum_j mix[j] * S_j                      (one plain softmax when ``counts`` is empty: MDTA)
    out = P @ v

Forward, three launches:

1. ``_gram_partials_kernel``  grid (B*h, splits): each program sums q k^T and the squared row norms
   over its share of L into an fp32 partial (never normalised copies of q or k).
2. ``_channel_probs_kernel``  grid (B*h, row blocks): reduces the partials, normalises, ranks every
   entry of its rows, and writes the mixed probabilities P. The masked softmaxes share one
   exponential; no masked copy of A is ever stored.
3. ``_apply_probs_kernel``    grid (B*h, L blocks): out = P @ v.

Backward (G^, the norms and P are saved by the forward; all are c x c or c sized):

1. ``_gram_partials_kernel`` again, on (grad_out, v): partial dP = grad_out @ v^T.
2. ``_channel_dscores_kernel`` grid (B*h, row blocks): through every masked softmax Jacobian,
   ``dA = sum_j mix_j S_j (dP - rowsum(dP S_j))``; partial d mix_j = sum dP S_j and d temperature =
   sum dA G^; then ``dG^ = t dA`` and the c x c / c sized terms of the normalisation backward::

       dq = W @ k - a_q * q,   dk = W^T @ q - a_k * k,   W = dG^ / (|q_r| |k_s|),
       a_q[r] = rowsum(dG^ * G^)[r] / |q_r|^2  (0 where |q_r| < eps, the clamp has no gradient)

   (``q . dq^ = |q| rowsum(dG^ * G^)``, so the normalisation backward needs no extra pass over L).
3. ``_channel_input_grads_kernel`` grid (B*h, L blocks): dv = P^T @ grad_out, dq, dk as above.

Every reduction over L is split into per-program partials that a later kernel sums in a fixed order:
deterministic, no atomics. Inputs are read through their strides; fp16/bf16 are upcast to fp32 on load.
Matrix products use IEEE fp32 for fp32 inputs (TF32 only when ``torch.backends.cuda.matmul.allow_tf32``
is set) and TF32 tensor cores for fp16/bf16 inputs, whose own rounding is coarser.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (tests poison it with NaN)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gram_partials_kernel(
    a_ptr, b_ptr, gram_ws, asq_ws, bsq_ws,
    H, C, L, blocks_per_split,
    sa_b, sa_h, sa_c, sa_l,
    sb_b, sb_h, sb_c, sb_l,
    WITH_NORMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial ``a @ b^T`` (and squared row norms) of one (b,h) over one split of L."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    batch = (pid_bh // H).to(tl.int64)
    head = (pid_bh % H).to(tl.int64)

    rows = tl.arange(0, BLOCK_C)
    row_ok = rows < C
    offs_l = tl.arange(0, BLOCK_L)
    a_rows = a_ptr + batch * sa_b + head * sa_h + rows[:, None] * sa_c
    b_rows = b_ptr + batch * sb_b + head * sb_h + rows[:, None] * sb_c

    gram = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    asq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    bsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split * BLOCK_L
    for i in range(0, blocks_per_split):
        pix = first + i * BLOCK_L + offs_l
        mask = row_ok[:, None] & (pix[None, :] < L)
        a = tl.load(a_rows + pix[None, :] * sa_l, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_rows + pix[None, :] * sb_l, mask=mask, other=0.0).to(tl.float32)
        gram += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        if WITH_NORMS:
            asq += tl.sum(a * a, axis=1)
            bsq += tl.sum(b * b, axis=1)

    part = pid_bh.to(tl.int64) * n_splits + split
    cols = tl.arange(0, BLOCK_C)
    tile_mask = row_ok[:, None] & (cols[None, :] < C)
    tl.store(gram_ws + part * C * C + rows[:, None] * C + cols[None, :], gram, mask=tile_mask)
    if WITH_NORMS:
        tl.store(asq_ws + part * C + rows, asq, mask=row_ok)
        tl.store(bsq_ws + part * C + rows, bsq, mask=row_ok)


@triton.jit
def _row_ranks(scores, cols, col_ok):
    """Rank of each entry within its row, descending; ties go to the lower column (stable sort)."""
    other = scores[:, None, :]
    this = scores[:, :, None]
    beats = (other > this) | ((other == this) & (cols[None, None, :] < cols[None, :, None]))
    beats = beats & col_ok[None, None, :]
    return tl.sum(beats.to(tl.int32), axis=2)


@triton.jit
def _fraction_weight(mix_ptr, s_mix, j, n_fracs, UNIFORM: tl.constexpr):
    if UNIFORM:
        w = 1.0 / n_fracs
    else:
        w = tl.load(mix_ptr + j * s_mix).to(tl.float32)
    return w


@triton.jit
def _channel_probs_kernel(
    gram_ws, qsq_ws, ksq_ws, temp_ptr, counts_ptr, mix_ptr,
    gram_out, qnorm_out, knorm_out, probs_out,
    H, C, n_splits, n_fracs, s_temp, s_mix,
    TOPM: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Reduce the Gram partials of BLOCK_R rows, normalise, and write the mixed top-m softmax P."""
    pid_bh = tl.program_id(0)
    row_block = tl.program_id(1)
    head = pid_bh % H
    bh = pid_bh.to(tl.int64)

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
        part = bh * n_splits + s
        gram += tl.load(gram_ws + part * C * C + tile, mask=tile_mask, other=0.0)
        qsq += tl.load(qsq_ws + part * C + rows, mask=row_ok, other=0.0)
        ksq += tl.load(ksq_ws + part * C + cols, mask=col_ok, other=0.0)
    qnorm = tl.sqrt(qsq)
    knorm = tl.sqrt(ksq)
    # 1e-12: F.normalize's eps
    ghat = gram / tl.maximum(qnorm, 1e-12)[:, None] / tl.maximum(knorm, 1e-12)[None, :]

    tl.store(gram_out + bh * C * C + tile, ghat, mask=tile_mask)
    tl.store(qnorm_out + bh * C + rows, qnorm, mask=row_ok)
    if row_block == 0:
        tl.store(knorm_out + bh * C + cols, knorm, mask=col_ok)

    t = tl.load(temp_ptr + head * s_temp).to(tl.float32)
    scores = tl.where(col_ok[None, :], ghat * t, float("-inf"))
    expd = tl.exp(scores - tl.max(scores, axis=1)[:, None])  # the row max is kept by every fraction
    if TOPM:
        ranks = _row_ranks(scores, cols, col_ok)
    probs = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for j in range(0, n_fracs):
        if TOPM:
            kept = tl.where(ranks < tl.load(counts_ptr + j), expd, 0.0)
        else:
            kept = expd
        w = _fraction_weight(mix_ptr, s_mix, j, n_fracs, UNIFORM)
        probs += (w / tl.sum(kept, axis=1))[:, None] * kept
    tl.store(probs_out + bh * C * C + tile, probs, mask=tile_mask)


@triton.jit
def _apply_probs_kernel(
    probs_ptr, v_ptr, out_ptr,
    H, C, L,
    sv_b, sv_h, sv_c, sv_l,
    so_b, so_h, so_c, so_l,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[:, block] = P @ v[:, block] for one (b,h) and one block of L."""
    pid_bh = tl.program_id(0)
    batch = (pid_bh // H).to(tl.int64)
    head = (pid_bh % H).to(tl.int64)
    rows = tl.arange(0, BLOCK_C)
    row_ok = rows < C
    pix = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = row_ok[:, None] & (pix[None, :] < L)

    probs = tl.load(
        probs_ptr + pid_bh.to(tl.int64) * C * C + rows[:, None] * C + rows[None, :],
        mask=row_ok[:, None] & row_ok[None, :], other=0.0,
    )
    v = tl.load(v_ptr + batch * sv_b + head * sv_h + rows[:, None] * sv_c + pix[None, :] * sv_l, mask=mask, other=0.0)
    out = tl.dot(probs, v.to(tl.float32), input_precision=PRECISION)
    out_ptrs = out_ptr + batch * so_b + head * so_h + rows[:, None] * so_c + pix[None, :] * so_l
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_dscores_kernel(
    dprobs_ws, gram_ptr, qnorm_ptr, knorm_ptr, temp_ptr, counts_ptr, mix_ptr,
    w_out, aq_out, dk_ws, dtemp_ws, dmix_ws,
    H, C, n_splits, n_fracs, s_temp, s_mix,
    TOPM: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward through the mixed masked softmaxes and the normalisation, for BLOCK_R rows."""
    pid_bh = tl.program_id(0)
    row_block = tl.program_id(1)
    n_row_blocks = tl.num_programs(1)
    head = pid_bh % H
    bh = pid_bh.to(tl.int64)

    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < C
    col_ok = cols < C
    tile_mask = row_ok[:, None] & col_ok[None, :]
    tile = rows[:, None] * C + cols[None, :]

    dprobs = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for s in range(0, n_splits):
        dprobs += tl.load(dprobs_ws + (bh * n_splits + s) * C * C + tile, mask=tile_mask, other=0.0)
    ghat = tl.load(gram_ptr + bh * C * C + tile, mask=tile_mask, other=0.0)
    qnorm = tl.load(qnorm_ptr + bh * C + rows, mask=row_ok, other=1.0)
    knorm = tl.load(knorm_ptr + bh * C + cols, mask=col_ok, other=1.0)
    t = tl.load(temp_ptr + head * s_temp).to(tl.float32)

    scores = tl.where(col_ok[None, :], ghat * t, float("-inf"))
    expd = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    if TOPM:
        ranks = _row_ranks(scores, cols, col_ok)
    dscores = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    part = bh * n_row_blocks + row_block
    for j in range(0, n_fracs):
        if TOPM:
            kept = tl.where(ranks < tl.load(counts_ptr + j), expd, 0.0)
        else:
            kept = expd
        probs_j = kept / tl.sum(kept, axis=1)[:, None]
        probs_j = tl.where(tile_mask, probs_j, 0.0)
        inner = tl.sum(dprobs * probs_j, axis=1)  # (BLOCK_R,): <dP_r, S_j,r>
        w = _fraction_weight(mix_ptr, s_mix, j, n_fracs, UNIFORM)
        dscores += w * probs_j * (dprobs - inner[:, None])
        tl.store(dmix_ws + part * n_fracs + j, tl.sum(inner, axis=0))

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
    probs_ptr, w_ptr, aq_ptr, dk_ws, knorm_ptr,
    dout_ptr, q_ptr, k_ptr, dq_ptr, dk_ptr, dv_ptr,
    H, C, L, n_row_blocks,
    sg_b, sg_h, sg_c, sg_l,
    sq_b, sq_h, sq_c, sq_l,
    sk_b, sk_h, sk_c, sk_l,
    sdq_b, sdq_h, sdq_c, sdq_l,
    sdk_b, sdk_h, sdk_c, sdk_l,
    sdv_b, sdv_h, sdv_c, sdv_l,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dv = P^T @ dout, dq = W @ k - a_q q, dk = W^T @ q - a_k k on one block of L."""
    pid_bh = tl.program_id(0)
    batch = (pid_bh // H).to(tl.int64)
    head = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    rows = tl.arange(0, BLOCK_C)
    row_ok = rows < C
    square_mask = row_ok[:, None] & row_ok[None, :]
    square = bh * C * C + rows[:, None] * C + rows[None, :]
    square_t = bh * C * C + rows[None, :] * C + rows[:, None]
    probs_t = tl.load(probs_ptr + square_t, mask=square_mask, other=0.0)
    w = tl.load(w_ptr + square, mask=square_mask, other=0.0)
    w_t = tl.load(w_ptr + square_t, mask=square_mask, other=0.0)
    aq = tl.load(aq_ptr + bh * C + rows, mask=row_ok, other=0.0)
    along_k = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r in range(0, n_row_blocks):
        along_k += tl.load(dk_ws + (bh * n_row_blocks + r) * C + rows, mask=row_ok, other=0.0)
    knorm = tl.load(knorm_ptr + bh * C + rows, mask=row_ok, other=1.0)
    inv_k = 1.0 / tl.maximum(knorm, 1e-12)
    ak = tl.where(knorm >= 1e-12, along_k, 0.0) * inv_k * inv_k

    pix = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = row_ok[:, None] & (pix[None, :] < L)
    rows_l = rows[:, None]
    pix_l = pix[None, :]
    dout = tl.load(dout_ptr + batch * sg_b + head * sg_h + rows_l * sg_c + pix_l * sg_l, mask=mask, other=0.0)
    q = tl.load(q_ptr + batch * sq_b + head * sq_h + rows_l * sq_c + pix_l * sq_l, mask=mask, other=0.0)
    k = tl.load(k_ptr + batch * sk_b + head * sk_h + rows_l * sk_c + pix_l * sk_l, mask=mask, other=0.0)
    dout = dout.to(tl.float32)
    q = q.to(tl.float32)
    k = k.to(tl.float32)

    dv = tl.dot(probs_t, dout, input_precision=PRECISION)
    dq = tl.dot(w, k, input_precision=PRECISION) - aq[:, None] * q
    dk = tl.dot(w_t, q, input_precision=PRECISION) - ak[:, None] * k
    dv_ptrs = dv_ptr + batch * sdv_b + head * sdv_h + rows_l * sdv_c + pix_l * sdv_l
    dq_ptrs = dq_ptr + batch * sdq_b + head * sdq_h + rows_l * sdq_c + pix_l * sdq_l
    dk_ptrs = dk_ptr + batch * sdk_b + head * sdk_h + rows_l * sdk_c + pix_l * sdk_l
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """IEEE fp32 products for fp32 (unless the user allowed TF32), TF32 tensor cores for fp16/bf16."""
    if device.type != "cuda":
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_splits(device: torch.device, programs: int, blocks: int) -> int:
    """Splits of L per (b,h) for the reductions: ~2 waves of programs on a GPU, 1 in the interpreter."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(blocks, triton.cdiv(2 * sms, max(programs, 1))))


@functools.lru_cache(maxsize=64)
def _counts_tensor(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts if counts else (0,), dtype=torch.int32, device=device)


class _Plan:
    """Block sizes and splits for one call."""

    def __init__(self, q: torch.Tensor, counts: Sequence[int], block_l: int | None, splits: int | None):
        batch, heads, c, length = q.shape
        self.bh = batch * heads
        self.c = c
        self.length = length
        self.block_c = max(16, triton.next_power_of_2(c))
        on_gpu = q.device.type == "cuda"
        self.block_l = block_l or (64 if self.block_c <= 64 or not on_gpu else 32)
        self.blocks = triton.cdiv(length, self.block_l)
        self.splits = min(splits or default_splits(q.device, self.bh, self.blocks), self.blocks)
        self.blocks_per_split = triton.cdiv(self.blocks, self.splits)
        self.topm = any(m < c for m in counts)
        # rows per program in the c x c kernels: the rank tile is BLOCK_R x BLOCK_C x BLOCK_C
        budget = 8192 if on_gpu else 65536
        self.block_r = max(1, min(triton.next_power_of_2(c), budget // (self.block_c * self.block_c)))
        self.row_blocks = triton.cdiv(c, self.block_r)
        self.n_fracs = max(len(counts), 1)
        self.num_warps = 4 if self.block_c < 64 else 8
        self.precision = dot_precision(q.dtype, q.device)


def _gram_partials(plan: _Plan, a: torch.Tensor, b: torch.Tensor, with_norms: bool):
    heads = a.shape[1]
    dev = a.device
    gram = _empty((plan.bh, plan.splits, plan.c, plan.c), torch.float32, dev)
    asq = _empty((plan.bh, plan.splits, plan.c), torch.float32, dev) if with_norms else gram
    bsq = _empty((plan.bh, plan.splits, plan.c), torch.float32, dev) if with_norms else gram
    _gram_partials_kernel[(plan.bh, plan.splits)](
        a, b, gram, asq, bsq,
        heads, plan.c, plan.length, plan.blocks_per_split,
        *a.stride(), *b.stride(),
        WITH_NORMS=with_norms, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, PRECISION=plan.precision,
        num_warps=plan.num_warps,
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
    block_l: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launches. ``counts`` empty = plain softmax (MDTA); ``mix`` None = uniform over counts.

    Returns ``(out (B,h,c,L) in q's dtype, G^ (B,h,c,c) fp32, |q| (B,h,c) fp32, |k| (B,h,c) fp32,
    P (B,h,c,c) fp32)``; everything after ``out`` is saved for the backward.
    """
    counts = tuple(int(m) for m in counts)
    plan = _Plan(q, counts, block_l, splits)
    batch, heads, c, length = q.shape
    dev = q.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        gram_ws, qsq_ws, ksq_ws = _gram_partials(plan, q, k, with_norms=True)
        gram = _empty((batch, heads, c, c), torch.float32, dev)
        qnorm = _empty((batch, heads, c), torch.float32, dev)
        knorm = _empty((batch, heads, c), torch.float32, dev)
        probs = _empty((batch, heads, c, c), torch.float32, dev)
        counts_t = _counts_tensor(counts, dev)
        mix_stride = mix.stride(0) if mix is not None else 0
        _channel_probs_kernel[(plan.bh, plan.row_blocks)](
            gram_ws, qsq_ws, ksq_ws, temperature, counts_t, mix if mix is not None else counts_t,
            gram, qnorm, knorm, probs,
            heads, c, plan.splits, plan.n_fracs, temperature.stride(0), mix_stride,
            TOPM=plan.topm, UNIFORM=mix is None, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            num_warps=plan.num_warps,
        )
        out = _empty((batch, heads, c, length), q.dtype, dev)
        _apply_probs_kernel[(plan.bh, plan.blocks)](
            probs, v, out,
            heads, c, length,
            *v.stride(), *out.stride(),
            BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, PRECISION=plan.precision,
            num_warps=plan.num_warps,
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
    block_l: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launches. Returns ``(dq, dk, dv, dtemperature, dmix)``; dmix is ``(0,)`` when mix is None."""
    counts = tuple(int(m) for m in counts)
    plan = _Plan(q, counts, block_l, splits)
    batch, heads, c, length = q.shape
    dev = q.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        dprobs_ws, _, _ = _gram_partials(plan, grad_out, v, with_norms=False)
        w = _empty((batch, heads, c, c), torch.float32, dev)
        aq = _empty((batch, heads, c), torch.float32, dev)
        dk_ws = _empty((plan.bh, plan.row_blocks, c), torch.float32, dev)
        dtemp_ws = _empty((batch, heads, plan.row_blocks), torch.float32, dev)
        dmix_ws = _empty((plan.bh, plan.row_blocks, plan.n_fracs), torch.float32, dev)
        counts_t = _counts_tensor(counts, dev)
        mix_stride = mix.stride(0) if mix is not None else 0
        _channel_dscores_kernel[(plan.bh, plan.row_blocks)](
            dprobs_ws, gram, qnorm, knorm, temperature, counts_t, mix if mix is not None else counts_t,
            w, aq, dk_ws, dtemp_ws, dmix_ws,
            heads, c, plan.splits, plan.n_fracs, temperature.stride(0), mix_stride,
            TOPM=plan.topm, UNIFORM=mix is None, BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
            num_warps=plan.num_warps,
        )
        dq = _empty(q.shape, q.dtype, dev)
        dk = _empty(k.shape, k.dtype, dev)
        dv = _empty(v.shape, v.dtype, dev)
        _channel_input_grads_kernel[(plan.bh, plan.blocks)](
            probs, w, aq, dk_ws, knorm,
            grad_out, q, k, dq, dk, dv,
            heads, c, length, plan.row_blocks,
            *grad_out.stride(), *q.stride(), *k.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
            BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, PRECISION=plan.precision,
            num_warps=plan.num_warps,
        )
        dtemperature = dtemp_ws.sum(dim=(0, 2)).to(temperature.dtype)
        if mix is None:
            dmix = _empty((0,), torch.float32, dev)
        else:
            dmix = dmix_ws.sum(dim=(0, 1)).to(mix.dtype)
    return dq, dk, dv, dtemperature, dmix


def audit_cases(dtype: torch.dtype):
    """Launches users reach (every MDTA of PromptIR/CPL/DPPD, PIP's top-m levels, channels per head 32…256,
    512² and 3840x2160 inference, an 8K image) for the compile audit (``cplfast.kernels.audit``)."""
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
    for c in (32, 48, 64, 80, 96, 128, 160, 192, 256):
        yield AuditCase(f"topm train c={c}", case(8, 2, c, 64 * 64, True), quick=c == 160)
        yield AuditCase(f"mdta train c={c}", case(8, 2, c, 64 * 64, False))
    for c in (48, 96):
        yield AuditCase(f"mdta 512² infer c={c}", case(1, 1, c, 512 * 512, False, backward=False))
        yield AuditCase(f"mdta 3840x2160 infer c={c}", case(1, 1, c, 3840 * 2160, False, backward=False),
                        quick=c == 96)
        yield AuditCase(f"topm 3840x2160 infer c={c}", case(1, 1, c, 3840 * 2160, True, backward=False))
    yield AuditCase("mdta 7680x4320 infer c=48", case(1, 1, 48, 7680 * 4320, False, backward=False))
