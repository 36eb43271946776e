"""``supcon`` (SPEC §3.5): the reference against an explicit double loop, and the flash-style Triton
kernels (interpreter on CPU, compiled on CUDA) against the reference in float64.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import cplfast
import cplfast.distributed
from cplfast import functional, reference

sys.path.insert(0, str(Path(__file__).parent))
from _gloo import init_gloo, spawn_two_ranks  # noqa: E402
from cplfast.kernels import supcon as kernels
from cplfast.ops import supcon as ops
from cplfast.reference.supcon import supcon_rows

HAS_CUDA = torch.cuda.is_available()
FWD_TOL, GRAD_TOL = 1e-6, 1e-5  # fp32 kernels against the float64 oracle, element-wise (see max_err)
REDUCTIONS = ("mean", "sum", "none")


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Norm-based relative error of x against y (both moved to float64)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return ((x - y).norm() / y.norm()).item() if y.norm() > 0 else x.norm().item()


def max_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """Element-wise error: ``max |got - want| / max(max |want|, floor)`` in float64 (shapes must match)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / max(want.abs().max().item(), floor)).item()


def supcon_loops(z, labels, tau, reduction):
    """Independent float64 formulation: one row at a time, plain Python sums."""
    z = z.detach().double().tolist()
    labels = [int(v) for v in labels.tolist()]
    unit = []
    for row in z:
        norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
        unit.append([v / norm for v in row])
    losses, valid = [], 0
    for i, zi in enumerate(unit):
        sims = {j: sum(x * y for x, y in zip(zi, zj)) / tau for j, zj in enumerate(unit) if j != i}
        positives = [j for j in sims if labels[j] == labels[i]]
        if not positives:
            losses.append(0.0)
            continue
        valid += 1
        top = max(sims.values())
        lse = top + math.log(sum(math.exp(s - top) for s in sims.values()))
        losses.append(-sum(sims[j] - lse for j in positives) / len(positives))
    out = torch.tensor(losses, dtype=torch.float64)
    if reduction == "none":
        return out
    return out.sum() if reduction == "sum" else out.sum() / max(valid, 1)


def make_labels(n, kind, dtype=torch.int64):
    if kind == "random":  # a few classes plus singletons (rows without a positive)
        labels = torch.randint(0, 4, (n,))
        labels[: n // 5] = torch.arange(100, 100 + n // 5)
    elif kind == "same":
        labels = torch.full((n,), 3)
    elif kind == "distinct":
        labels = torch.randperm(n) - n // 2
    else:
        raise ValueError(kind)
    return labels[torch.randperm(n)].to(dtype)


def run_with_grad(fn, z, labels, tau, reduction, gather=False):
    z = z.detach().requires_grad_(True)
    out = fn(z, labels, temperature=tau, reduction=reduction, gather=gather)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(out, z, upstream.to(out.dtype).to(out.device))
    return out, grad


def check_against_reference(z, labels, reduction, tau=0.1, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL):
    out, grad = run_with_grad(ops.supcon, z, labels, tau, reduction)
    ref_out, ref_grad = run_with_grad(reference.supcon, z.double().cpu(), labels.cpu(), tau, reduction)
    assert out.shape == ref_out.shape and out.dtype == z.dtype
    # floors: a batch without positives has loss 0 and gradient 0 on both sides
    assert max_err(out, ref_out, floor=1e-3) <= fwd_tol, max_err(out, ref_out)
    assert torch.isfinite(grad).all() and grad.shape == z.shape
    assert max_err(grad, ref_grad, floor=1e-6) <= grad_tol, max_err(grad, ref_grad)


# ----------------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("kind", ["random", "same", "distinct"])
def test_reference_matches_loops(kind):
    z = torch.randn(23, 7, dtype=torch.float64)
    labels = make_labels(23, kind)
    tau = float(torch.empty(()).uniform_(0.05, 1.0))
    for reduction in REDUCTIONS:
        got = reference.supcon(z, labels, temperature=tau, reduction=reduction)
        want = supcon_loops(z, labels, tau, reduction)
        if kind == "distinct":  # no row has a positive: exactly 0, and not by accident
            assert want.abs().max() == 0
        else:
            assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    z = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    labels = make_labels(9, "random")
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda z: reference.supcon(z, labels, temperature=0.3, reduction=reduction), (z,)
        )


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_label_per_row_is_zero_with_graph(backend, reduction):
    z = torch.randn(13, 6, requires_grad=True)
    with cplfast.use_backend(backend):
        loss = functional.supcon(z, torch.arange(13), reduction=reduction)
    assert loss.requires_grad and torch.equal(loss, torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.sum(), z)
    assert torch.equal(grad, torch.zeros_like(z))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_reduction_consistency_and_invalid_rows(backend):
    z = torch.randn(37, 12)
    labels = make_labels(37, "random")
    has_positive = (labels[:, None] == labels[None, :]).sum(1) > 1
    with cplfast.use_backend(backend):
        rows = functional.supcon(z, labels, reduction="none")
        total = functional.supcon(z, labels, reduction="sum")
        mean = functional.supcon(z, labels, reduction="mean")
    assert torch.equal(rows[~has_positive], torch.zeros(int((~has_positive).sum())))
    assert (rows[has_positive] > 0).all()
    assert rel(total, rows.sum()) < 1e-6
    assert rel(mean, rows.sum() / has_positive.sum()) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_invariant_to_row_scaling(backend):
    z = torch.randn(37, 12)
    labels = make_labels(37, "random")
    with cplfast.use_backend(backend):
        base = functional.supcon(z, labels, reduction="none")
        scaled = functional.supcon(z * (torch.rand(37, 1) * 5 + 0.1), labels, reduction="none")
    assert rel(scaled, base) < 1e-5


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda z, y: functional.supcon(z[None], y), ValueError, "z"),
        (lambda z, y: functional.supcon(z, y.float()), TypeError, "labels"),
        (lambda z, y: functional.supcon(z, y == 1), TypeError, "labels"),
        (lambda z, y: functional.supcon(z, y[:-1]), ValueError, "labels"),
        (lambda z, y: functional.supcon(z, y[:, None]), ValueError, "labels"),
        (lambda z, y: functional.supcon(z.long(), y), TypeError, "z"),
        (lambda z, y: functional.supcon(z[:0], y[:0]), ValueError, "z"),
        (lambda z, y: functional.supcon(z[:1], y[:1]), ValueError, "z"),  # N = 1: no pair at all
        (lambda z, y: functional.supcon(z, y, temperature=0), ValueError, "temperature"),
        (lambda z, y: functional.supcon(z, y, temperature=-1.0), ValueError, "temperature"),
        (lambda z, y: functional.supcon(z, y, temperature=float("nan")), ValueError, "temperature"),
        (lambda z, y: functional.supcon(z, y, reduction="mean_valid"), ValueError, "reduction"),
        (lambda z, y: functional.supcon(z, y, gather="yes"), TypeError, "gather"),
        (lambda z, y: functional.supcon(z, y.tolist()), TypeError, "labels"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    z, y = torch.randn(11, 5), torch.randint(0, 3, (11,))
    with pytest.raises(exc, match=match):
        call(z, y)


# ----------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (fp32 against the float64 reference)


@pytest.mark.parametrize("kind", ["random", "same", "distinct"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_matches_reference(kind, reduction):
    check_against_reference(torch.randn(37, 12), make_labels(37, kind), reduction,
                            tau=float(torch.empty(()).uniform_(0.05, 0.5)))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_kernel_label_dtypes(label_dtype):
    check_against_reference(torch.randn(37, 12), make_labels(37, "random").abs().to(label_dtype), "mean")


def test_kernel_strided_embeddings():
    z_t = torch.randn(12, 37).t()  # column-major
    z_slice = torch.randn(37, 30)[:, 3:27:2]  # row stride 30, column stride 2
    for z in (z_t, z_slice):
        assert not z.is_contiguous()
        check_against_reference(z, make_labels(37, "random"), "mean")


@pytest.mark.parametrize("n,d", [(3, 2), (21, 300)])
def test_kernel_edge_sizes(n, d):
    """Three rows in 2-D, and D = 300 (three of the interpreter's 128-wide D slices)."""
    labels = torch.zeros(n, dtype=torch.int64)
    check_against_reference(torch.randn(n, d), labels, "sum")
    check_against_reference(torch.randn(n, d), make_labels(n, "random") if n > 2 else labels, "none")


def test_kernel_single_row_has_no_keys():
    """N = 1 at the kernel level: no key at all, so no positive; the row's loss and gradient are 0
    (the reference's masked log-sum-exp is -inf there, and -inf * 0 is NaN)."""
    z = torch.randn(1, 5, requires_grad=True)
    for reduction in REDUCTIONS:
        out = ops.supcon(z, torch.zeros(1, dtype=torch.int64), temperature=0.1, reduction=reduction, gather=False)
        (grad,) = torch.autograd.grad(out.sum(), z)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(z))


def test_kernel_one_wide_embeddings():
    """D = 1: every unit vector is +-1 (scores are exactly +-1/tau); the gradient is radial, hence 0."""
    z = torch.randn(37, 1)
    labels = make_labels(37, "random")
    out, grad = run_with_grad(ops.supcon, z, labels, 0.1, "none")
    assert max_err(out, reference.supcon(z.double(), labels, reduction="none")) <= FWD_TOL
    assert (grad.abs() * z.abs() <= 1e-4).all()  # cancellation noise scales with 1/|z|


def test_kernel_small_temperature_stays_finite():
    z, labels = torch.randn(37, 12), make_labels(37, "random")
    check_against_reference(z, labels, "mean", tau=0.005)


@pytest.mark.parametrize("tau", [0.01, 0.005])
def test_kernel_large_logits(tau):
    """|S| up to 1/tau = 100…200: the online max keeps exp finite and the result element-wise accurate."""
    z, labels = torch.randn(37, 12), make_labels(37, "random")
    for reduction in ("none", "mean"):
        check_against_reference(z, labels, reduction, tau=tau)


def test_kernel_one_dominating_term():
    """Rows whose log-sum-exp is one key (a near-duplicate with another label): lse ~ that score."""
    z, labels = torch.randn(37, 12), make_labels(37, "random")
    z[1::2] = z[0:-1:2] + 1e-3 * torch.randn(18, 12)  # row 2i+1 duplicates row 2i ...
    labels[1::2] = labels[0:-1:2] + 1000  # ... under another label
    for reduction in ("none", "sum"):
        check_against_reference(z, labels, reduction, tau=0.05)


def test_kernel_strided_labels():
    """Labels read through their stride (a column of a 2-D tensor)."""
    z = torch.randn(40, 12)
    labels = torch.randint(0, 3, (40, 2))[:, 0]
    assert labels.stride(0) == 2
    for reduction in ("none", "mean"):
        check_against_reference(z, labels, reduction)


def check_gathered(q, labels, other, other_labels, before, tau, key_labels=None):
    """Queries ``q`` against keys ``[other[:before], q, other[before:]]`` through the custom op: rows and
    the gradients of q and of the other ranks' rows against the float64 oracle."""
    q = q.detach().requires_grad_(True)
    other = other.detach().requires_grad_(True)
    keys = torch.cat([other[:before], q, other[before:]])
    if key_labels is None:
        key_labels = torch.cat([other_labels[:before], labels, other_labels[before:]])
    rows, _, n_pos = ops.supcon_forward(q, labels, keys, key_labels, before, tau)
    upstream = torch.randn(q.shape[0])
    grads = torch.autograd.grad(rows, (q, other), upstream)

    q64, o64 = q.detach().double().requires_grad_(True), other.detach().double().requires_grad_(True)
    keys64 = F.normalize(torch.cat([o64[:before], q64, o64[before:]]), dim=1)
    ref_rows, ref_npos = supcon_rows(F.normalize(q64, dim=1), labels, keys64, key_labels,
                                     torch.arange(q.shape[0]) + before, tau)
    ref_grads = torch.autograd.grad(ref_rows, (q64, o64), upstream.double())
    assert torch.equal(n_pos.long(), ref_npos)
    assert max_err(rows, ref_rows) <= FWD_TOL, max_err(rows, ref_rows)
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) <= GRAD_TOL, max_err(g, r)


def test_kernel_gather_strided_key_labels():
    q, labels = torch.randn(37, 12), torch.randint(0, 4, (37, 3))[:, 1]
    other, other_labels = torch.randn(20, 12), torch.randint(0, 4, (20,))
    key_labels = torch.stack([torch.cat([other_labels[:8], labels, other_labels[8:]]), -torch.ones(57, dtype=torch.long)],
                             dim=1)[:, 0]  # every other element is -1: a contiguous read would see no positives
    assert key_labels.stride(0) == 2 and labels.stride(0) == 3
    check_gathered(q, labels, other, other_labels, 8, 0.2, key_labels=key_labels)


# ----------------------------------------------------------------------------------------------------
# launch plans: every tile setting a GPU uses, reached under the interpreter

SMALL_PLAN = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16)


def plan_from(sizes):
    def plan(x, backward=False):
        cfg = dict(sizes)
        if not backward:
            cfg.pop("BLOCK_DO", None)
        return cfg
    return plan


def cuda_plan(dtype, precision):
    """The tile sizes the launchers pick on CUDA (the interpreter still takes ieee products)."""
    def plan(x, backward=False):
        return kernels.cuda_config(dtype, x.shape[1], precision, backward)
    return plan


PLANS = {
    "small": plan_from(dict(SMALL_PLAN, BLOCK_DO=16)),
    "cuda-fp32-ieee": cuda_plan(torch.float32, "ieee"),
    "cuda-fp32-tf32x3": cuda_plan(torch.float32, "tf32x3"),
    "cuda-fp32-tf32": cuda_plan(torch.float32, "tf32"),
    "cuda-16bit": cuda_plan(torch.float16, "tf32"),
}


def assert_plan_tiles_several_blocks(plan, n, d):
    """The plan splits queries, keys, D (products) and D (gradient columns) into several blocks each."""
    fwd, bwd = plan(torch.empty(n, d)), plan(torch.empty(n, d), backward=True)
    for cfg in (fwd, bwd):
        assert triton.cdiv(n, cfg["BLOCK_M"]) >= 2 and triton.cdiv(n, cfg["BLOCK_N"]) >= 2
        assert triton.cdiv(d, cfg["BLOCK_D"]) >= 2
    assert triton.cdiv(d, bwd["BLOCK_DO"]) >= 2


@pytest.mark.parametrize("name", list(PLANS))
def test_kernel_launch_plans(name, monkeypatch):
    """Several query / key blocks with partial last blocks, several D slices and gradient-column chunks
    (BLOCK_DO < D), for keys = queries and for gathered keys with an offset."""
    plan = PLANS[name]
    n, d = (37, 40) if name == "small" else (66, 260)
    assert_plan_tiles_several_blocks(plan, n, d)
    monkeypatch.setattr(kernels, "_config", plan)
    z, labels = torch.randn(n, d), make_labels(n, "random")
    check_against_reference(z, labels, "none", tau=0.1)
    check_gathered(z, labels, torch.randn(7, d), torch.randint(0, 4, (7,)), 3, 0.1)


def check_fp16(n, tau, upstream_scale, monkeypatch):
    """fp16 rows, fp16 loss and gradient against the float64 oracle on the same (fp16-exact) inputs."""
    monkeypatch.setattr(kernels, "_config", plan_from(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=16, BLOCK_DO=16)))
    z, labels = torch.randn(n, 8).half(), torch.randint(0, 16, (n,))
    zz = z.detach().requires_grad_(True)
    out = ops.supcon(zz, labels, temperature=tau, reduction="mean")
    (grad,) = torch.autograd.grad(out, zz, torch.tensor(upstream_scale, dtype=torch.float16))
    z64 = z.double().requires_grad_(True)
    ref_out = reference.supcon(z64, labels, temperature=tau, reduction="mean")
    (ref_grad,) = torch.autograd.grad(ref_out, z64, torch.tensor(upstream_scale, dtype=torch.float64))
    assert out.dtype == grad.dtype == torch.float16
    assert max_err(out, ref_out) <= 1e-3, max_err(out, ref_out)  # the fp16 rounding of the loss
    assert max_err(grad, ref_grad) <= 3e-3, max_err(grad, ref_grad)


def test_kernel_fp16_small_weights():
    """fp16 rows: the backward's per-pair weights g p_ij (here ~1e-8) lie below fp16's smallest subnormal,
    so they must stay fp32 until the product. Checked on the kernel's fp32 output (the gradient with
    respect to the normalised rows) against the float64 oracle."""
    n, tau = 256, 0.1
    z, labels = torch.randn(n, 8).half(), torch.randint(0, 4, (n,))
    upstream = torch.rand(n) * 1e-5 + 1e-5
    _, lse, n_pos = kernels.supcon_forward(z, labels, None, None, 0, tau)
    inv = kernels._inverse_norms(z)
    got = kernels._normalized_grad(z, inv, labels, z, inv, labels, 0, 0, lse, n_pos, upstream, tau, True, True)

    zn = torch.nn.functional.normalize(z.double(), dim=1).requires_grad_(True)
    rows, _ = supcon_rows(zn, labels, zn, labels, torch.arange(n), tau)
    (want,) = torch.autograd.grad(rows, zn, upstream.double())
    assert got.dtype == torch.float32
    assert max_err(got, want) <= 1e-5, max_err(got, want)


@pytest.mark.slow
def test_kernel_fp16_at_4096_rows(monkeypatch):
    """fp16 at N = 4,096 with the plain mean: weights ~1e-9…1e-7 (large tiles keep the interpreter fast;
    the precision path does not depend on them)."""
    check_fp16(4096, 0.1, 1.0, monkeypatch)


def simulated_gather(other, other_labels, before):
    """A stand-in for cplfast.distributed.gather_keys: keys = other ranks' rows around ours."""

    def gather_keys(z, labels):
        keys = torch.cat([other[:before], z, other[before:]])
        key_labels = torch.cat([other_labels[:before], labels, other_labels[before:]])
        return keys, key_labels, before

    return gather_keys


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_gather_keys_other_than_queries(reduction, monkeypatch):
    """gather=True with keys from other ranks around ours: the self index is offset by our position."""
    z, labels = torch.randn(37, 12), make_labels(37, "random")
    other = F.normalize(torch.randn(20, 12), dim=1)  # other ranks gather rows they normalised themselves
    other_labels = torch.randint(0, 4, (20,))
    monkeypatch.setattr(cplfast.distributed, "gather_keys", simulated_gather(other, other_labels, 8))
    out, grad = run_with_grad(ops.supcon, z, labels, 0.2, reduction, gather=True)

    monkeypatch.setattr(cplfast.distributed, "gather_keys", simulated_gather(other.double(), other_labels, 8))
    ref_out, ref_grad = run_with_grad(reference.supcon, z.double(), labels, 0.2, reduction, gather=True)
    assert max_err(out, ref_out) <= FWD_TOL and max_err(grad, ref_grad) <= GRAD_TOL


def test_kernel_gather_gradient_reaches_key_owners():
    check_gathered(torch.randn(37, 12), make_labels(37, "random"), torch.randn(20, 12), torch.randint(0, 4, (20,)), 8,
                   0.2)


def _triton_rank(rank, world, port, sizes, z, labels, queue):
    import os

    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    init_gloo(rank, world, port)
    try:
        start = sum(sizes[:rank])
        local = z[start : start + sizes[rank]].clone().requires_grad_()
        with cplfast.use_backend("triton"):
            loss = functional.supcon(local, labels[start : start + sizes[rank]], reduction="sum", gather=True)
        loss.backward()
        queue.put((rank, loss.item(), local.grad.tolist()))  # plain lists: no shared memory to outlive us
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_kernel_gather_across_two_gloo_ranks():
    """Two ranks with unequal batches, keys all-gathered: the same loss and gradients as one global batch."""
    sizes = [9, 14]
    z, labels = torch.randn(sum(sizes), 12), make_labels(sum(sizes), "random")
    results = spawn_two_ranks(_triton_rank, sizes, z, labels, timeout=240)
    z64 = z.double().requires_grad_()
    ref_loss = reference.supcon(z64, labels, reduction="sum")
    ref_loss.backward()
    assert max_err(torch.tensor(sum(r[1] for r in results)), ref_loss) <= FWD_TOL
    assert max_err(torch.tensor([row for r in results for row in r[2]]), z64.grad) <= GRAD_TOL


def test_gather_without_process_group_is_plain():
    z, labels = torch.randn(37, 12), make_labels(37, "random")
    a = ops.supcon(z, labels, temperature=0.1, reduction="none", gather=True)
    b = ops.supcon(z, labels, temperature=0.1, reduction="none", gather=False)
    assert torch.equal(a, b)


def test_functional_dispatches_to_kernel(monkeypatch):
    called = []
    real = ops.supcon
    monkeypatch.setattr(ops, "supcon", lambda *args, **kw: called.append(kw) or real(*args, **kw))
    z, labels = torch.randn(37, 12), make_labels(37, "random")
    with cplfast.use_backend("triton"):
        out = functional.supcon(z, labels, temperature=0.3, reduction="sum")
    assert called == [dict(temperature=0.3, reduction="sum", gather=False)]
    assert max_err(out, reference.supcon(z.double(), labels, temperature=0.3, reduction="sum")) < FWD_TOL


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / empty_like return NaN-filled (float) or sentinel-filled (int) tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def test_launchers_overwrite_poisoned_outputs(poisoned_allocations):
    z, labels = torch.randn(37, 12), make_labels(37, "random")
    keys, key_labels = torch.cat([torch.randn(5, 12), z]), torch.cat([torch.randint(0, 4, (5,)), labels])
    for k, kl, offset in ((None, None, 0), (keys, key_labels, 5)):
        loss, lse, n_pos = kernels.supcon_forward(z, labels, k, kl, offset, 0.1)
        assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and (n_pos >= 0).all()
        dz, dk = kernels.supcon_backward(torch.randn(37), z, labels, k, kl, offset, 0.1, lse, n_pos)
        assert torch.isfinite(dz).all() and (dk is None or torch.isfinite(dk).all())
    ref_rows, ref_npos = supcon_rows(F.normalize(z.double(), dim=1), labels, F.normalize(keys.double(), dim=1),
                                     key_labels, torch.arange(37) + 5, 0.1)
    assert max_err(loss, ref_rows) <= FWD_TOL and torch.equal(n_pos.long(), ref_npos)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(2, 20), classes=st.integers(1, 12), tau=st.floats(0.05, 2.0),
       reduction=st.sampled_from(REDUCTIONS), seed=st.integers(0, 2**31 - 1))
def test_kernel_hypothesis_shapes(n, d, classes, tau, reduction, seed):
    torch.manual_seed(seed)
    z, labels = torch.randn(n, d), torch.randint(0, classes, (n,))
    out = ops.supcon(z, labels, temperature=tau, reduction=reduction, gather=False)
    assert max_err(out, supcon_loops(z, labels, tau, reduction), floor=1e-3) <= FWD_TOL
    check_against_reference(z, labels, reduction, tau=tau)


def test_opcheck():
    z, labels = torch.randn(37, 12, requires_grad=True), make_labels(37, "random", torch.int32)
    keys, key_labels = torch.randn(45, 12, requires_grad=True), make_labels(45, "random", torch.int32)
    for k, kl, offset in ((None, None, 0), (keys, key_labels, 3)):
        torch.library.opcheck(ops.supcon_forward, (z, labels, k, kl, offset, 0.1))
        _, lse, n_pos = ops.supcon_forward(z, labels, k, kl, offset, 0.1)
        kd = None if k is None else k.detach()
        torch.library.opcheck(ops.supcon_backward, (torch.randn(37), z.detach(), labels, kd, kl, offset, 0.1,
                                                    lse, n_pos))


def test_compile_fullgraph(monkeypatch):
    launches = []
    real = kernels.supcon_forward
    monkeypatch.setattr(kernels, "supcon_forward", lambda *args: launches.append(1) or real(*args))

    def routing_contrast(z, labels):
        return 0.5 * functional.supcon(z, labels, temperature=0.1)

    z, labels = torch.randn(37, 12, requires_grad=True), make_labels(37, "random")
    backend = "inductor" if HAS_CUDA else "aot_eager"  # aot_eager: the same tracing, without a C++ build
    with cplfast.use_backend("triton"):
        loss = torch.compile(routing_contrast, fullgraph=True, backend=backend)(z, labels)
    (grad,) = torch.autograd.grad(loss, z)
    z64 = z.detach().double().requires_grad_(True)
    ref = 0.5 * reference.supcon(z64, labels)
    (ref_grad,) = torch.autograd.grad(ref, z64)
    assert max_err(loss, ref) < FWD_TOL and max_err(grad, ref_grad) < GRAD_TOL
    assert launches, "the compiled function did not run the Triton kernel"


# ----------------------------------------------------------------------------------------------------
# CUDA (compiled kernels)

CUDA_TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (3e-3, 2e-2), torch.bfloat16: (2e-2, 8e-2)}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES))
@pytest.mark.parametrize("n,d", [(37, 12), (301, 128), (513, 256), (129, 300)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_kernel_matches_reference(dtype, n, d, reduction):
    fwd_tol, grad_tol = CUDA_TOLERANCES[dtype]
    z = torch.randn(n, d, device="cuda", dtype=dtype)
    check_against_reference(z, make_labels(n, "random").cuda(), reduction, fwd_tol=fwd_tol, grad_tol=grad_tol)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_runs_at_131k_rows_in_linear_memory():
    n, d = 131072, 256
    z = torch.randn(n, d, device="cuda", requires_grad=True)
    labels = torch.randint(0, 64, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ops.supcon(z, labels, temperature=0.1, reduction="none", gather=False)
    loss.mean().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 * n * d  # O(N D); the N x N scores would be 64 GiB
    assert torch.isfinite(z.grad).all()
    rows = torch.arange(0, n, 4099, device="cuda")
    zn = F.normalize(z.detach(), dim=1)
    ref_rows, _ = supcon_rows(zn[rows], labels[rows], zn, labels, rows, 0.1)
    assert rel(loss[rows], ref_rows) < 1e-4


# (sm_90 / sm_80 builds of every kernel: tests/test_audit.py)
