"""prompt_token_attention (SPEC §3.3): the reference against independent formulations, and the Triton
kernels (interpreter on CPU, fp32; CUDA when present) against the reference in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cplfast
from cplfast import functional as Fn
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


def triton_vs_reference(q, k, v, scale=None, **launch):
    """Forward and input gradients of the Triton path against autograd on the float64 reference."""
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = reference_op(*leaves64, scale=scale)
    grad_out = torch.randn_like(expected)
    grads64 = torch.autograd.grad(expected, leaves64, grad_out)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if launch:
        from cplfast.kernels import token_attention as kernels

        s = q.shape[-1] ** -0.5 if scale is None else scale
        out = kernels.token_attention_forward(*leaves, s, **launch)
        grads = kernels.token_attention_backward(grad_out.to(q.dtype), *leaves, s, **launch)
    else:
        with cplfast.use_backend("triton"):
            out = Fn.prompt_token_attention(*leaves, scale=scale)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    assert out.dtype == q.dtype and out.shape == q.shape
    errors = {"out": rel(out, expected)}
    for name, got, want, leaf in zip("qkv", grads, grads64, leaves):
        assert got.shape == want.shape and got.dtype == leaf.dtype
        errors[name] = rel(got, want)
    return errors


def assert_close(errors, fwd_tol=2e-5, grad_tol=2e-3):
    assert errors["out"] <= fwd_tol, errors
    for name, err in errors.items():
        if name != "out":
            assert err <= grad_tol, (name, errors)


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
    [((2, 3, 37, 5, 12), None), ((1, 2, 37, 64, 40), 0.3), ((2, 1, 20, 1, 7), None), ((1, 1, 9, 17, 1), 2.0)],
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
    assert_close(triton_vs_reference(q, k, v, None, block_l=16, splits=2))


@pytest.mark.parametrize("block_l, splits", [(16, 3), (16, 1), (32, 2)])
def test_triton_launchers_with_split_reductions(block_l, splits):
    """Several pixel blocks per program and several programs per (b,h): the dk/dv partials are summed."""
    q, k, v = make_inputs(2, 3, 101, 5, 12, dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, None, block_l=block_l, splits=splits))


def test_triton_non_contiguous_inputs():
    b, h, d, height, width, m = 2, 3, 12, 5, 7, 5
    # q: heads split out of an NCHW feature map, (B, h*d, H, W) -> (B, h, H*W, d) as a view
    q = torch.randn(b, h * d, height, width).view(b, h, d, height * width).transpose(-1, -2)
    k = torch.randn(b, m, h, d + 3)[..., 1:-2].transpose(1, 2)  # tokens (B, M, h, d) sliced and transposed
    v = torch.randn(h, b, m, d).transpose(0, 1)
    assert not any(x.is_contiguous() for x in (q, k, v))
    assert_close(triton_vs_reference(q, k, v))


def test_triton_large_scores_are_stable():
    """Scores far above exp's range (~1e3): the max shift must keep the softmax finite and exact.

    The probabilities are then nearly one-hot, so dq and dk (driven by the tiny off-peak
    probabilities) are ill-conditioned in fp32 and only checked to be finite."""
    q, k, v = make_inputs(1, 2, 37, 6, 12, dtype=torch.float32)
    errors = triton_vs_reference(q * 40, k * 40, v)
    assert all(np.isfinite(e) for e in errors.values()), errors
    assert errors["out"] <= 2e-5 and errors["v"] <= 2e-3, errors


def test_triton_launchers_overwrite_poisoned_buffers(monkeypatch):
    from cplfast.kernels import token_attention as kernels

    def poisoned(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned)
    q, k, v = make_inputs(2, 3, 37, 5, 12, dtype=torch.float32)
    errors = triton_vs_reference(q, k, v, None, block_l=16, splits=2)
    assert all(np.isfinite(e) for e in errors.values()), errors
    assert_close(errors)


def test_triton_matches_sdpa():
    q, k, v = make_inputs(2, 3, 37, 5, 12, dtype=torch.float32)
    with cplfast.use_backend("triton"):
        out = Fn.prompt_token_attention(q, k, v, scale=0.5)
    assert rel(out, F.scaled_dot_product_attention(q, k, v, scale=0.5)) <= 2e-6


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

CUDA_TOLERANCES = {torch.float32: (2e-5, 2e-3), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 37, 5, 12), (4, 2, 4099, 16, 64), (2, 4, 1000, 64, 48), (1, 2, 513, 7, 128)])
def test_cuda_matches_reference(dtype, shape):
    q, k, v = (x.to(dtype) for x in make_inputs(*shape, dtype=torch.float32, device="cuda"))
    fwd_tol, grad_tol = CUDA_TOLERANCES[dtype]
    assert_close(triton_vs_reference(q, k, v), fwd_tol, grad_tol)
