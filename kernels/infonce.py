"""Fused InfoNCE (SPEC §3.4): one pass over anchor, positive and K negatives per block of locations.

Every input is viewed as ``(locations, channels)`` through its own strides: the reduced ``dim`` is the
channel axis and the other (up to three) axes enumerate locations in row-major order, so NCHW,
channels-last, sliced and ``(N, D)`` inputs are all read in place. With ``a``, ``p``, ``n_k`` the
L2-normalised vectors at one location (eps 1e-12) and ``tau`` the temperature::

    s_p = a.p / tau,   s_k = a.n_k / tau,   loss = logsumexp(s_p, s_1..s_K) - s_p

Forward writes the loss (the per-location map for ``reduction="none"``, else one fp32 partial sum
per block, summed afterwards in a fixed order) and ``stats`` ``(2K+3, L)`` fp32: the norms
``|a|, |p|, |n_1|..|n_K|`` and the logits ``s_p, s_1..s_K``. Backward rereads the inputs once and
uses ``stats`` instead of recomputing the reductions. With ``w = softmax(s)``, upstream ``g``::

    c_p = g (w_p - 1) / tau,   c_k = g w_k / tau
    dL/da^ = c_p p^ + sum_k c_k n^_k,   dL/dp^ = c_p a^,   dL/dn^_k = c_k a^
    dx = (G - [|x| > eps] x^ (x^.G)) / max(|x|, eps)        (normalisation Jacobian, G = dL/dx^)

where ``x^.G`` is known from the logits: ``a^.G_a = tau (c_p s_p + sum_k c_k s_k)`` and so on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import device_guard

EPS = tl.constexpr(1e-12)  # F.normalize eps; a constexpr so the kernels may read it


@triton.jit
def _location_offsets(loc, size1, size2, s0, s1, s2):
    """Memory offsets (int64) of flat row-major locations ``loc`` over dims of sizes (*, size1, size2)."""
    loc = loc.to(tl.int64)
    i2 = loc % size2
    rest = loc // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small x (Goldberg's correction), from tl.log alone."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _infonce_fwd_kernel(
    a_ptr, p_ptr, n_ptr, loss_ptr, stats_ptr,
    L, C, K, size1, size2,
    sa0, sa1, sa2, sac,
    sp0, sp1, sp2, spc,
    snk, sn0, sn1, sn2, snc,
    inv_tau,
    REDUCE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    loc = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    loc_ok = loc < L
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    off_a = _location_offsets(loc, size1, size2, sa0, sa1, sa2)
    off_p = _location_offsets(loc, size1, size2, sp0, sp1, sp2)
    off_n = _location_offsets(loc, size1, size2, sn0, sn1, sn2)[None, :] + ks.to(tl.int64)[:, None] * snk

    aa = tl.zeros([BLOCK_L], tl.float32)
    pp = tl.zeros([BLOCK_L], tl.float32)
    ap = tl.zeros([BLOCK_L], tl.float32)
    an = tl.zeros([BLOCK_K, BLOCK_L], tl.float32)
    nn = tl.zeros([BLOCK_K, BLOCK_L], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ch = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        ch_ok = ch < C
        mask2 = loc_ok[:, None] & ch_ok[None, :]
        a = tl.load(a_ptr + off_a[:, None] + ch[None, :] * sac, mask=mask2, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + off_p[:, None] + ch[None, :] * spc, mask=mask2, other=0.0).to(tl.float32)
        n = tl.load(
            n_ptr + off_n[:, :, None] + ch[None, None, :] * snc,
            mask=k_ok[:, None, None] & mask2[None, :, :],
            other=0.0,
        ).to(tl.float32)
        aa += tl.sum(a * a, axis=1)
        pp += tl.sum(p * p, axis=1)
        ap += tl.sum(a * p, axis=1)
        an += tl.sum(a[None, :, :] * n, axis=2)
        nn += tl.sum(n * n, axis=2)

    norm_a = tl.sqrt(aa)
    norm_p = tl.sqrt(pp)
    norm_n = tl.sqrt(nn)
    scale_a = inv_tau / tl.maximum(norm_a, EPS)
    s_p = ap * scale_a / tl.maximum(norm_p, EPS)
    s_n = an * scale_a[None, :] / tl.maximum(norm_n, EPS)
    s_n = tl.where(k_ok[:, None], s_n, float("-inf"))
    # loss = (m - s_p) + log(sum exp(s - m)), the sum written as 1 + rest so that a well-separated
    # positive (loss near 0) keeps its relative accuracy instead of cancelling lse - s_p
    m = tl.maximum(s_p, tl.max(s_n, axis=0))
    rest = (tl.exp(s_p - m) - 1.0) + tl.sum(tl.exp(s_n - m[None, :]), axis=0)
    loss = (m - s_p) + _log1p(rest)

    row = L.to(tl.int64)  # stats rows are L apart: (2K + 3) L passes 2^31 at 4K output and K >= 6
    loc64 = loc.to(tl.int64)
    tl.store(stats_ptr + loc64, norm_a, mask=loc_ok)
    tl.store(stats_ptr + row + loc64, norm_p, mask=loc_ok)
    n_rows = (2 + ks).to(tl.int64)[:, None] * row + loc64[None, :]
    tl.store(stats_ptr + n_rows, norm_n, mask=k_ok[:, None] & loc_ok[None, :])
    tl.store(stats_ptr + (K + 2) * row + loc64, s_p, mask=loc_ok)
    tl.store(stats_ptr + (K + 1) * row + n_rows, s_n, mask=k_ok[:, None] & loc_ok[None, :])

    if REDUCE:
        tl.store(loss_ptr + pid, tl.sum(tl.where(loc_ok, loss, 0.0), axis=0))
    else:
        tl.store(loss_ptr + loc64, loss.to(loss_ptr.dtype.element_ty), mask=loc_ok)


@triton.jit
def _infonce_bwd_kernel(
    grad_ptr, a_ptr, p_ptr, n_ptr, stats_ptr, da_ptr, dp_ptr, dn_ptr,
    L, C, K, size1, size2,
    sg0, sg1, sg2,
    sa0, sa1, sa2, sac,
    sp0, sp1, sp2, spc,
    snk, sn0, sn1, sn2, snc,
    sda0, sda1, sda2, sdac,
    sdp0, sdp1, sdp2, sdpc,
    sdnk, sdn0, sdn1, sdn2, sdnc,
    tau, grad_scale,
    GRAD_IS_MAP: tl.constexpr, WRITE_A: tl.constexpr, WRITE_P: tl.constexpr, WRITE_N: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    loc = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    loc_ok = loc < L
    loc64 = loc.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    kl_ok = k_ok[:, None] & loc_ok[None, :]

    row = L.to(tl.int64)
    n_rows = (2 + ks).to(tl.int64)[:, None] * row + loc64[None, :]
    norm_a = tl.load(stats_ptr + loc64, mask=loc_ok, other=1.0)
    norm_p = tl.load(stats_ptr + row + loc64, mask=loc_ok, other=1.0)
    norm_n = tl.load(stats_ptr + n_rows, mask=kl_ok, other=1.0)
    s_p = tl.load(stats_ptr + (K + 2) * row + loc64, mask=loc_ok, other=0.0)
    s_n = tl.load(stats_ptr + (K + 1) * row + n_rows, mask=kl_ok, other=0.0)
    if GRAD_IS_MAP:  # read through its strides: sum().backward() hands over an expanded (stride-0) map
        off_g = _location_offsets(loc, size1, size2, sg0, sg1, sg2)
        g = tl.load(grad_ptr + off_g, mask=loc_ok, other=0.0).to(tl.float32) * grad_scale
    else:
        g = tl.load(grad_ptr).to(tl.float32) * grad_scale + tl.zeros([BLOCK_L], tl.float32)
    g = tl.where(loc_ok, g, 0.0)

    s_n_live = tl.where(k_ok[:, None], s_n, float("-inf"))
    m = tl.maximum(s_p, tl.max(s_n_live, axis=0))
    e_p = tl.exp(s_p - m)
    e_n = tl.exp(s_n_live - m[None, :])
    negative_mass = tl.sum(e_n, axis=0)
    total = e_p + negative_mass
    inv_tau = 1.0 / tau
    c_p = -g * (negative_mass / total) * inv_tau  # w_p - 1 without cancelling when w_p is near 1
    c_n = g[None, :] * (e_n / total[None, :]) * inv_tau
    r_a = 1.0 / tl.maximum(norm_a, EPS)
    r_p = 1.0 / tl.maximum(norm_p, EPS)
    r_n = 1.0 / tl.maximum(norm_n, EPS)
    # x^.G for each input (the radial part removed by the normalisation Jacobian); zero below eps
    proj_a = tl.where(norm_a > EPS, tau * (c_p * s_p + tl.sum(c_n * s_n, axis=0)), 0.0)
    proj_p = tl.where(norm_p > EPS, tau * c_p * s_p, 0.0)
    proj_n = tl.where((norm_n > EPS) & k_ok[:, None], tau * c_n * s_n, 0.0)
    # per-location coefficients so that each gradient is a combination of the raw inputs
    a_from_p = r_a * c_p * r_p
    a_from_n = r_a[None, :] * c_n * r_n
    a_self = r_a * r_a * proj_a
    p_from_a = r_p * c_p * r_a
    p_self = r_p * r_p * proj_p
    n_from_a = r_n * c_n * r_a[None, :]
    n_self = r_n * r_n * proj_n

    off_a = _location_offsets(loc, size1, size2, sa0, sa1, sa2)
    off_p = _location_offsets(loc, size1, size2, sp0, sp1, sp2)
    off_n = _location_offsets(loc, size1, size2, sn0, sn1, sn2)[None, :] + ks.to(tl.int64)[:, None] * snk
    off_da = _location_offsets(loc, size1, size2, sda0, sda1, sda2)
    off_dp = _location_offsets(loc, size1, size2, sdp0, sdp1, sdp2)
    off_dn = _location_offsets(loc, size1, size2, sdn0, sdn1, sdn2)[None, :] + ks.to(tl.int64)[:, None] * sdnk
    for c0 in range(0, C, BLOCK_C):
        ch = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        ch_ok = ch < C
        mask2 = loc_ok[:, None] & ch_ok[None, :]
        mask3 = k_ok[:, None, None] & mask2[None, :, :]
        a = tl.load(a_ptr + off_a[:, None] + ch[None, :] * sac, mask=mask2, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + off_p[:, None] + ch[None, :] * spc, mask=mask2, other=0.0).to(tl.float32)
        n = tl.load(n_ptr + off_n[:, :, None] + ch[None, None, :] * snc, mask=mask3, other=0.0).to(tl.float32)
        if WRITE_A:
            da = a_from_p[:, None] * p + tl.sum(a_from_n[:, :, None] * n, axis=0) - a_self[:, None] * a
            tl.store(da_ptr + off_da[:, None] + ch[None, :] * sdac, da.to(da_ptr.dtype.element_ty), mask=mask2)
        if WRITE_P:
            dp = p_from_a[:, None] * a - p_self[:, None] * p
            tl.store(dp_ptr + off_dp[:, None] + ch[None, :] * sdpc, dp.to(dp_ptr.dtype.element_ty), mask=mask2)
        if WRITE_N:
            dn = n_from_a[:, :, None] * a[None, :, :] - n_self[:, :, None] * n
            tl.store(
                dn_ptr + off_dn[:, :, None] + ch[None, None, :] * sdnc, dn.to(dn_ptr.dtype.element_ty), mask=mask3
            )


def _location_layout(t: torch.Tensor, dim: int) -> tuple[list[int], list[int], int]:
    """Sizes and strides of the (front-padded to 3) location dims of ``t``, and its channel stride."""
    others = [d for d in range(t.dim()) if d != dim]
    sizes = [1] * (3 - len(others)) + [t.shape[d] for d in others]
    strides = [0] * (3 - len(others)) + [t.stride(d) for d in others]
    return sizes, strides, t.stride(dim)


def cuda_blocks(channels: int, num_negatives: int, channel_contiguous: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_L, BLOCK_C, BLOCK_K, num_warps)`` of a CUDA launch.

    Each program holds a ``BLOCK_K x BLOCK_L x BLOCK_C`` tile of negatives; the tile is capped, and spread
    over 8 warps, so that the sm_90 and sm_80 builds do not spill registers in any dtype
    (``python -m cplfast.kernels.audit``, Triton 3.6 and the newest); channel-contiguous inputs
    (channels-last, ``(N, D)``) need the smaller tile.
    """
    block_k = triton.next_power_of_2(max(num_negatives, 1))
    block_c_max = triton.next_power_of_2(channels)
    budget = 2048 if channel_contiguous else 4096
    block_c = max(1, min(block_c_max, 16, budget // (block_k * 64)))
    block_l = max(16, min(64, budget // (block_k * block_c)))
    return block_l, block_c, block_k, 8


def _blocks(anchor: torch.Tensor, dim: int, num_negatives: int) -> tuple[int, int, int, int]:
    """``(BLOCK_L, BLOCK_C, BLOCK_K, num_warps)``: :func:`cuda_blocks` on CUDA; under the interpreter few,
    large programs (all channels of a small C in one chunk)."""
    if anchor.device.type == "cuda":
        return cuda_blocks(anchor.shape[dim], num_negatives, anchor.stride(dim) == 1)
    block_k = triton.next_power_of_2(max(num_negatives, 1))
    block_l = 128
    channels = triton.next_power_of_2(anchor.shape[dim])
    return block_l, max(1, min(channels, (1 << 15) // (block_k * block_l), 64)), block_k, 4


def num_locations(anchor: torch.Tensor, dim: int) -> int:
    return anchor.numel() // anchor.shape[dim]


def stats_rows(num_negatives: int) -> int:
    return 2 * num_negatives + 3


def infonce_forward(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float, dim: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (scalar, or the map of anchor's shape without ``dim``) and ``stats`` ``(2K+3, L)`` fp32.

    One launch, grid ``(cdiv(L, BLOCK_L),)``; the per-block partial sums are then summed by torch."""
    num_neg, channels = negatives.shape[0], anchor.shape[dim]
    locations = num_locations(anchor, dim)
    block_l, block_c, block_k, num_warps = _blocks(anchor, dim, num_neg)
    grid = (triton.cdiv(locations, block_l),)
    stats = torch.empty((stats_rows(num_neg), locations), device=anchor.device, dtype=torch.float32)
    reduce = reduction != "none"
    if reduce:
        loss_buf = torch.empty(grid[0], device=anchor.device, dtype=torch.float32)
    else:
        loss_buf = torch.empty(
            [s for d, s in enumerate(anchor.shape) if d != dim], device=anchor.device, dtype=anchor.dtype
        )
    sizes, sa, sac = _location_layout(anchor, dim)
    _, sp, spc = _location_layout(positive, dim)
    neg = negatives if num_neg > 0 else anchor.unsqueeze(0)  # never read when K = 0
    _, sn, snc = _location_layout(neg.select(0, 0), dim)
    with device_guard(anchor.device):
        _infonce_fwd_kernel[grid](
            anchor, positive, neg, loss_buf, stats,
            locations, channels, num_neg, sizes[1], sizes[2],
            *sa, sac, *sp, spc, neg.stride(0), *sn, snc,
            1.0 / temperature,
            REDUCE=reduce, BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
        )
    if not reduce:
        return loss_buf, stats
    total = loss_buf.sum()
    if reduction == "mean":
        total = total / locations
    return total.to(anchor.dtype), stats


def infonce_backward(
    grad: torch.Tensor, anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
    stats: torch.Tensor, temperature: float, dim: int, reduction: str,
    need_anchor: bool, need_positive: bool, need_negatives: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients to (anchor, positive, negatives), ``None`` where not needed.

    ``grad`` is the upstream gradient: a scalar for ``mean``/``sum``, the loss map for ``none`` (read
    through its strides). Gradients keep their input's memory layout when it is dense (``empty_like``).
    One launch, grid ``(cdiv(L, BLOCK_L),)``.
    """
    num_neg, channels = negatives.shape[0], anchor.shape[dim]
    locations = num_locations(anchor, dim)
    block_l, block_c, block_k, num_warps = _blocks(anchor, dim, num_neg)
    grid = (triton.cdiv(locations, block_l),)
    grad_is_map = reduction == "none"
    if grad_is_map:
        _, sg, _ = _location_layout(grad.unsqueeze(dim), dim)
    else:
        grad, sg = grad.reshape(1), [0, 0, 0]
    grad_scale = 1.0 / locations if reduction == "mean" else 1.0
    d_anchor = torch.empty_like(anchor) if need_anchor else None
    d_positive = torch.empty_like(positive) if need_positive else None
    d_negatives = torch.empty_like(negatives) if need_negatives else None
    write_n = need_negatives and num_neg > 0

    neg = negatives if num_neg > 0 else anchor.unsqueeze(0)
    d_neg = d_negatives if write_n else neg
    sizes, sa, sac = _location_layout(anchor, dim)
    _, sp, spc = _location_layout(positive, dim)
    _, sn, snc = _location_layout(neg.select(0, 0), dim)
    da = d_anchor if need_anchor else anchor
    dp = d_positive if need_positive else positive
    _, sda, sdac = _location_layout(da, dim)
    _, sdp, sdpc = _location_layout(dp, dim)
    _, sdn, sdnc = _location_layout(d_neg.select(0, 0), dim)
    with device_guard(anchor.device):
        _infonce_bwd_kernel[grid](
            grad, anchor, positive, neg, stats, da, dp, d_neg,
            locations, channels, num_neg, sizes[1], sizes[2],
            *sg,
            *sa, sac, *sp, spc, neg.stride(0), *sn, snc,
            *sda, sdac, *sdp, sdpc, d_neg.stride(0), *sdn, sdnc,
            temperature, grad_scale,
            GRAD_IS_MAP=grad_is_map, WRITE_A=need_anchor, WRITE_P=need_positive, WRITE_N=write_n,
            BLOCK_L=block_l, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
        )
    return d_anchor, d_positive, d_negatives


def audit_cases(dtype: torch.dtype):
    """Launches users reach (CPR's NCHW features at SPEC §8 shapes, channels-last, ``(N, D)`` rows,
    K = 1…16 negatives) for the compile audit (``cplfast.kernels.audit``)."""
    from .audit import AuditCase, fake

    def case(shape, k, *, dim=1, order=None, reduction="mean"):
        def run():
            anchor, positive = fake(shape, dtype, order), fake(shape, dtype, order)
            neg_order = None if order is None else (0,) + tuple(o + 1 for o in order)
            negatives = fake((k,) + tuple(shape), dtype, neg_order)
            loss, stats = infonce_forward(anchor, positive, negatives, 0.1, dim, reduction)
            grad = fake(loss.shape, dtype)
            infonce_backward(grad, anchor, positive, negatives, stats, 0.1, dim, reduction, True, True, True)
        return run

    yield AuditCase("K=4 C=64 128² B=8", case((8, 64, 128, 128), 4), quick=True)
    yield AuditCase("K=4 C=64 128² B=8 none", case((8, 64, 128, 128), 4, reduction="none"))
    yield AuditCase("K=4 C=64 128² channels-last", case((8, 64, 128, 128), 4, order=(0, 2, 3, 1)), quick=True)
    for k in (1, 2, 8, 16):
        yield AuditCase(f"K={k} C=128 64²", case((8, 128, 64, 64), k))
    for c in (3, 256, 512):
        yield AuditCase(f"K=4 C={c} 32²", case((8, c, 32, 32), 4))
    yield AuditCase("(N,D) N=16384 D=256 K=4", case((16384, 256), 4, dim=-1))
