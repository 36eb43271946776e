"""prompt_token_attention (SPEC §3.3): the reference against independent formulations, and the Triton
kernels (interpreter on CPU, fp32; CUDA when present) against the reference in float64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cplfast
from cplfast import functional as Fn
from cplfast.kernels import token_attention as kernels
from cplfast.reference import prompt_token_attention as reference_op

# the backward ops have no derivative of their own (no double backward)
NO_AUTOGRAD_CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(b, h, length, m, d, *, dtype=torch.float64, device="cpu", gen=None):
    q = torch.randn(b, h, length, d, dtype=dtype, generator=gen).to(device)
    k = torch.randn(b, h, m, d, dtype=dtype, generator=gen).to(device)
    v = torch.randn(b, h, m, d, dtype=dtype, generator=gen).to(device)
    return q, k, v


def numpy_attention(q, k, v, scale):
    """Independent formulation: per query row, a max-shifted exponential over the M tokens."""
    q, k, v = (np.asarray(x.detach().double().cpu()) for x in (q, k, v))
    out = np.zeros_like(q)
    for bi in range(q.shape[0]):
        for hi in range(q.shape[1]):
            for i in range(q.shape[2]):
                s = k[bi, hi] @ q[bi, hi, i] * scale
                e = np.exp(s - s.max())
                out[bi, hi, i] = (e / e.sum()) @ v[bi, hi]
    return torch.from_numpy(out)


def triton_vs_reference(q, k, v, scale=None, *, fwd_plan=None, bwd_plan=None, grad_out=None, kernels_direct=False):
    """Forward and input gradients of the Triton path against autograd on the float64 reference.

    Returns ``{"out"|"q"|"k"|"v": (got, want)}``. With plans (or ``kernels_direct``) the launchers are
    called directly with those settings; otherwise through the functional API and autograd."""
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = reference_op(*leaves64, scale=scale)
    if grad_out is None:
        grad_out = torch.randn_like(expected)
    grads64 = torch.autograd.grad(expected, leaves64, grad_out)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if fwd_plan is not None or bwd_plan is not None or kernels_direct:
        s = q.shape[-1] ** -0.5 if scale is None else scale
        out = kernels.token_attention_forward(*leaves, s, plan=fwd_plan)
        grads = kernels.token_attention_backward(grad_out.to(q.dtype), *leaves, s, plan=bwd_plan)
    else:
        with cplfast.use_backend("triton"):
            out = Fn.prompt_token_attention(*leaves, scale=scale)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    assert out.dtype == q.dtype and out.shape == q.shape
    pairs = {"out": (out, expected)}
    for name, got, want, leaf in zip("qkv", grads, grads64, leaves):
        assert got.shape == want.shape and got.dtype == leaf.dtype
        pairs[name] = (got, want)
    return pairs


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest element-wise error relative to the tensor's scale: ``max|got - want| / max(max|want|, 1)``."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def assert_close(pairs, fwd_tol=1e-6, grad_tol=1e-5):
    """Element-wise: every ``|got - want| <= tol * max(max|want|, 1)``; NaN fails."""
    errors = {name: max_error(got, want) for name, (got, want) in pairs.items()}
    for name, err in errors.items():
        tol = fwd_tol if name == "out" else grad_tol
        assert err <= tol, (name, errors)  # NaN compares False
    return errors


def cuda_plans(length, bh, m, d, precision="ieee", sms=132):
    """The plans the launchers pick on an sm_90 GPU for fp32 at ``precision``, run by the interpreter
    with ieee dots (the interpreter computes every dot in fp32)."""
    fwd = kernels.forward_plan(m, d, torch.float32, precision, cuda=True)
    bwd = kernels.backward_plan(length, bh, m, d, torch.float32, precision, sms=sms, cuda=True)
    if bwd.dq is not None:
        bwd = dataclasses.replace(bwd, dq=dataclasses.replace(bwd.dq, precision="ieee"))
    return dataclasses.replace(fwd, precision="ieee"), dataclasses.replace(bwd, precision="ieee")


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.7])
def test_reference_matches_numpy_and_sdpa(scale):
    q, k, v = make_inputs(2, 3, 37, 5, 12)
    got = reference_op(q, k, v, scale=scale)
    s = 12**-0.5 if scale is None else scale
    assert torch.allclose(got, numpy_attention(q, k, v, s), rtol=1e-10, atol=1e-12)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, scale=scale), rtol=1e-10, atol=1e-12)


def test_reference_gradcheck():
    q, k, v = (x.requires_grad_() for x in make_inputs(1, 2, 5, 3, 4))
    assert torch.autograd.gradcheck(lambda *a: reference_op(*a, scale=0.8), (q, k, v), fast_mode=True)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    length=st.integers(1, 40),
    m=st.integers(1, 64),
    d=st.integers(1, 24),
    scale=st.one_of(st.none(), st.floats(0.05, 3.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_sdpa_on_drawn_shapes(b, h, length, m, d, scale, seed):
    q, k, v = make_inputs(b, h, length, m, d, gen=torch.Generator().manual_seed(seed))
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert torch.allclose(reference_op(q, k, v, scale=scale), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must have 4"),
        (lambda a: {**a, "k": a["k"][..., :-1]}, ValueError, "k must have shape"),
        (lambda a: {**a, "v": a["v"][:, :, :-1]}, ValueError, "v must have shape"),
        (lambda a: {**a, "k": torch.randn(1, 2, 65, 8), "v": torch.randn(1, 2, 65, 8)}, ValueError, "M <= 64"),
        (lambda a: {**a, "scale": 0.0}, ValueError, "scale"),
        (lambda a: {**a, "scale": "big"}, TypeError, "scale"),
        (lambda a: {**a, "v": a["v"].double()}, TypeError, "one dtype"),
        (lambda a: {**a, "q": a["q"][:, :, :0]}, ValueError, "q must not be empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    q, k, v = make_inputs(1, 2, 9, 5, 8, dtype=torch.float32)
    args = mutate({"q": q, "k": k, "v": v, "scale": None})
    with pytest.raises(error, match=match):
        Fn.prompt_token_attention(args["q"], args["k"], args["v"], scale=args["scale"])


# ---------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, scale",
    [((2, 3, 37, 5, 24), None), ((1, 2, 37, 37, 40), 0.3), ((2, 1, 20, 1, 7), None), ((1, 1, 9, 17, 1), 2.0),
     ((1, 1, 21, 64, 130), None)],
)
def test_triton_matches_reference(shape, scale):
    q, k, v = make_inputs(*shape, dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, scale))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(1, 3),
    length=st.integers(1, 50),
    m=st.integers(1, 64),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference_on_drawn_shapes(h, length, m, d, seed):
    q, k, v = make_inputs(1, h, length, m, d, dtype=torch.float32, gen=torch.Generator().manual_seed(seed))
    bwd = dataclasses.replace(kernels.backward_plan(length, h, m, d, torch.float32, "ieee", sms=1, cuda=False),
                              splits=2)
    assert_close(triton_vs_reference(q, k, v, None, bwd_plan=bwd))


@pytest.mark.parametrize("block_l, splits", [(16, 3), (16, 1), (32, 2), (16, 7)])
def test_triton_launchers_with_split_reductions(block_l, splits):
    """Several pixel blocks per program and several programs per (b,h): the dk/dv partials are summed
    (splits=7 leaves the last split without a pixel block: its partials must be zeros)."""
    q, k, v = make_inputs(2, 3, 101, 5, 24, dtype=torch.float32)
    cpu = kernels.backward_plan(101, 6, 5, 24, torch.float32, "ieee", sms=1, cuda=False)
    bwd = dataclasses.replace(cpu, block_l=block_l, splits=splits)
    fwd = dataclasses.replace(kernels.forward_plan(5, 24, torch.float32, "ieee", cuda=False), block_l=block_l)
    assert_close(triton_vs_reference(q, k, v, None, fwd_plan=fwd, bwd_plan=bwd))


@pytest.mark.parametrize(
    "m, d, length, expect_fwd, expect_bwd",
    [
        # DPPD training shapes as an H100/H200 runs them (fp32, "highest"): block sizes and splits
        (16, 48, 300, dict(block_l=64, d_chunk=16, n_chunks=3, num_warps=8),
         dict(block_l=16, d_chunk=16, n_chunks=3, num_warps=8, splits=4, dq=False)),
        (64, 96, 800, dict(block_l=16, d_chunk=16, n_chunks=6, num_warps=8),
         dict(block_l=16, d_chunk=32, n_chunks=3, num_warps=8, splits=3, dq=True)),
    ],
)
def test_triton_cuda_plans_under_the_interpreter(m, d, length, expect_fwd, expect_bwd):
    """The exact settings the launchers pick for a GPU at these shapes (splits at ``length`` pixels),
    run by the interpreter on fewer pixels with the splits kept."""
    fwd, bwd = cuda_plans(length, 1, m, d)
    got_bwd = {name: getattr(bwd, name) for name in expect_bwd if name != "dq"}
    assert {name: getattr(fwd, name) for name in expect_fwd} == expect_fwd
    assert {**got_bwd, "dq": bwd.dq is not None} == expect_bwd
    if bwd.dq is not None:
        assert {name: getattr(bwd.dq, name) for name in expect_fwd} == expect_fwd  # dq walks pixels as the forward
    length = 77 if m > 16 else 150  # odd, several blocks per split
    q, k, v = make_inputs(1, 1, length, m, d, dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, None, fwd_plan=fwd, bwd_plan=bwd))


def test_triton_ieee_forward_plan_beyond_d96_under_the_interpreter():
    """fp32 "highest" forward at M <= 16, d = 128 on a GPU: 32-pixel blocks (not 64), 16-column chunks."""
    fwd = kernels.forward_plan(16, 128, torch.float32, "ieee", cuda=True)
    assert (fwd.block_l, fwd.block_m, fwd.d_chunk, fwd.n_chunks, fwd.num_warps) == (32, 16, 16, 8, 8)
    assert kernels.forward_plan(16, 96, torch.float32, "ieee", cuda=True).block_l == 64
    q, k, v = make_inputs(1, 2, 77, 11, 128, dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, None, fwd_plan=fwd,
                                     bwd_plan=kernels.backward_plan(77, 2, 11, 128, torch.float32, "ieee",
                                                                    sms=1, cuda=False)))


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("m, d", [(5, 24), (37, 40)])
def test_triton_tensor_core_plans_under_the_interpreter(precision, m, d):
    """Block settings of the tensor-core paths (fp16/bf16, fp32 "high"/"medium"), run with ieee dots."""
    fwd, bwd = cuda_plans(2000, 2, m, d, precision, sms=8)  # the splits of 2000 pixels, run on 300
    length = 300
    assert bwd.splits > 1 and fwd.block_l < length
    q, k, v = make_inputs(1, 2, length, m, d, dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, None, fwd_plan=fwd, bwd_plan=bwd))


@pytest.mark.parametrize(
    "m, d, expect",
    [
        # fp32 "high" (tf32x3) on an sm_90 GPU: dk/dv chunks shared out over programs beyond 2048 elements
        (64, 128, dict(block_l=16, d_chunk=32, n_chunks=4, num_warps=8, col_groups=4)),
        (32, 96, dict(block_l=16, d_chunk=32, n_chunks=3, num_warps=8, col_groups=2)),
        (16, 128, dict(block_l=16, d_chunk=32, n_chunks=4, num_warps=8, col_groups=1)),
    ],
)
def test_triton_tf32x3_backward_plans_under_the_interpreter(m, d, expect):
    """The tf32x3 backward plans (column groups of dk/dv, separate dq kernel), run with ieee dots on fewer
    pixels with the splits kept; (32, 96) leaves the last column group one chunk past d."""
    fwd, bwd = cuda_plans(4096, 16, m, d, "tf32x3")
    assert {name: getattr(bwd, name) for name in expect} == expect
    assert (bwd.dq.block_l, bwd.dq.num_warps, bwd.dq.d_chunk, bwd.dq.n_chunks) == (16, 4, bwd.d_chunk, bwd.n_chunks)
    bwd = dataclasses.replace(bwd, splits=3)
    q, k, v = make_inputs(1, 2, 53, m, d, dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, None, fwd_plan=fwd, bwd_plan=bwd))


@pytest.mark.parametrize(
    "m, d, expect",
    [
        # fp16/bf16 inputs (tf32 dots) on a GPU: dk/dv chunks shared out over programs so that k, v and the
        # own dk, dv columns stay within TF32_HELD_ELEMENTS; M = 64 on 8 warps; fused d <= 64 at 16 pixels
        (64, 128, dict(block_l=32, block_m=64, d_chunk=32, n_chunks=4, num_warps=8, col_groups=4)),
        (32, 96, dict(block_l=32, block_m=32, d_chunk=32, n_chunks=3, num_warps=4, col_groups=3)),
        (64, 64, dict(block_l=32, block_m=64, d_chunk=32, n_chunks=2, num_warps=8, col_groups=2)),
        (32, 64, dict(block_l=32, block_m=32, d_chunk=32, n_chunks=2, num_warps=4, col_groups=1)),
        (16, 128, dict(block_l=32, block_m=16, d_chunk=32, n_chunks=4, num_warps=4, col_groups=1)),
        (16, 64, dict(block_l=16, block_m=16, d_chunk=32, n_chunks=2, num_warps=4, col_groups=1)),
        (16, 48, dict(block_l=32, block_m=16, d_chunk=16, n_chunks=3, num_warps=4, col_groups=1)),
    ],
)
def test_triton_tf32_backward_plans_under_the_interpreter(monkeypatch, m, d, expect):
    """The fp16/bf16 backward plans (column groups, warps, pixel blocks; dq on the dk/dv pass's pixel
    blocks when not fused), run with ieee dots on poisoned buffers, fewer pixels, the splits kept."""
    monkeypatch.setattr(kernels, "_empty", lambda shape, dtype, device: torch.full(tuple(shape), float("nan"),
                                                                                   dtype=dtype, device=device))
    fwd, bwd = cuda_plans(4096, 16, m, d, "tf32")
    assert {name: getattr(bwd, name) for name in expect} == expect
    fused = m <= 16 and d <= 64
    assert (bwd.dq is None) == fused
    if not fused:
        assert (bwd.dq.block_l, bwd.dq.num_warps, bwd.dq.d_chunk, bwd.dq.n_chunks) == (32, 4, bwd.d_chunk, bwd.n_chunks)
    bwd = dataclasses.replace(bwd, splits=3)
    q, k, v = make_inputs(1, 2, 71, m, d, dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, None, fwd_plan=fwd, bwd_plan=bwd))


@pytest.mark.parametrize("col_groups", [2, 3])
def test_triton_backward_column_groups(monkeypatch, col_groups):
    """dk/dv chunks shared out over ``col_groups`` programs (3 chunks of 16 columns for d = 40), on
    poisoned buffers; without a dq kernel such a plan is refused."""
    monkeypatch.setattr(kernels, "_empty", lambda shape, dtype, device: torch.full(tuple(shape), float("nan"),
                                                                                   dtype=dtype, device=device))
    q, k, v = make_inputs(2, 1, 45, 7, 40, dtype=torch.float32)
    cpu = kernels.backward_plan(45, 2, 7, 40, torch.float32, "ieee", sms=1, cuda=False)
    assert cpu.n_chunks == 3 and cpu.dq is None
    with pytest.raises(ValueError, match="col_groups"):
        kernels.token_attention_backward(torch.randn_like(q), q, k, v, 0.5,
                                         plan=dataclasses.replace(cpu, col_groups=col_groups))
    bwd = dataclasses.replace(cpu, col_groups=col_groups, splits=2,
                              dq=kernels.forward_plan(7, 40, torch.float32, "ieee", cuda=False))
    assert_close(triton_vs_reference(q, k, v, None, bwd_plan=bwd))


def test_default_splits_follow_the_sm_count():
    many = kernels.default_splits(128 * 128, 16, 16, 16, sms=132)
    few = kernels.default_splits(128 * 128, 16, 16, 16, sms=8)
    assert many == triton_cdiv(4 * 132, 16) and few == triton_cdiv(4 * 8, 16)
    assert kernels.default_splits(40, 1, 64, 16, sms=132) == 1  # too few pixels for a second split
    assert kernels.default_splits(10**7, 1, 16, 16, sms=132) == 4 * 132


def triton_cdiv(a, b):
    return -(-a // b)


def test_triton_non_contiguous_inputs():
    b, h, d, height, width, m = 2, 3, 24, 5, 7, 5
    # q: heads split out of an NCHW feature map, (B, h*d, H, W) -> (B, h, H*W, d) as a view
    q = torch.randn(b, h * d, height, width).view(b, h, d, height * width).transpose(-1, -2)
    k = torch.randn(b, m, h, d + 3)[..., 1:-2].transpose(1, 2)  # tokens (B, M, h, d) sliced and transposed
    v = torch.randn(h, b, m, d).transpose(0, 1)
    grad_out = torch.randn(b, h, d, height * width, dtype=torch.float64).transpose(-1, -2)
    assert not any(x.is_contiguous() for x in (q, k, v, grad_out))
    assert_close(triton_vs_reference(q, k, v))
    fwd, bwd = cuda_plans(height * width, b * h, m, d, sms=4)
    assert_close(triton_vs_reference(q, k, v, grad_out=grad_out, fwd_plan=fwd, bwd_plan=bwd))


def exact_logit_inputs(m, d, length, gen):
    """Integer q, k (every q @ k^T exact in fp32) with scale 4: logits of up to about +-100, mostly one
    dominating token per row; token 1 duplicates token 0 (exact ties)."""
    q = torch.randint(-2, 3, (1, 2, length, d), generator=gen).float()
    k = torch.randint(-2, 3, (1, 2, m, d), generator=gen).float()
    k[:, :, 1] = k[:, :, 0]
    v = torch.randn(1, 2, m, d, generator=gen)
    return q, k, v


@pytest.mark.parametrize("m, d, plans", [(6, 16, "cpu"), (37, 24, "cuda"), (64, 40, "cuda")])
def test_triton_large_logits_are_exact(m, d, plans):
    """scale * q.k of +-80 and beyond: the max shift keeps exp in range and the dominant token's
    exponent exactly 0, so fp32 stays within 1e-6 / 1e-5 of float64 forward and backward."""
    q, k, v = exact_logit_inputs(m, d, 45, torch.Generator().manual_seed(m))
    logits = (q @ k.transpose(-1, -2)) * 4.0
    assert logits.abs().max() >= 80
    top2 = logits.topk(2, dim=-1).values
    assert ((top2[..., 0] - top2[..., 1]) > 20).float().mean() > 0.1  # rows with one dominating token
    fwd, bwd = cuda_plans(45, 2, m, d, sms=4) if plans == "cuda" else (None, None)
    pairs = triton_vs_reference(q, k, v, 4.0, fwd_plan=fwd, bwd_plan=bwd, kernels_direct=True)
    assert_close(pairs)


@pytest.mark.parametrize("plans", ["cpu", "cuda-m16", "cuda-m64"])
def test_triton_launchers_overwrite_poisoned_buffers(monkeypatch, plans):
    def poisoned(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned)
    m = {"cpu": 5, "cuda-m16": 16, "cuda-m64": 37}[plans]
    q, k, v = make_inputs(2, 3, 67, m, 24, dtype=torch.float32)
    fwd, bwd = (None, None) if plans == "cpu" else cuda_plans(67, 6, m, 24, sms=40)
    if bwd is not None:
        bwd = dataclasses.replace(bwd, splits=3)
    assert_close(triton_vs_reference(q, k, v, None, fwd_plan=fwd, bwd_plan=bwd, kernels_direct=True))


def test_launchers_use_the_float32_matmul_precision(monkeypatch):
    """The plans carry :func:`dot_precision` of the inputs (PyTorch's fp32 matmul convention)."""
    seen = []
    real_fwd, real_bwd = kernels.forward_plan, kernels.backward_plan
    monkeypatch.setattr(kernels, "dot_precision", lambda dtype, device: "ieee" if seen.append(dtype) is None else "")
    monkeypatch.setattr(kernels, "forward_plan", lambda *a, **kw: seen.append(a[3]) or real_fwd(*a, **kw))
    monkeypatch.setattr(kernels, "backward_plan", lambda *a, **kw: seen.append(a[5]) or real_bwd(*a, **kw))
    q, k, v = make_inputs(1, 1, 9, 3, 8, dtype=torch.float32)
    kernels.token_attention_forward(q, k, v, 0.5)
    kernels.token_attention_backward(torch.randn_like(q), q, k, v, 0.5)
    assert seen == [torch.float32, "ieee", torch.float32, "ieee"]


def test_triton_matches_sdpa():
    q, k, v = make_inputs(2, 3, 37, 5, 12, dtype=torch.float32)
    with cplfast.use_backend("triton"):
        out = Fn.prompt_token_attention(q, k, v, scale=0.5)
    assert max_error(out, F.scaled_dot_product_attention(q, k, v, scale=0.5)) <= 1e-6


def test_opcheck_custom_ops():
    from cplfast.ops import token_attention as ops

    q, k, v = (x.requires_grad_() for x in make_inputs(1, 2, 9, 5, 12, dtype=torch.float32))
    torch.library.opcheck(ops.prompt_token_attention_fwd, (q, k, v, 0.3))
    grad_out = torch.randn_like(q)
    args = (grad_out, q.detach(), k.detach(), v.detach(), 0.3)
    torch.library.opcheck(ops.prompt_token_attention_bwd, args, test_utils=NO_AUTOGRAD_CHECKS)


def test_torch_compile_fullgraph():
    from cplfast.ops.token_attention import prompt_token_attention as fused

    class CrossFusion(torch.nn.Module):
        def __init__(self, attend, dim=12, heads=2):
            super().__init__()
            self.attend = attend
            self.heads = heads
            self.to_q = torch.nn.Linear(dim, dim)
            self.to_kv = torch.nn.Linear(dim, 2 * dim)

        def forward(self, x, tokens):
            b, length, dim = x.shape
            q = self.to_q(x).view(b, length, self.heads, -1).transpose(1, 2)
            k, v = self.to_kv(tokens).view(b, tokens.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
            return x + self.attend(q, k, v).transpose(1, 2).reshape(b, length, dim)

    module = CrossFusion(fused)
    x, tokens = torch.randn(2, 11, 12, requires_grad=True), torch.randn(2, 5, 12, requires_grad=True)
    with cplfast.use_backend("triton"):
        out = torch.compile(module, fullgraph=True, backend="aot_eager")(x, tokens)
        out.square().sum().backward()
    got = [x.grad, tokens.grad, module.to_q.weight.grad]
    for t in (x, tokens, *module.parameters()):
        t.grad = None
    module.attend = reference_op
    want = module(x, tokens)
    want.square().sum().backward()
    assert rel(out, want) <= 2e-5
    for g, w in zip(got, [x.grad, tokens.grad, module.to_q.weight.grad]):
        assert rel(g, w) <= 2e-3


# ---------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------

CUDA_TOLERANCES = {torch.float32: (2e-6, 2e-5), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 37, 5, 12), (4, 2, 4099, 16, 64), (2, 4, 1000, 64, 48), (1, 2, 513, 7, 128)])
def test_cuda_matches_reference(dtype, shape):
    q, k, v = (x.to(dtype) for x in make_inputs(*shape, dtype=torch.float32, device="cuda"))
    fwd_tol, grad_tol = CUDA_TOLERANCES[dtype]
    assert_close(triton_vs_reference(q, k, v), fwd_tol, grad_tol)


def test_launchers_refuse_head_dimension_strides_past_32_bits():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty_strided((1, 1, 4, 128), (2**30, 2**30, 1, 2**24))  # an NCHW view of a 16M-pixel map
        k = v = torch.empty(1, 1, 3, 128)
        with pytest.raises(ValueError, match="head dimension stride"):
            kernels.token_attention_forward(q, k, v, 0.5)
        with pytest.raises(ValueError, match="head dimension stride"):
            kernels.token_attention_backward(q, q, k, v, 0.5)


def test_triton_token_strides_of_fused_projections():
    """k and v as a fused key/value projection leaves them ((B, M, 2*h*d) split and viewed (B, h, M, d):
    token stride 2*h*d, not d), and a v stored channels-first (token stride 1): both kernels must step the
    tokens of k and of v by their own stride (a v read with k's layout or with stride d fails here)."""
    b, h, m, d, length = 2, 3, 5, 24, 37
    q = torch.randn(b, h, length, d)
    kv = torch.randn(b, m, 2 * h * d)
    k, v = (t.view(b, m, h, d).transpose(1, 2) for t in kv.chunk(2, dim=-1))
    assert k.stride(2) == v.stride(2) == 2 * h * d
    assert_close(triton_vs_reference(q, k, v))
    v_channels_first = torch.randn(b, h, d, m).transpose(-1, -2)
    assert v_channels_first.stride(2) == 1
    assert_close(triton_vs_reference(q, k, v_channels_first))
    fwd, bwd = cuda_plans(length, b * h, m, d, sms=4)
    assert_close(triton_vs_reference(q, k, v_channels_first, fwd_plan=fwd, bwd_plan=bwd))
