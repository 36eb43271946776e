"""``infonce`` (SPEC §3.4): the reference against an independent numpy formulation, and the fused
Triton kernels (interpreter on CPU, compiled on CUDA) against the reference in float64.

``K = 0`` negatives is an error at ``cplfast.functional.infonce`` (SPEC §9); below it, the custom op and
the reference define the loss as exactly 0 (the log-sum-exp of the positive logit alone minus itself),
with a graph and zero gradients, and that is tested on them directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import cplfast
from cplfast import functional, reference

sys.path.insert(0, str(Path(__file__).parent))
from cplfast.kernels import infonce as kernels
from cplfast.ops import infonce as ops

HAS_CUDA = torch.cuda.is_available()
FWD_TOL, GRAD_TOL = 1e-6, 1e-5  # fp32 kernels against the float64 oracle, element-wise (see max_err)
REDUCTIONS = ("mean", "sum", "none")


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Norm-based relative error of x against y (both moved to float64)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item() if y.norm() > 0 else x.norm().item()


def max_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """Element-wise error: ``max |got - want| / max(max |want|, floor)`` in float64 (shapes must match)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / max(want.abs().max().item(), floor)).item()


def infonce_numpy(a, p, n, tau, dim, reduction):
    """Independent float64 formulation: channels moved last, unit vectors, explicit log-sum-exp."""
    a = np.moveaxis(a.detach().double().numpy(), dim, -1)
    p = np.moveaxis(p.detach().double().numpy(), dim, -1)
    n = np.moveaxis(n.detach().double().numpy(), dim + 1, -1)

    def unit(x):
        return x / np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), 1e-12)

    a, p, n = unit(a), unit(p), unit(n)
    logits = np.concatenate([(a * p).sum(-1)[None], (a[None] * n).sum(-1)], axis=0) / tau
    top = logits.max(axis=0)
    loss = top + np.log(np.exp(logits - top).sum(axis=0)) - logits[0]
    if reduction == "mean":
        return torch.tensor(loss.mean())
    if reduction == "sum":
        return torch.tensor(loss.sum())
    return torch.from_numpy(loss)


def make_inputs(shape, k, *, dtype=torch.float32, device="cpu", layout="contiguous"):
    """anchor, positive ``shape`` and negatives ``(k, *shape)`` in the requested memory layout."""
    if layout == "contiguous":
        a, p = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
        n = torch.randn((k, *shape), dtype=dtype, device=device)
    elif layout == "channels_last":
        a, p = (torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last) for _ in range(2))
        n = torch.randn((k * shape[0], *shape[1:]), dtype=dtype, device=device)
        n = n.to(memory_format=torch.channels_last).view(k, *shape)
    elif layout == "strided":  # views into larger buffers: every stride differs from the dense one
        b, c, h, w = shape
        a = torch.randn(b, c + 2, h, 2 * w, dtype=dtype, device=device)[:, 2:, :, ::2]
        p = torch.randn(b, h, w, c, dtype=dtype, device=device).permute(0, 3, 1, 2)  # a permuted view
        n = torch.randn(k + 1, b, c, h + 1, w, dtype=dtype, device=device)[1:, :, :, 1:]
    else:
        raise ValueError(layout)
    return a, p, n


def run_with_grads(fn, a, p, n, reduction, dim=1, tau=0.1, grad_positive=True):
    a = a.detach().requires_grad_(True)
    p = p.detach().requires_grad_(grad_positive)
    n = n.detach().requires_grad_(True)
    out = fn(a, p, n, temperature=tau, dim=dim, reduction=reduction)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    wanted = [a, n] + ([p] if grad_positive else [])
    grads = torch.autograd.grad(out, wanted, upstream.to(out.dtype).to(out.device))
    return out, grads


def check_against_reference(a, p, n, reduction, dim=1, tau=0.1, grad_positive=True, fwd_tol=FWD_TOL,
                            grad_tol=GRAD_TOL):
    out, grads = run_with_grads(ops.infonce, a, p, n, reduction, dim, tau, grad_positive)
    ref_out, ref_grads = run_with_grads(
        reference.infonce, a.double().cpu(), p.double().cpu(), n.double().cpu(), reduction, dim, tau, grad_positive
    )
    assert out.shape == ref_out.shape and out.dtype == a.dtype
    assert max_err(out, ref_out) <= fwd_tol, (max_err(out, ref_out), reduction)
    for g, r, name in zip(grads, ref_grads, ("anchor", "negatives", "positive")):
        assert g.shape == r.shape
        assert torch.isfinite(g).all()
        # floor: with C = 1 every gradient is radial and vanishes (both sides are rounding noise)
        assert max_err(g, r, floor=1e-6) <= grad_tol, (name, max_err(g, r))
    return grads


# ----------------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("shape,dim", [((2, 5, 1, 37), 1), ((3, 5, 5, 7), 1), ((37, 12), 1), ((4, 3, 6, 5), 2),
                                       ((9, 6), 0)])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_reference_matches_numpy(shape, dim, k):
    a, p, n = make_inputs(shape, k, dtype=torch.float64)
    tau = float(torch.empty(()).uniform_(0.05, 1.0))
    for reduction in REDUCTIONS:
        got = reference.infonce(a, p, n, temperature=tau, dim=dim, reduction=reduction)
        assert rel(got, infonce_numpy(a, p, n, tau, dim, reduction)) < 1e-12


def test_reference_gradcheck():
    a, p, n = make_inputs((2, 3, 2, 3), 2, dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a, p, n: reference.infonce(a, p, n, temperature=0.3, reduction=reduction),
            (a.requires_grad_(), p.requires_grad_(), n.requires_grad_()),
        )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_invariant_to_positive_scaling(backend):
    a, p, n = make_inputs((2, 5, 3, 7), 3)
    scales = torch.rand(4) * 10 + 0.1
    with cplfast.use_backend(backend):
        base = functional.infonce(a, p, n, reduction="none")
        scaled = functional.infonce(a * scales[0], p * scales[1], n * scales[2:3].view(1, 1, 1, 1, 1) * scales[3],
                                    reduction="none")
    assert rel(scaled, base) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_reduction_consistency(backend):
    a, p, n = make_inputs((3, 5, 1, 37), 2)
    with cplfast.use_backend(backend):
        per_loc = functional.infonce(a, p, n, reduction="none")
        total = functional.infonce(a, p, n, reduction="sum")
        mean = functional.infonce(a, p, n, reduction="mean")
    assert per_loc.shape == (3, 1, 37)
    assert (per_loc >= 0).all()  # logsumexp over a set containing s_p is >= s_p
    assert rel(total, per_loc.sum()) < 1e-6
    assert rel(mean, per_loc.mean()) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_negatives_gives_zero_loss_with_graph(backend, reduction):
    a, p, n = make_inputs((2, 5, 1, 37), 0)
    a.requires_grad_(True)
    n.requires_grad_(True)
    fn = ops.infonce if backend == "triton" else reference.infonce
    loss = fn(a, p, n, temperature=0.1, dim=1, reduction=reduction)
    assert loss.requires_grad and torch.equal(loss, torch.zeros_like(loss))
    ga, gn = torch.autograd.grad(loss.sum(), (a, n))
    assert torch.equal(ga, torch.zeros_like(a)) and gn.shape == n.shape


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_loss_is_small_when_negatives_are_far(backend):
    """positive = anchor, negatives = -anchor: s_p = 1/tau, s_k = -1/tau, loss = log1p(K e^{-2/tau}) ~ 8e-9.
    The fp32 Triton path must keep it to relative accuracy (log(1 + x) in fp32 would give 0)."""
    a, _, _ = make_inputs((2, 5, 1, 37), 0)
    fn = ops.infonce
    if backend == "reference":  # the oracle is exact in float64 only (fp32 lse - s_p cancels to 0)
        fn, a = reference.infonce, a.double()
    loss = fn(a, a.clone(), -a.expand(4, *a.shape), temperature=0.1, dim=1, reduction="none")
    want = torch.full(loss.shape, float(np.log1p(4 * np.exp(-20.0))), dtype=torch.float64)
    assert max_err(loss, want) <= 1e-5, max_err(loss, want)


def test_kernel_near_zero_loss_forward_and_backward():
    """A well-separated positive: loss ~1e-8 per location, element-wise relative accuracy forward
    (log1p of the negatives' mass) and backward (w_p - 1 from the negatives' mass, no cancellation)."""
    a = torch.randn(2, 16, 3, 5)
    p = a + 0.05 * torch.randn_like(a)
    n = -a.expand(4, *a.shape) + 0.3 * torch.randn(4, *a.shape)
    out, grads = run_with_grads(ops.infonce, a, p, n, "none", tau=0.1)
    ref_out, ref_grads = run_with_grads(reference.infonce, a.double(), p.double(), n.double(), "none", tau=0.1)
    assert ref_out.max() < 1e-7
    assert ((out.double() - ref_out).abs() / ref_out).max() <= 1e-5  # every location, relative to itself
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) <= GRAD_TOL, max_err(g, r)


def test_kernel_one_dominating_term():
    """One negative nearly equal to the anchor dominates the log-sum-exp (lse ~ s_1 = 1/tau)."""
    a, p, n = make_inputs((2, 9, 3, 5), 3)
    n[1] = a + 0.05 * torch.randn_like(a)  # (closer, and fp32's a^ - cos n^ cancels in every implementation)
    for reduction in ("none", "sum"):
        check_against_reference(a, p, n, reduction, tau=0.05)


@pytest.mark.parametrize("tau", [0.01, 0.005])
def test_kernel_large_logits(tau):
    """|s| up to 1/tau = 100…200: max-shifted exponentials stay finite and element-wise accurate."""
    a, p, n = make_inputs((2, 9, 3, 5), 3)
    for reduction in ("none", "mean"):
        check_against_reference(a, p, n, reduction, tau=tau)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda a, p, n: functional.infonce(a[0], p[0], n[:, 0]), ValueError, "anchor"),
        (lambda a, p, n: functional.infonce(a, p[:, :4], n), ValueError, "positive"),
        (lambda a, p, n: functional.infonce(a, p[:1], n), ValueError, "positive"),  # mismatched batch
        (lambda a, p, n: functional.infonce(a, p, n[:, :1]), ValueError, "negatives"),
        (lambda a, p, n: functional.infonce(a, p, n[0]), ValueError, "negatives"),
        (lambda a, p, n: functional.infonce(a, p, n[:0]), ValueError, "negatives"),  # K = 0
        (lambda a, p, n: functional.infonce(a.long(), p.long(), n.long()), TypeError, "anchor"),
        (lambda a, p, n: functional.infonce(a, p.double(), n), TypeError, "dtype"),
        (lambda a, p, n: functional.infonce(a, p, n, temperature=0.0), ValueError, "temperature"),
        (lambda a, p, n: functional.infonce(a, p, n, temperature=-0.1), ValueError, "temperature"),
        (lambda a, p, n: functional.infonce(a, p, n, temperature=float("nan")), ValueError, "temperature"),
        (lambda a, p, n: functional.infonce(a, p, n, temperature="hot"), TypeError, "temperature"),
        (lambda a, p, n: functional.infonce(a, p, n, reduction="avg"), ValueError, "reduction"),
        (lambda a, p, n: functional.infonce(a, p, n, dim=4), ValueError, "dim"),
        (lambda a, p, n: functional.infonce(a, p, n, dim=1.0), ValueError, "dim"),
        (lambda a, p, n: functional.infonce(a, p.numpy(), n), TypeError, "positive"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    a, p, n = make_inputs((2, 5, 3, 7), 2)
    with pytest.raises(exc, match=match):
        call(a, p, n)


# ----------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (fp32 against the float64 reference)


@pytest.mark.parametrize("shape", [(2, 5, 1, 37), (1, 5, 37, 1), (3, 5, 5, 7)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_matches_reference(shape, k, reduction):
    check_against_reference(*make_inputs(shape, k), reduction, tau=float(torch.empty(()).uniform_(0.05, 0.5)))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kernel_reads_strided_layouts(layout, reduction):
    a, p, n = make_inputs((2, 5, 5, 7), 3, layout=layout)
    assert not a.is_contiguous() and not n.is_contiguous()
    check_against_reference(a, p, n, reduction)


def test_kernel_gradients_keep_channels_last():
    a, p, n = make_inputs((2, 5, 5, 7), 3, layout="channels_last")
    (ga, gn, gp) = run_with_grads(ops.infonce, a, p, n, "sum")[1]
    assert ga.is_contiguous(memory_format=torch.channels_last)
    assert gp.is_contiguous(memory_format=torch.channels_last)
    assert gn.stride() == n.stride()


@pytest.mark.parametrize("dim,shape", [(1, (37, 12)), (0, (12, 37)), (2, (2, 3, 5, 7)), (3, (2, 3, 5, 7))])
def test_kernel_other_reduction_dims(dim, shape):
    for reduction in ("mean", "none"):
        check_against_reference(*make_inputs(shape, 3), reduction, dim=dim)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_positive_without_grad(reduction):
    a, p, n = make_inputs((2, 5, 1, 37), 3)
    check_against_reference(a, p, n, reduction, grad_positive=False)


def test_kernel_backward_writes_only_requested_gradients(monkeypatch):
    calls = []
    real = kernels.infonce_backward

    def spy(*args):
        calls.append(args[-3:])
        return real(*args)

    monkeypatch.setattr(kernels, "infonce_backward", spy)
    a, p, n = make_inputs((2, 5, 1, 37), 2)
    a.requires_grad_(True)
    ops.infonce(a, p, n, temperature=0.1, dim=1, reduction="mean").backward()
    assert calls == [(True, False, False)]
    assert a.grad is not None and p.grad is None


def test_kernel_upstream_gradient_with_zero_strides():
    """``loss_map.sum().backward()`` hands the backward an expanded (stride-0) gradient map."""
    a, p, n = make_inputs((2, 5, 3, 7), 2)
    grads = []
    for fn in (ops.infonce, reference.infonce):
        leaf = a.clone().requires_grad_(True)
        fn(leaf, p, n, temperature=0.2, dim=1, reduction="none").sum().backward()
        grads.append(leaf.grad)
    assert rel(grads[0], grads[1]) < 1e-5


def test_kernel_upstream_gradient_map_read_through_strides():
    """A permuted (non-contiguous) upstream gradient map gives the same gradients as its contiguous copy."""
    a, p, n = make_inputs((2, 5, 3, 7), 2)
    loss, stats = kernels.infonce_forward(a, p, n, 0.2, 1, "none")
    grad = torch.randn(7, 3, 2).permute(2, 1, 0)
    assert grad.shape == loss.shape and not grad.is_contiguous()
    strided = kernels.infonce_backward(grad, a, p, n, stats, 0.2, 1, "none", True, True, True)
    dense = kernels.infonce_backward(grad.contiguous(), a, p, n, stats, 0.2, 1, "none", True, True, True)
    for g, d in zip(strided, dense):
        assert torch.equal(g, d)


# ----------------------------------------------------------------------------------------------------
# launch plans: every tile setting a GPU uses, reached under the interpreter


def small_blocks(anchor, dim, num_negatives):
    return 16, 4, triton.next_power_of_2(max(num_negatives, 1)), 4


def cuda_blocks(anchor, dim, num_negatives):
    """What the launchers pick on CUDA for these tensors (layout-dependent)."""
    return kernels.cuda_blocks(anchor.shape[dim], num_negatives, anchor.stride(dim) == 1)


@pytest.mark.parametrize(
    "blocks,shape,k,layout,dim",
    [
        (small_blocks, (2, 13, 5, 7), 3, "contiguous", 1),  # 4 channel chunks (last partial), 5 location blocks
        (small_blocks, (2, 13, 5, 7), 3, "channels_last", 1),
        (cuda_blocks, (2, 37, 9, 13), 3, "contiguous", 1),  # NCHW: BLOCK_C = 16
        (cuda_blocks, (2, 37, 9, 13), 3, "channels_last", 1),  # channel-contiguous: BLOCK_C = 8
        (cuda_blocks, (2, 20, 9, 13), 16, "contiguous", 1),  # K = 16: BLOCK_C = 4
        (cuda_blocks, (150, 37), 4, "contiguous", 1),  # (N, D) rows, channel-contiguous
    ],
)
def test_kernel_launch_plans(blocks, shape, k, layout, dim, monkeypatch):
    """Several channel chunks (a kernel that kept only the last one would fail), several location blocks
    with a partial last block, at the block sizes the launchers pick for CUDA."""
    a, p, n = make_inputs(shape, k, layout=layout)
    block_l, block_c, block_k, _ = blocks(a, dim, k)
    locations = a.numel() // a.shape[dim]
    assert triton.cdiv(a.shape[dim], block_c) >= 2 and triton.cdiv(locations, block_l) >= 2
    assert block_k >= k
    monkeypatch.setattr(kernels, "_blocks", blocks)
    for reduction in ("none", "mean"):
        check_against_reference(a, p, n, reduction, dim=dim)


def test_functional_dispatches_to_kernel(monkeypatch):
    called = []
    real = ops.infonce
    monkeypatch.setattr(ops, "infonce", lambda *args, **kw: called.append(kw) or real(*args, **kw))
    a, p, n = make_inputs((2, 5, 3, 7), 2)
    with cplfast.use_backend("triton"):
        out = functional.infonce(a, p, n, temperature=0.5, dim=-3, reduction="sum")
    assert called == [dict(temperature=0.5, dim=1, reduction="sum")]
    want = reference.infonce(a.double(), p.double(), n.double(), temperature=0.5, reduction="sum")
    assert max_err(out, want) < FWD_TOL


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / empty_like return NaN-filled (float) or sentinel-filled (int) tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_launchers_overwrite_poisoned_outputs(reduction, poisoned_allocations):
    a, p, n = make_inputs((3, 5, 1, 37), 3, layout="strided")
    loss, stats = kernels.infonce_forward(a, p, n, 0.1, 1, reduction)
    assert torch.isfinite(loss).all() and torch.isfinite(stats).all()
    want = reference.infonce(a.double(), p.double(), n.double(), temperature=0.1, reduction=reduction)
    assert max_err(loss, want) < FWD_TOL
    grad = torch.randn(loss.shape)
    da, dp, dn = kernels.infonce_backward(grad, a, p, n, stats, 0.1, 1, reduction, True, True, True)
    for g in (da, dp, dn):
        assert torch.isfinite(g).all()


@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(1, 3), c=st.integers(2, 9), h=st.integers(1, 6), w=st.integers(1, 9), k=st.integers(1, 5),
    reduction=st.sampled_from(REDUCTIONS), tau=st.floats(0.05, 2.0), seed=st.integers(0, 2**31 - 1),
)
def test_kernel_hypothesis_shapes(b, c, h, w, k, reduction, tau, seed):
    torch.manual_seed(seed)
    a, p, n = make_inputs((b, c, h, w), k)
    out = ops.infonce(a, p, n, temperature=tau, dim=1, reduction=reduction)
    assert max_err(out, infonce_numpy(a, p, n, tau, 1, reduction)) <= FWD_TOL
    check_against_reference(a, p, n, reduction, tau=tau)


def test_opcheck():
    a, p, n = make_inputs((2, 5, 3, 7), 3)
    a.requires_grad_(True)
    n.requires_grad_(True)
    for reduction in ("mean", "none"):
        torch.library.opcheck(ops.infonce_forward, (a, p, n, 0.1, 1, reduction))
    loss, stats = ops.infonce_forward(a, p, n, 0.1, 1, "none")
    for need in ((True, False, True), (True, True, True)):
        torch.library.opcheck(ops.infonce_backward, (torch.randn(loss.shape), a.detach(), p, n.detach(), stats,
                                                     0.1, 1, "none", *need))


def test_compile_fullgraph(monkeypatch):
    launches = []
    real = kernels.infonce_forward
    monkeypatch.setattr(kernels, "infonce_forward", lambda *args: launches.append(1) or real(*args))

    def cpr_term(out, target, negatives):
        return 0.1 * functional.infonce(out, target.detach(), negatives, temperature=0.1)

    a, p, n = make_inputs((2, 5, 3, 7), 3)
    a.requires_grad_(True)
    backend = "inductor" if HAS_CUDA else "aot_eager"  # aot_eager: the same tracing, without a C++ build
    with cplfast.use_backend("triton"):
        compiled = torch.compile(cpr_term, fullgraph=True, backend=backend)
        loss = compiled(a, p, n)
    (grad,) = torch.autograd.grad(loss, a)
    a64 = a.detach().double().requires_grad_(True)
    ref = 0.1 * reference.infonce(a64, p.double(), n.double(), temperature=0.1)
    (ref_grad,) = torch.autograd.grad(ref, a64)
    assert max_err(loss, ref) < FWD_TOL and max_err(grad, ref_grad) < GRAD_TOL
    assert launches, "the compiled function did not run the Triton kernel"


# ----------------------------------------------------------------------------------------------------
# CUDA (compiled kernels)

CUDA_TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_kernel_matches_reference(dtype, layout, reduction):
    fwd_tol, grad_tol = CUDA_TOLERANCES[dtype]
    a, p, n = make_inputs((3, 37, 9, 13), 4, dtype=dtype, device="cuda", layout=layout)
    check_against_reference(a, p, n, reduction, fwd_tol=fwd_tol, grad_tol=grad_tol)
    check_against_reference(a, p, n, reduction, grad_positive=False, fwd_tol=fwd_tol, grad_tol=grad_tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_peak_memory_quarter_of_eager():
    """CPR shapes (K=4, C=64): memory beyond the inputs and their gradients, forward + backward."""
    a, p, n = make_inputs((8, 64, 128, 128), 4, device="cuda")
    a.requires_grad_(True)
    n.requires_grad_(True)

    def extra_peak(fn):
        a.grad = n.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(a, p, n, temperature=0.1, dim=1, reduction="mean").backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - (a.numel() + n.numel()) * 4

    ours, eager = extra_peak(ops.infonce), extra_peak(reference.infonce)
    assert ours <= eager / 4, (ours, eager)


# (sm_90 / sm_80 builds of every kernel: tests/test_audit.py)


def test_kernel_zero_vectors_hit_the_eps_clamp():
    """Zero anchor, positive and negative vectors normalise to 0 (the eps clamp): their logits are 0, the
    loss stays finite (log(K + 1) at a zero anchor) and matches the reference forward and backward."""
    a, p, n = make_inputs((2, 6, 3, 5), 3)
    a[0, :, 1, 2] = 0.0
    p[1, :, 0, 0] = 0.0
    n[2, 0, :, 2, 4] = 0.0
    loss = ops.infonce(a, p, n, temperature=0.1, dim=1, reduction="none")
    assert torch.isfinite(loss).all() and abs(loss[0, 1, 2].item() - np.log(4.0)) < 1e-6
    check_against_reference(a, p, n, "none")
