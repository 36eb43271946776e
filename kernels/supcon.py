"""Flash-style supervised contrastive loss (SPEC §3.5): O(N) memory, never the N x N score matrix.

Queries ``q`` ``(N, D)`` (this rank's rows) against keys ``k`` ``(M, D)`` (the same rows, or every
rank's rows with this rank's block starting at ``offset``). Rows are normalised on the fly through
their inverse norms ``r = 1 / max(|x|, 1e-12)``, so ``S_ij = (q_i . k_j) r_i r_j / tau`` and key
``offset + i`` (query i itself) is excluded. Forward, per query block, over key blocks::

    lse_i = logsumexp_{j != self} S_ij      (online, running max)
    pos_i = sum_{j in P(i)} S_ij,  n_i = |P(i)|,   loss_i = lse_i - pos_i / n_i   (0 when n_i = 0)

Backward (upstream ``g_i``, zero where ``n_i = 0``), ``G_ij = g_i (exp(S_ij - lse_i) - [j in P(i)] / n_i)``::

    dL/dq^_i = sum_j G_ij k^_j / tau          (row term: a pass over key blocks per query block)
    dL/dk^_j = sum_i G_ij q^_i / tau          (column term: a pass over query blocks per key block)

When keys are the queries both terms land on the same rows and ``S`` is symmetric, so one pass per
row block computes ``sum_j (G_ij + G_ji) z^_j / tau`` from a single score tile. No atomics: every
program owns its output rows. The kernels return gradients with respect to the *normalised* rows;
:func:`normalize_backward` applies the normalisation Jacobian.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import device_guard, dot_precision

EPS = 1e-12


@triton.jit
def _scores(x_ptr, y_ptr, x_off, y_off, row_ok, col_ok, D, sx1, sy1,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """Raw dot products ``x_rows . y_cols`` ``(BLOCK_M, BLOCK_N)`` fp32, looping over D.

    ``x_off`` / ``y_off`` are the rows' int64 memory offsets (row index times row stride)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        d64 = d.to(tl.int64)
        x = tl.load(x_ptr + x_off[:, None] + d64[None, :] * sx1, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(y_ptr + y_off[:, None] + d64[None, :] * sy1, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT)
    return acc


@triton.jit
def _supcon_fwd_kernel(
    q_ptr, k_ptr, rq_ptr, rk_ptr, yq_ptr, yk_ptr, loss_ptr, lse_ptr, npos_ptr,
    NQ, NK, D, offset, sq0, sq1, sk0, sk1, syq, syk, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NQ
    rows64 = rows.to(tl.int64)
    q_off = rows64 * sq0
    scale_q = tl.load(rq_ptr + rows, mask=row_ok, other=0.0)
    label_q = tl.load(yq_ptr + rows64 * syq, mask=row_ok, other=0)
    self_col = rows + offset

    run_max = tl.full([BLOCK_M], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    pos_sum = tl.zeros([BLOCK_M], tl.float32)
    n_pos = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        cols64 = cols.to(tl.int64)
        scale_k = tl.load(rk_ptr + cols, mask=col_ok, other=0.0)
        label_k = tl.load(yk_ptr + cols64 * syk, mask=col_ok, other=0)
        s = _scores(q_ptr, k_ptr, q_off, cols64 * sk0, row_ok, col_ok, D, sq1, sk1,
                    BLOCK_M, BLOCK_N, BLOCK_D, DOT)
        s = s * (scale_q[:, None] * scale_k[None, :]) * inv_tau  # symmetric in (i, j), as in backward
        live = col_ok[None, :] & (cols[None, :] != self_col[:, None])
        s_live = tl.where(live, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s_live, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s_live - new_max[:, None]), axis=1)
        run_max = new_max
        pos = live & (label_k[None, :] == label_q[:, None])
        pos_sum += tl.sum(tl.where(pos, s, 0.0), axis=1)
        n_pos += tl.sum(pos.to(tl.int32), axis=1)

    has_keys = run_sum > 0  # false only for a query with no other key at all
    lse = tl.where(has_keys, run_max + tl.log(tl.where(has_keys, run_sum, 1.0)), float("-inf"))
    loss = tl.where(n_pos > 0, lse - pos_sum / tl.maximum(n_pos, 1).to(tl.float32), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(npos_ptr + rows, n_pos, mask=row_ok)


@triton.jit
def _pair_grad(s, live, pos, lse, n_pos, g):
    """``G`` entries for the queries whose (lse, n_pos, g) broadcast against ``s``; 0 off ``live``."""
    has = n_pos > 0
    coef = tl.where(has, g, 0.0)
    inv_n = 1.0 / tl.maximum(n_pos, 1).to(tl.float32)
    prob = tl.exp(tl.where(live & has, s - lse, float("-inf")))
    return tl.where(live, coef * (prob - tl.where(pos, inv_n, 0.0)), 0.0)


@triton.jit
def _supcon_bwd_kernel(
    x_ptr, y_ptr, rx_ptr, ry_ptr, yx_ptr, yy_ptr, lse_ptr, npos_ptr, g_ptr, out_ptr,
    NX, NY, D, x_shift, y_shift, sx0, sx1, sy0, sy1, syx, syy, sg, inv_tau,
    ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT: tl.constexpr,
):
    """``out[x rows, D chunk]`` = gradient w.r.t. the normalised rows of x (fp32, contiguous).

    ``ROW_TERM``: x are the queries (stats indexed by x rows), y the keys. ``COL_TERM``: x are the keys,
    y the queries (stats indexed by y rows). Both: x and y are the same rows. The pair (i, j) is
    excluded when ``i + x_shift == j + y_shift``.
    """
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NX
    rows64 = rows.to(tl.int64)
    x_off = rows64 * sx0
    scale_x = tl.load(rx_ptr + rows, mask=row_ok, other=0.0)
    label_x = tl.load(yx_ptr + rows64 * syx, mask=row_ok, other=0)
    self_x = rows + x_shift
    lse_r = tl.zeros([BLOCK_M], tl.float32)
    npos_r = tl.zeros([BLOCK_M], tl.int32)
    g_r = tl.zeros([BLOCK_M], tl.float32)
    if ROW_TERM:  # the stats are indexed by query, i.e. by x rows only when x are the queries
        lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        npos_r = tl.load(npos_ptr + rows, mask=row_ok, other=0)
        g_r = tl.load(g_ptr + rows64 * sg, mask=row_ok, other=0.0).to(tl.float32)
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_out_ok = d_out < D
    d_out64 = d_out.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for n0 in range(0, NY, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NY
        cols64 = cols.to(tl.int64)
        y_off = cols64 * sy0
        scale_y = tl.load(ry_ptr + cols, mask=col_ok, other=0.0)
        label_y = tl.load(yy_ptr + cols64 * syy, mask=col_ok, other=0)
        s = _scores(x_ptr, y_ptr, x_off, y_off, row_ok, col_ok, D, sx1, sy1,
                    BLOCK_M, BLOCK_N, BLOCK_D, DOT)
        s = s * (scale_x[:, None] * scale_y[None, :]) * inv_tau
        live = row_ok[:, None] & col_ok[None, :] & (self_x[:, None] != (cols + y_shift)[None, :])
        pos = live & (label_x[:, None] == label_y[None, :])
        grad_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if ROW_TERM:
            grad_s += _pair_grad(s, live, pos, lse_r[:, None], npos_r[:, None], g_r[:, None])
        if COL_TERM:
            lse_c = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
            npos_c = tl.load(npos_ptr + cols, mask=col_ok, other=0)
            g_c = tl.load(g_ptr + cols64 * sg, mask=col_ok, other=0.0).to(tl.float32)
            grad_s += _pair_grad(s, live, pos, lse_c[None, :], npos_c[None, :], g_c[None, :])
        # the weights stay fp32 (|g| / N reaches 1e-9, below fp16's smallest subnormal); 16-bit rows are
        # exact in TF32, so their products take DOT = "tf32"
        y_out = tl.load(y_ptr + y_off[:, None] + d_out64[None, :] * sy1,
                        mask=col_ok[:, None] & d_out_ok[None, :], other=0.0).to(tl.float32)
        weights = grad_s * scale_y[None, :]
        acc = tl.dot(weights, y_out, acc, input_precision=DOT)
    tl.store(out_ptr + rows64[:, None] * D + d_out64[None, :], acc * inv_tau,
             mask=row_ok[:, None] & d_out_ok[None, :])


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, fp32 ``(N,)``."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    return row_norms(x).clamp_min(EPS).reciprocal()


def cuda_config(dtype: torch.dtype, d: int, precision: str, backward: bool = False) -> dict:
    """Tile sizes of a CUDA launch for rows of width ``d``, ``precision`` from :func:`dot_precision`.

    ``BLOCK_M`` queries (or gradient rows) per program against ``BLOCK_N`` keys per step, products
    accumulated over ``BLOCK_D``-wide slices of D; the backward writes ``BLOCK_DO`` gradient columns
    per program (all of D up to 256: no score recomputation; else 128-wide chunks, grid axis 1).
    Sizes keep the sm_90 and sm_80 builds of both kernels free of register spills in every precision
    (checked by ``python -m cplfast.kernels.audit`` with Triton 3.6 and the newest Triton; "tf32" for
    fp32 rows, which the audit's matrix leaves out, checked the same way): fp32 products in full
    precision run on FMA units and need the narrowest D slices.
    """
    p2 = triton.next_power_of_2(d)
    if dtype != torch.float32:
        chunk = 64
    else:
        chunk = {"ieee": 16, "tf32x3": 32, "tf32": 32}[precision]
    cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=max(16, min(p2, chunk)), num_warps=8)
    if backward or (precision == "tf32x3" and dtype == torch.float32):
        # the backward also holds a (BLOCK_M, BLOCK_DO) fp32 accumulator; tf32x3 splits operands in hi/lo
        cfg["BLOCK_M"] = 32
    if backward:
        cfg["BLOCK_DO"] = max(16, p2 if p2 <= 256 else 128)
        if dtype == torch.float32:  # fp32 (BLOCK_N, BLOCK_DO) rows for the gradient product
            cfg["BLOCK_N"] = 16
            cfg["num_stages"] = 2  # three stages of prefetched fp32 rows spill at D = 300
            if precision == "tf32":  # ptxas settles on 128 registers here: narrower slices, no prefetch
                cfg.update(BLOCK_D=16, num_stages=1)
    return cfg


def _config(x: torch.Tensor, backward: bool = False) -> dict:
    """Tile sizes for rows ``x``: :func:`cuda_config` on CUDA; few, large programs under the interpreter."""
    if x.device.type == "cuda":
        return cuda_config(x.dtype, x.shape[1], dot_precision(x.dtype, x.device), backward)
    p2 = triton.next_power_of_2(x.shape[1])
    cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=max(16, min(p2, 128)))
    if backward:
        cfg["BLOCK_DO"] = max(16, p2)
    return cfg


def supcon_forward(
    q: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None, key_labels: torch.Tensor | None,
    offset: int, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query ``(loss fp32 (N,), lse fp32 (N,), n_pos int32 (N,))``; ``keys=None`` means keys = q.

    One launch, grid ``(cdiv(N, BLOCK_M),)``."""
    if keys is None:
        keys, key_labels, offset = q, labels, 0
    n = q.shape[0]
    cfg = _config(q)
    loss = torch.empty(n, device=q.device, dtype=torch.float32)
    lse = torch.empty(n, device=q.device, dtype=torch.float32)
    n_pos = torch.empty(n, device=q.device, dtype=torch.int32)
    inv_q = _inverse_norms(q)
    inv_k = inv_q if keys is q else _inverse_norms(keys)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    with device_guard(q.device):
        _supcon_fwd_kernel[grid](
            q, keys, inv_q, inv_k, labels, key_labels, loss, lse, n_pos,
            n, keys.shape[0], q.shape[1], offset, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
            labels.stride(0), key_labels.stride(0), 1.0 / temperature, DOT=dot_precision(q.dtype, q.device), **cfg,
        )
    return loss, lse, n_pos


def _normalized_grad(x, inv_x, labels_x, y, inv_y, labels_y, x_shift, y_shift, lse, n_pos, grad, temperature,
                     row_term, col_term):
    n, d = x.shape
    cfg = _config(x, backward=True)
    out = torch.empty((n, d), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"]))
    with device_guard(x.device):
        _supcon_bwd_kernel[grid](
            x, y, inv_x, inv_y, labels_x, labels_y, lse, n_pos, grad, out,
            n, y.shape[0], d, x_shift, y_shift, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            labels_x.stride(0), labels_y.stride(0), grad.stride(0), 1.0 / temperature,
            ROW_TERM=row_term, COL_TERM=col_term, DOT=dot_precision(x.dtype, x.device), **cfg,
        )
    return out


def normalize_backward(x: torch.Tensor, grad_normalized: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of ``x / max(|x|, eps)`` (rows) given the gradient w.r.t. the result.

    ``dx = (G - [|x| > eps] x^ (x^ . G)) / max(|x|, eps)``, in x's dtype.
    """
    norm = row_norms(x).unsqueeze(1)
    inv = norm.clamp_min(EPS).reciprocal()
    unit = x.to(torch.float32) * inv
    radial = (unit * grad_normalized).sum(dim=1, keepdim=True) * (norm > EPS)
    return (inv * (grad_normalized - unit * radial)).to(x.dtype)


def supcon_backward(
    grad: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None,
    key_labels: torch.Tensor | None, offset: int, temperature: float, lse: torch.Tensor, n_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dq, dkeys)`` from the per-query upstream gradient ``grad`` (N,) (any stride, 0 included);
    ``dkeys`` is None when ``keys`` is None (the keys are q and both terms are in ``dq``).

    One launch (keys = q) or two (gathered keys: the query rows, then the key rows), grid
    ``(cdiv(rows, BLOCK_M), cdiv(D, BLOCK_DO))``; the normalisation Jacobian is applied with torch ops.
    """
    inv_q = _inverse_norms(q)
    if keys is None:
        g = _normalized_grad(q, inv_q, labels, q, inv_q, labels, 0, 0, lse, n_pos, grad, temperature, True, True)
        return normalize_backward(q, g), None
    inv_k = _inverse_norms(keys)
    gq = _normalized_grad(q, inv_q, labels, keys, inv_k, key_labels, offset, 0, lse, n_pos, grad, temperature,
                          True, False)
    gk = _normalized_grad(keys, inv_k, key_labels, q, inv_q, labels, 0, offset, lse, n_pos, grad, temperature,
                          False, True)
    return normalize_backward(q, gq), normalize_backward(keys, gk)


def audit_cases(dtype: torch.dtype):
    """Launches users reach (SPEC §8: N = 16k, D = 256; N = 131,072; keys gathered from 64 ranks;
    D = 64…1024) for the compile audit (``cplfast.kernels.audit``)."""
    from .audit import AuditCase, fake

    def case(n, d, *, ranks=1, order=None):
        def run():
            q, labels = fake((n, d), dtype, order), fake((n,), torch.int64)
            keys = key_labels = None
            offset = 0
            if ranks > 1:
                keys, key_labels, offset = fake((n * ranks, d), dtype), fake((n * ranks,), torch.int64), n * (ranks - 1)
            loss, lse, n_pos = supcon_forward(q, labels, keys, key_labels, offset, 0.1)
            supcon_backward(fake((n,), torch.float32), q, labels, keys, key_labels, offset, 0.1, lse, n_pos)
        return run

    yield AuditCase("N=16384 D=256", case(16384, 256), quick=True)
    yield AuditCase("N=131072 D=256", case(131072, 256))
    yield AuditCase("N=2048 D=256 keys from 64 ranks", case(2048, 256, ranks=64), quick=True)
    for d in (64, 128, 300, 512, 1024):
        yield AuditCase(f"N=4096 D={d}", case(4096, d))
    yield AuditCase("N=4096 D=256 column-major z", case(4096, 256, order=(1, 0)))
