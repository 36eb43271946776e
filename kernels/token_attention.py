"""Triton kernels for prompt-token attention (SPEC §3.3) and their launchers.

q ``(B,h,L,d)`` (pixels); k, v ``(B,h,M,d)`` with few prompt tokens (M <= 64)::

    S = q @ k^T * scale            (L, M) per (b,h)
    P = softmax(S, -1)
    out = P @ v

All M keys and values of a (b,h) fit in one tile, so each program loads them once and streams its
share of the pixels: one exact softmax per row, no online rescaling.

Backward (P recomputed from q and k; nothing but the inputs is saved)::

    dP = dout @ v^T,   dS = P * (dP - rowsum(P * dP))        (rowsum over all M keys, in registers)
    dq = scale * dS @ k                                     (written per pixel block)
    dk = scale * sum_L dS^T @ q,   dv = sum_L P^T @ dout     (reductions over L)

The reductions over L accumulate in registers over each program's share of the pixels and are written
as fp32 partials ``(B*h, splits, M, d)``, then summed in a fixed order: deterministic, unlike fp32
atomics, and cheap, as a partial is only ``M x d`` against the ``L x d`` tiles that produced it.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import triton
import triton.language as tl

from .channel_attention import default_splits, dot_precision


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (tests poison it with NaN)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@triton.jit
def _token_probs(q, k_t, scale, tok_ok, PRECISION: tl.constexpr):
    """Softmax over the M tokens of ``q @ k^T * scale``; padded tokens get probability 0."""
    scores = tl.dot(q, k_t, input_precision=PRECISION) * scale
    scores = tl.where(tok_ok[None, :], scores, float("-inf"))
    expd = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    return expd / tl.sum(expd, axis=1)[:, None]


@triton.jit
def _token_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    H, L, M, D, scale, blocks_per_split,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    so_b, so_h, so_l, so_d,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    batch = (pid_bh // H).to(tl.int64)
    head = (pid_bh % H).to(tl.int64)

    tok = tl.arange(0, BLOCK_M)
    dim = tl.arange(0, BLOCK_D)
    tok_ok = tok < M
    dim_ok = dim < D
    k_base = k_ptr + batch * sk_b + head * sk_h
    v_base = v_ptr + batch * sv_b + head * sv_h
    k_t = tl.load(k_base + tok[None, :] * sk_m + dim[:, None] * sk_d, mask=dim_ok[:, None] & tok_ok[None, :], other=0.0)
    v = tl.load(v_base + tok[:, None] * sv_m + dim[None, :] * sv_d, mask=tok_ok[:, None] & dim_ok[None, :], other=0.0)
    k_t = k_t.to(tl.float32)
    v = v.to(tl.float32)

    q_base = q_ptr + batch * sq_b + head * sq_h
    o_base = out_ptr + batch * so_b + head * so_h
    first = split.to(tl.int64) * blocks_per_split * BLOCK_L
    for i in range(0, blocks_per_split):
        pix = first + i * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = (pix[:, None] < L) & dim_ok[None, :]
        q = tl.load(q_base + pix[:, None] * sq_l + dim[None, :] * sq_d, mask=mask, other=0.0).to(tl.float32)
        probs = _token_probs(q, k_t, scale, tok_ok, PRECISION)
        out = tl.dot(probs, v, input_precision=PRECISION)
        tl.store(o_base + pix[:, None] * so_l + dim[None, :] * so_d, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_attention_bwd_kernel(
    dout_ptr, q_ptr, k_ptr, v_ptr, dq_ptr, dk_ws, dv_ws,
    H, L, M, D, scale, blocks_per_split,
    sg_b, sg_h, sg_l, sg_d,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sdq_b, sdq_h, sdq_l, sdq_d,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    batch = (pid_bh // H).to(tl.int64)
    head = (pid_bh % H).to(tl.int64)

    tok = tl.arange(0, BLOCK_M)
    dim = tl.arange(0, BLOCK_D)
    tok_ok = tok < M
    dim_ok = dim < D
    tile_mask = tok_ok[:, None] & dim_ok[None, :]
    tile_mask_t = dim_ok[:, None] & tok_ok[None, :]
    k_base = k_ptr + batch * sk_b + head * sk_h
    v_base = v_ptr + batch * sv_b + head * sv_h
    k = tl.load(k_base + tok[:, None] * sk_m + dim[None, :] * sk_d, mask=tile_mask, other=0.0).to(tl.float32)
    k_t = tl.load(k_base + tok[None, :] * sk_m + dim[:, None] * sk_d, mask=tile_mask_t, other=0.0).to(tl.float32)
    v_t = tl.load(v_base + tok[None, :] * sv_m + dim[:, None] * sv_d, mask=tile_mask_t, other=0.0).to(tl.float32)

    dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    g_base = dout_ptr + batch * sg_b + head * sg_h
    q_base = q_ptr + batch * sq_b + head * sq_h
    dq_base = dq_ptr + batch * sdq_b + head * sdq_h
    first = split.to(tl.int64) * blocks_per_split * BLOCK_L
    for i in range(0, blocks_per_split):
        pix = first + i * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = (pix[:, None] < L) & dim_ok[None, :]
        q = tl.load(q_base + pix[:, None] * sq_l + dim[None, :] * sq_d, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(g_base + pix[:, None] * sg_l + dim[None, :] * sg_d, mask=mask, other=0.0).to(tl.float32)
        probs = _token_probs(q, k_t, scale, tok_ok, PRECISION)
        dprobs = tl.dot(dout, v_t, input_precision=PRECISION)
        dscores = probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])
        dq = tl.dot(dscores, k, input_precision=PRECISION) * scale
        tl.store(dq_base + pix[:, None] * sdq_l + dim[None, :] * sdq_d, dq.to(dq_ptr.dtype.element_ty), mask=mask)
        # rows past L have q = 0 (uniform probs) but dout = 0, so they add nothing below
        dk += tl.dot(tl.trans(dscores), q, input_precision=PRECISION)
        dv += tl.dot(tl.trans(probs), dout, input_precision=PRECISION)

    part = (pid_bh.to(tl.int64) * n_splits + split) * M * D
    tile = tok[:, None] * D + dim[None, :]
    tl.store(dk_ws + part + tile, dk * scale, mask=tile_mask)
    tl.store(dv_ws + part + tile, dv, mask=tile_mask)


class _Plan:
    def __init__(self, q: torch.Tensor, k: torch.Tensor, block_l: int | None, splits: int | None):
        batch, heads, length, d = q.shape
        self.bh = batch * heads
        self.length = length
        self.m = k.shape[2]
        self.d = d
        self.block_m = max(16, triton.next_power_of_2(self.m))
        self.block_d = max(16, triton.next_power_of_2(d))
        on_gpu = q.device.type == "cuda"
        tile = self.block_m * self.block_d  # registers per M x d tile; the backward holds ~5 of them
        self.block_l = block_l or (32 if on_gpu and tile > 64 * 64 else 64)
        self.blocks = triton.cdiv(length, self.block_l)
        self.splits = min(splits or default_splits(q.device, self.bh, self.blocks), self.blocks)
        self.blocks_per_split = triton.cdiv(self.blocks, self.splits)
        self.num_warps = 8 if tile >= 64 * 64 else 4
        self.precision = dot_precision(q.dtype, q.device)


def _guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def token_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    block_l: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` -> ``(B,h,L,d)`` in q's dtype (contiguous)."""
    plan = _Plan(q, k, block_l, splits)
    heads = q.shape[1]
    out = _empty(q.shape, q.dtype, q.device)
    with _guard(q.device):
        _token_attention_fwd_kernel[(plan.bh, plan.splits)](
            q, k, v, out,
            heads, plan.length, plan.m, plan.d, float(scale), plan.blocks_per_split,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            BLOCK_L=plan.block_l, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, PRECISION=plan.precision,
            num_warps=plan.num_warps,
        )
    return out


def token_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    block_l: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv)`` in the inputs' dtype (contiguous)."""
    plan = _Plan(q, k, block_l, splits)
    batch, heads = q.shape[:2]
    dev = q.device
    dq = _empty(q.shape, q.dtype, dev)
    dk_ws = _empty((batch, heads, plan.splits, plan.m, plan.d), torch.float32, dev)
    dv_ws = _empty((batch, heads, plan.splits, plan.m, plan.d), torch.float32, dev)
    with _guard(dev):
        _token_attention_bwd_kernel[(plan.bh, plan.splits)](
            grad_out, q, k, v, dq, dk_ws, dv_ws,
            heads, plan.length, plan.m, plan.d, float(scale), plan.blocks_per_split,
            *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(), *dq.stride(),
            BLOCK_L=plan.block_l, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, PRECISION=plan.precision,
            num_warps=plan.num_warps,
        )
        dk = dk_ws.sum(dim=2).to(k.dtype)
        dv = dv_ws.sum(dim=2).to(v.dtype)
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
        for m in (4, 16, 64):
            yield AuditCase(f"train d={d} M={m}", case(8, 2, 64 * 64, m, d), quick=(d, m) in {(48, 16), (96, 64)})
    yield AuditCase("train (B,L,h,d) view d=48 M=16", case(8, 2, 64 * 64, 16, 48, transposed=True))
    for d in (48, 96):
        yield AuditCase(f"3840x2160 infer d={d} M=16", case(1, 1, 3840 * 2160, 16, d, backward=False))
