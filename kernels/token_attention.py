"""Triton kernels for prompt-token attention (SPEC §3.3) and their launchers.

q ``(B,h,L,d)`` (pixels); k, v ``(B,h,M,d)`` with few prompt tokens (M <= 64)::

    S = q @ k^T * scale            (L, M) per (b,h)
    P = softmax(S, -1)
    out = P @ v

Forward: one program per block of ``BLOCK_L`` pixels of one (b,h) (grid ``B*h*cdiv(L, BLOCK_L)`` on axis 0).
All M keys fit in one tile, so each row gets one exact softmax in a single pass, no online rescaling.
The head dimension is walked in ``N_CHUNKS`` chunks of ``D_CHUNK`` columns (a power of two >= 16, chosen
so d is padded as little as possible): the scores accumulate over the chunks of q and k, then each
chunk of the output is ``P @ v_chunk``. With tf32x3 dots the chunk loops are runtime loops (not
unrolled): the hi/lo k and v tiles of every chunk are then not hoisted out of the pixel loop and held as
dot operands side by side (the other precisions keep unrolled loops, leaner there).

Backward (P recomputed from q and k; nothing but the inputs is saved)::

    dP = dout @ v^T,   dS = P * (dP - rowsum(P * dP))        (rowsum over all M keys, in registers)
    dq = scale * dS @ k                                     (written per pixel block)
    dk = scale * sum_L dS^T @ q,   dv = sum_L P^T @ dout     (reductions over L)

One program per (b,h, split) walks its share of the pixel blocks and accumulates dk and dv for the
``N_CHUNKS`` head-dimension chunks in registers (at most four chunk accumulators of ``(BLOCK_M, D_CHUNK)``
each, so the live registers are ``2 * M * d``-sized, not padded to a power of two of d). It writes them as
fp32 partials ``(2, splits, B*h, M, d)``; a second kernel sums the partials of each element in a fixed
order and casts: deterministic, unlike fp32 atomics, and cheap, as a partial is only ``M x d`` against
the ``>= 4M x d`` tiles that produced it. The split count comes from the SM count (:func:`default_splits`).
With tf32x3 dots (every operand split into hi and lo parts) and more than 2048 accumulator elements
per program, the dk/dv chunks are shared out over ``col_groups`` programs per (b,h, split) (grid axis 1),
each recomputing P and dS for its pixels and owning ``cdiv(N_CHUNKS, col_groups)`` chunks. tf32 dots
(fp16/bf16 inputs) do the same beyond ``TF32_HELD_ELEMENTS`` of k, v and own dk, dv columns per program
(:func:`_tf32_col_groups`).

Beyond M <= 16 and d <= 64, ``dq = dS @ k`` is left
to a third kernel laid out as the forward (see :func:`backward_plan`): Triton's FMA dot keeps each
thread's operand rows and columns over the whole reduction (here all M tokens) in registers, which next
to the dk/dv accumulators would spill.

Every ``tl.dot`` takes ``input_precision`` from :func:`cplfast.kernels._device.dot_precision`; offsets
are 64-bit wherever a product with a stride can pass 2^31 (pixel index, batch, head, partial index).

Launches: forward 1; backward 2 (dk/dv pass with dq, partial sum), or 3 (+ dq kernel) beyond M <= 16, d <= 64
and always with tf32x3.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._device import device_guard, dot_precision, sm_count

LOG2E = 1.4426950408889634
MAX_CHUNKS = 4
TF32X3_ACC_ELEMENTS = 2048
TF32_HELD_ELEMENTS = 6144


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (tests poison it with NaN)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _scores(
    acc, a_rows, a_ok, sa_d, kt_cols, tok_ok, sk_d, D, c,
    D_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    """``acc + a[:, chunk c] @ k[:, chunk c]^T`` for a ``(BLOCK_L, D_CHUNK)`` tile of rows ``a_rows``."""
    dim = c * D_CHUNK + tl.arange(0, D_CHUNK)
    dim_ok = dim < D
    a = tl.load(a_rows[:, None] + dim[None, :] * sa_d, mask=a_ok[:, None] & dim_ok[None, :], other=0.0)
    kt = tl.load(kt_cols[None, :] + dim[:, None] * sk_d, mask=dim_ok[:, None] & tok_ok[None, :], other=0.0)
    return tl.dot(a.to(tl.float32), kt.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _softmax(raw, tok_ok, qk_scale):
    """Row softmax of ``raw * scale`` (``qk_scale = scale * log2(e)``, scale > 0); padded tokens get 0.

    The row maximum is subtracted before scaling, so the dominant token's exponent is exactly 0."""
    raw = tl.where(tok_ok[None, :], raw, float("-inf"))
    expd = tl.exp2((raw - tl.max(raw, axis=1)[:, None]) * qk_scale)
    return expd * (1.0 / tl.sum(expd, axis=1))[:, None]


@triton.jit
def _store_out(o_rows, probs, v_rows, pix_ok, tok_ok, D, so_d, sv_d, c, D_CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """Chunk ``c`` of the output rows: ``P @ v[:, chunk c]``."""
    dim = c * D_CHUNK + tl.arange(0, D_CHUNK)
    dim_ok = dim < D
    v = tl.load(v_rows[:, None] + dim[None, :] * sv_d, mask=tok_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.dot(probs, v.to(tl.float32), input_precision=PRECISION)
    tl.store(o_rows[:, None] + dim[None, :] * so_d, out.to(o_rows.dtype.element_ty), mask=pix_ok[:, None] & dim_ok[None, :])


@triton.jit
def _token_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    H, L, M, D, qk_scale, n_lblocks,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    so_b, so_h, so_l, so_d,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D_CHUNK: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr,
    RUNTIME_LOOPS: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // n_lblocks
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)
    pix = (pid - bh * n_lblocks).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    pix_ok = pix < L
    tok = tl.arange(0, BLOCK_M)
    tok_ok = tok < M

    q_rows = q_ptr + batch * sq_b + head * sq_h + pix * sq_l
    kt_cols = k_ptr + batch * sk_b + head * sk_h + tok * sk_m
    raw = tl.zeros((BLOCK_L, BLOCK_M), dtype=tl.float32)
    if RUNTIME_LOOPS:
        for c in range(0, N_CHUNKS):
            raw = _scores(raw, q_rows, pix_ok, sq_d, kt_cols, tok_ok, sk_d, D, c, D_CHUNK, PRECISION)
    else:
        for c in tl.static_range(N_CHUNKS):
            raw = _scores(raw, q_rows, pix_ok, sq_d, kt_cols, tok_ok, sk_d, D, c, D_CHUNK, PRECISION)
    probs = _softmax(raw, tok_ok, qk_scale)

    v_rows = v_ptr + batch * sv_b + head * sv_h + tok * sv_m
    o_rows = out_ptr + batch * so_b + head * so_h + pix * so_l
    if RUNTIME_LOOPS:
        for c in range(0, N_CHUNKS):
            _store_out(o_rows, probs, v_rows, pix_ok, tok_ok, D, so_d, sv_d, c, D_CHUNK, PRECISION)
    else:
        for c in tl.static_range(N_CHUNKS):
            _store_out(o_rows, probs, v_rows, pix_ok, tok_ok, D, so_d, sv_d, c, D_CHUNK, PRECISION)


@triton.jit
def _probs_and_dscores(
    q_rows, g_rows, pix_ok, sq_d, sg_d, k_rows, v_rows, tok_ok, sk_d, sv_d, D, qk_scale,
    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, D_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr, RUNTIME_LOOPS: tl.constexpr,
):
    """P and dS = P * (dP - rowsum(P * dP)), dP = dout @ v^T, for one block of pixels."""
    raw = tl.zeros((BLOCK_L, BLOCK_M), dtype=tl.float32)
    dprobs = tl.zeros((BLOCK_L, BLOCK_M), dtype=tl.float32)
    if RUNTIME_LOOPS:
        for c in range(0, N_CHUNKS):
            raw = _scores(raw, q_rows, pix_ok, sq_d, k_rows, tok_ok, sk_d, D, c, D_CHUNK, PRECISION)
            dprobs = _scores(dprobs, g_rows, pix_ok, sg_d, v_rows, tok_ok, sv_d, D, c, D_CHUNK, PRECISION)
    else:
        for c in tl.static_range(N_CHUNKS):
            raw = _scores(raw, q_rows, pix_ok, sq_d, k_rows, tok_ok, sk_d, D, c, D_CHUNK, PRECISION)
            dprobs = _scores(dprobs, g_rows, pix_ok, sg_d, v_rows, tok_ok, sv_d, D, c, D_CHUNK, PRECISION)
    probs = _softmax(raw, tok_ok, qk_scale)
    return probs, probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])


@triton.jit
def _store_dq(dq_rows, ds, k_rows, pix_ok, tok_ok, D, sdq_d, sk_d, scale, c,
              D_CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    dim = c * D_CHUNK + tl.arange(0, D_CHUNK)
    dim_ok = dim < D
    k = tl.load(k_rows[:, None] + dim[None, :] * sk_d, mask=tok_ok[:, None] & dim_ok[None, :], other=0.0)
    dq = tl.dot(ds, k.to(tl.float32), input_precision=PRECISION) * scale
    tl.store(dq_rows[:, None] + dim[None, :] * sdq_d, dq.to(dq_rows.dtype.element_ty),
             mask=pix_ok[:, None] & dim_ok[None, :])


@triton.jit
def _bwd_chunk(
    dk, dv, ds, probs, q_rows, g_rows, dq_rows, k_rows, pix_ok, tok_ok, D, sq_d, sg_d, sdq_d, sk_d, scale, col0,
    c: tl.constexpr, D_CHUNK: tl.constexpr, PRECISION: tl.constexpr, WITH_DQ: tl.constexpr,
):
    """Head-dimension chunk ``c`` (columns from ``col0 + c * D_CHUNK``) of one pixel block: store dq
    (``WITH_DQ``, only with ``col0 == 0``), return the dk, dv accumulators updated."""
    if WITH_DQ:
        _store_dq(dq_rows, ds, k_rows, pix_ok, tok_ok, D, sdq_d, sk_d, scale, c, D_CHUNK, PRECISION)
    dim = col0 + c * D_CHUNK + tl.arange(0, D_CHUNK)
    mask = pix_ok[:, None] & (dim < D)[None, :]
    q = tl.load(q_rows[:, None] + dim[None, :] * sq_d, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_rows[:, None] + dim[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
    # rows past L have q = 0 and dout = 0, so they add nothing to either reduction
    dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
    dv = tl.dot(tl.trans(probs), g, dv, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _store_partial(ws, dk, dv, part, half, tok, tok_ok, D, col0, c: tl.constexpr, D_CHUNK: tl.constexpr):
    dim = col0 + c * D_CHUNK + tl.arange(0, D_CHUNK)
    tile = tok[:, None] * D + dim[None, :]
    mask = tok_ok[:, None] & (dim < D)[None, :]
    tl.store(ws + part + tile, dk, mask=mask)
    tl.store(ws + half + part + tile, dv, mask=mask)


@triton.jit
def _token_attention_bwd_kernel(
    dout_ptr, q_ptr, k_ptr, v_ptr, dq_ptr, ws,
    H, L, M, D, scale, qk_scale, splits, blocks_per_split, size, half,
    sg_b, sg_h, sg_l, sg_d,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sdq_b, sdq_h, sdq_l, sdq_d,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D_CHUNK: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    N_OWN: tl.constexpr,
    PRECISION: tl.constexpr,
    WITH_DQ: tl.constexpr,
    RUNTIME_LOOPS: tl.constexpr,
):
    pid = tl.program_id(0)
    if N_OWN < N_CHUNKS:
        col0 = tl.program_id(1) * (N_OWN * D_CHUNK)
    else:
        col0 = 0  # one column group: a constant, as the code without groups
    bh = pid // splits
    split = pid - bh * splits
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)
    tok = tl.arange(0, BLOCK_M)
    tok_ok = tok < M

    q_base = q_ptr + batch * sq_b + head * sq_h
    g_base = dout_ptr + batch * sg_b + head * sg_h
    dq_base = dq_ptr + batch * sdq_b + head * sdq_h
    k_rows = k_ptr + batch * sk_b + head * sk_h + tok * sk_m
    v_rows = v_ptr + batch * sv_b + head * sv_h + tok * sv_m
    dk0 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    dk1 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    dv1 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    dk2 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    dv2 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    dk3 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    dv3 = tl.zeros((BLOCK_M, D_CHUNK), dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split * BLOCK_L
    for i in range(0, blocks_per_split):
        pix = first + i * BLOCK_L + tl.arange(0, BLOCK_L)
        pix_ok = pix < L
        q_rows = q_base + pix * sq_l
        g_rows = g_base + pix * sg_l
        dq_rows = dq_base + pix * sdq_l
        probs, ds = _probs_and_dscores(q_rows, g_rows, pix_ok, sq_d, sg_d, k_rows, v_rows, tok_ok, sk_d, sv_d, D,
                                       qk_scale, BLOCK_L, BLOCK_M, D_CHUNK, N_CHUNKS, PRECISION, RUNTIME_LOOPS)
        dk0, dv0 = _bwd_chunk(dk0, dv0, ds, probs, q_rows, g_rows, dq_rows, k_rows, pix_ok, tok_ok, D,
                              sq_d, sg_d, sdq_d, sk_d, scale, col0, 0, D_CHUNK, PRECISION, WITH_DQ)
        if N_OWN > 1:
            dk1, dv1 = _bwd_chunk(dk1, dv1, ds, probs, q_rows, g_rows, dq_rows, k_rows, pix_ok, tok_ok, D,
                                  sq_d, sg_d, sdq_d, sk_d, scale, col0, 1, D_CHUNK, PRECISION, WITH_DQ)
        if N_OWN > 2:
            dk2, dv2 = _bwd_chunk(dk2, dv2, ds, probs, q_rows, g_rows, dq_rows, k_rows, pix_ok, tok_ok, D,
                                  sq_d, sg_d, sdq_d, sk_d, scale, col0, 2, D_CHUNK, PRECISION, WITH_DQ)
        if N_OWN > 3:
            dk3, dv3 = _bwd_chunk(dk3, dv3, ds, probs, q_rows, g_rows, dq_rows, k_rows, pix_ok, tok_ok, D,
                                  sq_d, sg_d, sdq_d, sk_d, scale, col0, 3, D_CHUNK, PRECISION, WITH_DQ)

    part = split.to(tl.int64) * size + bh.to(tl.int64) * M * D
    _store_partial(ws, dk0 * scale, dv0, part, half, tok, tok_ok, D, col0, 0, D_CHUNK)
    if N_OWN > 1:
        _store_partial(ws, dk1 * scale, dv1, part, half, tok, tok_ok, D, col0, 1, D_CHUNK)
    if N_OWN > 2:
        _store_partial(ws, dk2 * scale, dv2, part, half, tok, tok_ok, D, col0, 2, D_CHUNK)
    if N_OWN > 3:
        _store_partial(ws, dk3 * scale, dv3, part, half, tok, tok_ok, D, col0, 3, D_CHUNK)


@triton.jit
def _token_attention_dq_kernel(
    dout_ptr, q_ptr, k_ptr, v_ptr, dq_ptr,
    H, L, M, D, scale, qk_scale, n_lblocks,
    sg_b, sg_h, sg_l, sg_d,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sdq_b, sdq_h, sdq_l, sdq_d,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    D_CHUNK: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr,
    RUNTIME_LOOPS: tl.constexpr,
):
    """dq alone, one program per pixel block (grid as the forward's), for plans whose fused backward
    would hold too many registers: ``dS @ k`` reduces over all M tokens at once."""
    pid = tl.program_id(0)
    bh = pid // n_lblocks
    batch = (bh // H).to(tl.int64)
    head = (bh % H).to(tl.int64)
    pix = (pid - bh * n_lblocks).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    pix_ok = pix < L
    tok = tl.arange(0, BLOCK_M)
    tok_ok = tok < M
    k_rows = k_ptr + batch * sk_b + head * sk_h + tok * sk_m
    v_rows = v_ptr + batch * sv_b + head * sv_h + tok * sv_m
    q_rows = q_ptr + batch * sq_b + head * sq_h + pix * sq_l
    g_rows = dout_ptr + batch * sg_b + head * sg_h + pix * sg_l
    dq_rows = dq_ptr + batch * sdq_b + head * sdq_h + pix * sdq_l
    probs, ds = _probs_and_dscores(q_rows, g_rows, pix_ok, sq_d, sg_d, k_rows, v_rows, tok_ok, sk_d, sv_d, D,
                                   qk_scale, BLOCK_L, BLOCK_M, D_CHUNK, N_CHUNKS, PRECISION, RUNTIME_LOOPS)
    if RUNTIME_LOOPS:
        for c in range(0, N_CHUNKS):
            _store_dq(dq_rows, ds, k_rows, pix_ok, tok_ok, D, sdq_d, sk_d, scale, c, D_CHUNK, PRECISION)
    else:
        for c in tl.static_range(N_CHUNKS):
            _store_dq(dq_rows, ds, k_rows, pix_ok, tok_ok, D, sdq_d, sk_d, scale, c, D_CHUNK, PRECISION)


@triton.jit
def _sum_partials_kernel(ws, dk_ptr, dv_ptr, size, splits, half, BLOCK: tl.constexpr):
    """``dk[e] = sum_s ws[0, s, e]`` and ``dv[e] = sum_s ws[1, s, e]`` (e indexes ``(B*h, M, d)``), summed in
    split order; axis 1 of the grid picks dk (0) or dv (1)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < size
    which = tl.program_id(1)
    src = ws + which.to(tl.int64) * half + idx
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(src + s * size, mask=ok, other=0.0)
    if which == 0:
        tl.store(dk_ptr + idx, acc.to(dk_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(dv_ptr + idx, acc.to(dv_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# launch plans
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Launch settings of one kernel: pixel block, token block, head-dimension chunking, warps, splits
    (backward: programs per (b,h) over L) and the ``tl.dot`` input precision."""

    block_l: int
    block_m: int
    d_chunk: int
    n_chunks: int
    num_warps: int
    precision: str
    splits: int = 1
    num_stages: int = 1
    col_groups: int = 1  # backward: programs per (b,h, split) over the head-dimension chunks of dk/dv
    dq: "Plan | None" = None  # backward: dq by its own kernel with these settings, not in the dk/dv pass


def _chunking(d: int, widest: int = 64) -> tuple[int, int]:
    """``(D_CHUNK, N_CHUNKS)``: power-of-two chunks >= 16, at most ``MAX_CHUNKS`` of them, covering d with
    the least padding (ties: fewer chunks, up to ``widest`` columns)."""
    options = [(c * -(-d // c), -c, c) for c in (16, 32, 64, 128, 256) if -(-d // c) <= MAX_CHUNKS]
    fitting = [o for o in options if o[2] <= widest] or options[:1]
    _, _, chunk = min(fitting)
    return chunk, -(-d // chunk)


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def forward_plan(m: int, d: int, dtype: torch.dtype, precision: str, *, cuda: bool = True) -> Plan:
    """Forward launch settings for M tokens, head dimension d (``precision``: :func:`dot_precision`).

    With ``"ieee"`` dots (fp32 FMA) Triton holds each thread's rows and columns of both operands over
    the whole reduction in registers, so the reductions are kept short: 16-column chunks of d for the
    scores, and fewer pixels per program as M (the reduction of ``P @ v``) grows. Tensor-core dots
    (tf32, tf32x3) hold fragments only, so they take wider chunks and more pixels."""
    block_m = _block_m(m)
    if not cuda:
        d_chunk, n_chunks = _chunking(d, widest=32)
        return Plan(32, block_m, d_chunk, n_chunks, 4, precision)
    if precision == "ieee":
        block_l = {16: 64, 32: 32}.get(block_m, 16)
        if d > 96:  # M <= 16, d = 128 at 64 pixels: ptxas spilled 4-8 B at 64 registers (sm_80)
            block_l = min(block_l, 32)
        return Plan(block_l, block_m, 16, -(-d // 16), 8, precision)
    d_chunk, n_chunks = _chunking(d, widest=32)
    return Plan(64, block_m, d_chunk, n_chunks, 4, precision)


def backward_plan(length: int, bh: int, m: int, d: int, dtype: torch.dtype, precision: str, *, sms: int,
                  cuda: bool = True) -> Plan:
    """Backward launch settings; ``sms``: streaming multiprocessors (:func:`sm_count`) for the split count.

    Beyond M <= 16 with d <= 64 (and always for tf32x3's three products), ``dq = dS @ k`` (a reduction
    over M) would need more registers next to the dk/dv accumulators than a thread has (the compile
    audit showed spills), so dq gets its own kernel (``Plan.dq``), which recomputes P and dS per pixel
    block as the forward does."""
    block_m = _block_m(m)
    d_chunk, n_chunks = _chunking(d, widest=32)
    fused = block_m <= 16 and d_chunk * n_chunks <= 64 and precision != "tf32x3"
    if not cuda:
        block_l, num_warps, dq = 16, 4, None
    elif precision == "ieee":
        block_l, num_warps = 16, 8
        dq = None if fused else Plan(16, block_m, 16, -(-d // 16), 8, precision)
    else:
        # tf32 at M = 64: the k/v tiles and the dk/dv chunks over 8 warps (at 4, one block per sm_80 SM)
        block_l, num_warps = (16, 8) if precision == "tf32x3" else (32, 8 if block_m >= 64 else 4)
        if fused and precision == "tf32" and d_chunk == 32:
            # 32-column chunks at 32 pixels land just above the 128 registers ptxas settles on for this
            # pass (spilled 8-16 B with Triton 3.6: sm_80 bf16 d = 64, sm_90 fp16 d = 32); 16 pixels fit
            block_l = 16
        if fused:
            dq = None
        elif precision == "tf32x3":  # the forward's 64-pixel blocks reach 255 registers here (sm_80)
            dq = Plan(16, block_m, d_chunk, n_chunks, 4, precision)
        else:  # the dk/dv pass's 32-pixel blocks: with the forward's 64, ptxas spilled 8 B (M = 32, d = 48, sm_80)
            dq = Plan(block_l, block_m, d_chunk, n_chunks, 4, precision)
    col_groups = 1
    if cuda and precision == "tf32x3":
        # tf32x3 splits every operand into hi and lo parts: beyond 2048 accumulator elements per
        # program (dk and dv each), the chunks of dk/dv are shared out over programs (each recomputes P, dS)
        col_groups = min(n_chunks, -(-block_m * d_chunk * n_chunks // TF32X3_ACC_ELEMENTS))
    elif cuda and precision == "tf32":
        col_groups = _tf32_col_groups(block_m, d_chunk, n_chunks)
    return Plan(block_l, block_m, d_chunk, n_chunks, num_warps, precision,
                default_splits(length, bh, m, block_l, sms), col_groups=col_groups, dq=dq)


def _tf32_col_groups(block_m: int, d_chunk: int, n_chunks: int) -> int:
    """Column groups of the tf32 (fp16/bf16 inputs) dk/dv pass: the fewest whose programs each hold at most
    ``TF32_HELD_ELEMENTS`` elements of k and v (all d columns: the unrolled chunk loops keep both tiles
    in registers over the pixel loop) plus their own columns of dk and dv. Beyond it the compile audit
    found spills: up to ~1 KB/thread at M = 64, d = 128 on sm_80 with one group; M = 32 spills from
    ``block_m * (d + 2 * own columns)`` = 8192 on (M = 32, d = 128, two groups)."""
    for groups in range(1, n_chunks + 1):
        own = -(-n_chunks // groups)
        if block_m * d_chunk * (n_chunks + 2 * own) <= TF32_HELD_ELEMENTS:
            return groups
    return n_chunks


def default_splits(length: int, bh: int, m: int, block_l: int, sms: int) -> int:
    """Programs per (b,h) in the backward: four programs per SM over all (b,h), but each split covers at
    least ``4 * max(M, 16)`` pixels so that its ``2 x M x d`` fp32 partials stay small next to the
    ``3 x pixels x d`` it reads and writes."""
    blocks = triton.cdiv(length, block_l)
    wanted = triton.cdiv(4 * sms, bh)
    most = max(1, blocks // triton.cdiv(4 * max(m, 16), block_l))
    return max(1, min(wanted, most, blocks))


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def token_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                            plan: Plan | None = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` -> ``(B,h,L,d)`` in q's dtype (contiguous). q ``(B,h,L,d)``, k and v
    ``(B,h,M,d)``, any strides; ``plan`` overrides :func:`forward_plan` (tests)."""
    batch, heads, length, d = q.shape
    m = k.shape[2]
    if plan is None:
        plan = forward_plan(m, d, q.dtype, dot_precision(q.dtype, q.device), cuda=q.device.type == "cuda")
    _check_dim_strides(q, k, v)
    n_lblocks = triton.cdiv(length, plan.block_l)
    out = _empty(q.shape, q.dtype, q.device)
    with device_guard(q.device):
        _token_attention_fwd_kernel[(batch * heads * n_lblocks,)](
            q, k, v, out,
            heads, length, m, d, float(scale) * LOG2E, n_lblocks,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            BLOCK_L=plan.block_l, BLOCK_M=plan.block_m, D_CHUNK=plan.d_chunk, N_CHUNKS=plan.n_chunks,
            PRECISION=plan.precision, RUNTIME_LOOPS=_runtime_loops(plan), num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
    return out


SUM_BLOCK = 1024


def _runtime_loops(plan: Plan) -> bool:
    """Head-dimension chunk loops as runtime loops for tf32x3 (see the module docstring); unrolled otherwise,
    where the compile audit found the unrolled form the leaner one."""
    return plan.precision == "tf32x3"


def _check_dim_strides(*tensors: torch.Tensor) -> None:
    """Column offsets ``dim * stride(-1)`` are 32-bit in the kernels (pixel, batch and head offsets are
    64-bit): refuse the views where they would overflow rather than read the wrong memory."""
    for t in tensors:
        if t.shape[-1] * abs(t.stride(-1)) >= 2**31:
            raise ValueError(f"head dimension stride {t.stride(-1)} x d={t.shape[-1]} reaches 2^31; "
                             "pass a tensor with a smaller last-dimension stride")


def token_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float, *, plan: Plan | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`token_attention_forward` for ``grad_out`` ``(B,h,L,d)``, in the inputs'
    dtype (contiguous); ``plan`` overrides :func:`backward_plan` (tests)."""
    batch, heads, length, d = q.shape
    m = k.shape[2]
    dev = q.device
    if plan is None:
        plan = backward_plan(length, batch * heads, m, d, q.dtype, dot_precision(q.dtype, dev),
                             sms=sm_count(dev), cuda=dev.type == "cuda")
    _check_dim_strides(grad_out, q, k, v)
    if plan.col_groups > 1 and plan.dq is None:
        raise ValueError("a backward plan with col_groups > 1 needs its own dq kernel (Plan.dq)")
    blocks_per_split = triton.cdiv(triton.cdiv(length, plan.block_l), plan.splits)
    size = batch * heads * m * d
    dq = _empty(q.shape, q.dtype, dev)
    dk = _empty(k.shape, k.dtype, dev)
    dv = _empty(v.shape, v.dtype, dev)
    ws = _empty((2, plan.splits, batch * heads, m, d), torch.float32, dev)
    with device_guard(dev):
        n_own = triton.cdiv(plan.n_chunks, plan.col_groups)
        _token_attention_bwd_kernel[(batch * heads * plan.splits, triton.cdiv(plan.n_chunks, n_own))](
            grad_out, q, k, v, dq, ws,
            heads, length, m, d, float(scale), float(scale) * LOG2E, plan.splits, blocks_per_split,
            size, plan.splits * size,
            *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(), *dq.stride(),
            BLOCK_L=plan.block_l, BLOCK_M=plan.block_m, D_CHUNK=plan.d_chunk, N_CHUNKS=plan.n_chunks,
            N_OWN=n_own, PRECISION=plan.precision, WITH_DQ=plan.dq is None, RUNTIME_LOOPS=_runtime_loops(plan), num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
        if plan.dq is not None:
            n_lblocks = triton.cdiv(length, plan.dq.block_l)
            _token_attention_dq_kernel[(batch * heads * n_lblocks,)](
                grad_out, q, k, v, dq,
                heads, length, m, d, float(scale), float(scale) * LOG2E, n_lblocks,
                *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(), *dq.stride(),
                BLOCK_L=plan.dq.block_l, BLOCK_M=plan.dq.block_m, D_CHUNK=plan.dq.d_chunk,
                N_CHUNKS=plan.dq.n_chunks, PRECISION=plan.dq.precision, RUNTIME_LOOPS=_runtime_loops(plan.dq),
                num_warps=plan.dq.num_warps,
                num_stages=plan.dq.num_stages,
            )
        _sum_partials_kernel[(triton.cdiv(size, SUM_BLOCK), 2)](
            ws, dk, dv, size, plan.splits, plan.splits * size, BLOCK=SUM_BLOCK, num_warps=4,
        )
    return dq, dk, dv
def audit_cases(dtype: torch.dtype):
    """Launches users reach (DPPD's CrossFusion: 4…64 prompt tokens, head dims 24…128, 128² training
    patches, 3840x2160 inference) for the compile audit (``cplfast.kernels.audit``)."""
    from .audit import AuditCase, fake

    def case(b, h, length, m, d, *, backward=True, transposed=False):
        def run():
            q = fake((b, h, length, d), dtype, (0, 2, 1, 3) if transposed else None)
            k, v = fake((b, h, m, d), dtype), fake((b, h, m, d), dtype)
            scale = d ** -0.5
            token_attention_forward(q, k, v, scale)
            if backward:
                token_attention_backward(fake((b, h, length, d), dtype), q, k, v, scale)
        return run

    for d in (24, 32, 48, 64, 96, 128):
        for m in (4, 16, 32, 64):
            yield AuditCase(f"train d={d} M={m}", case(8, 2, 64 * 64, m, d), quick=(d, m) in {(48, 16), (96, 64)})
    yield AuditCase("train (B,L,h,d) view d=48 M=16", case(8, 2, 64 * 64, 16, 48, transposed=True))
    for d in (48, 96):
        yield AuditCase(f"3840x2160 infer d={d} M=16", case(1, 1, 3840 * 2160, 16, d, backward=False))
