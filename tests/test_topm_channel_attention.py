"""topm_channel_attention (SPEC §3.2): the reference against an independent formulation, and the Triton
kernels (interpreter on CPU, fp32; CUDA when present) against the reference in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cplfast
from cplfast import functional as Fn
from cplfast.reference import topm_channel_attention as reference_op

DEFAULT = (1 / 2, 2 / 3, 3 / 4, 4 / 5)
# the backward ops have no derivative of their own (no double backward)
NO_AUTOGRAD_CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(b, h, c, length, *, n_fracs=0, dtype=torch.float64, device="cpu", gen=None):
    q, k, v = (torch.randn(b, h, c, length, dtype=dtype, generator=gen).to(device) for _ in range(3))
    temperature = (torch.rand(h, dtype=dtype, generator=gen) * 2 + 0.5).to(device)
    mix = (torch.rand(n_fracs, dtype=dtype, generator=gen) + 0.1).to(device) if n_fracs else None
    return q, k, v, temperature, mix


def numpy_topm(q, k, v, temperature, fractions, mix):
    """Independent formulation: per (b,h) loops, per row a stable descending sort and a kept set."""
    q, k, v, temperature = (np.asarray(x.detach().double().cpu()) for x in (q, k, v, temperature))
    b, h, c, _ = q.shape
    out = np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            qn = q[bi, hi] / np.maximum(np.sqrt((q[bi, hi] ** 2).sum(-1, keepdims=True)), 1e-12)
            kn = k[bi, hi] / np.maximum(np.sqrt((k[bi, hi] ** 2).sum(-1, keepdims=True)), 1e-12)
            scores = qn @ kn.T * temperature[hi]
            probs = np.zeros((c, c))
            if fractions is None:
                plan = [(c, 1.0)]
            else:
                weights = [1 / len(fractions)] * len(fractions) if mix is None else [float(w) for w in mix]
                plan = [(int(c * f), w) for f, w in zip(fractions, weights)]
            for m, w in plan:
                for i in range(c):
                    kept = np.argsort(-scores[i], kind="stable")[:m]
                    e = np.exp(scores[i, kept] - scores[i, kept].max())
                    probs[i, kept] += w * e / e.sum()
            out[bi, hi] = probs @ v[bi, hi]
    return torch.from_numpy(out)


def triton_vs_reference(q, k, v, temperature, mix, fractions, **launch):
    """Forward and every input gradient of the Triton path (fp32) against autograd on the float64
    reference. Returns {name: relative error}."""
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v, temperature)]
    mix64 = None if mix is None else mix.detach().double().requires_grad_()
    expected = reference_op(*leaves64, fractions=fractions, mix=mix64)
    grad_out = torch.randn_like(expected)
    wrt64 = leaves64 + ([mix64] if mix64 is not None else [])
    grads64 = torch.autograd.grad(expected, wrt64, grad_out)

    leaves = [x.detach().requires_grad_() for x in (q, k, v, temperature)]
    mix32 = None if mix is None else mix.detach().requires_grad_()
    if launch:
        from cplfast.kernels import channel_attention as kernels
        from cplfast.ops.channel_attention import topm_counts

        counts = [] if fractions is None else topm_counts(q.shape[2], fractions)
        out, *saved = kernels.channel_attention_forward(*leaves, mix32, counts, **launch)
        dq, dk, dv, dt, dmix = kernels.channel_attention_backward(
            grad_out.to(q.dtype), *[x.detach() for x in leaves], mix32, *saved, counts, **launch
        )
        grads = [dq, dk, dv, dt] + ([dmix] if mix is not None else [])
    else:
        with cplfast.use_backend("triton"):
            out = Fn.topm_channel_attention(*leaves, fractions=fractions, mix=mix32)
        wrt = leaves + ([mix32] if mix32 is not None else [])
        grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    assert out.dtype == q.dtype and out.shape == q.shape
    errors = {"out": rel(out, expected)}
    inputs = (q, k, v, temperature, mix)
    for name, got, want, leaf in zip(("q", "k", "v", "temperature", "mix"), grads, grads64, inputs):
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


@pytest.mark.parametrize(
    "fractions, with_mix",
    [(None, False), (DEFAULT, False), (DEFAULT, True), ((0.3, 1.0, 0.6), True)],
)
def test_reference_matches_numpy_formulation(fractions, with_mix):
    q, k, v, temperature, mix = make_inputs(2, 3, 7, 37, n_fracs=len(fractions or ()) if with_mix else 0)
    got = reference_op(q, k, v, temperature, fractions=fractions, mix=mix)
    want = numpy_topm(q, k, v, temperature, fractions, mix)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_reference_gradcheck():
    q, k, v, temperature, mix = make_inputs(1, 2, 4, 3, n_fracs=2)
    for x in (q, k, v, temperature, mix):
        x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: reference_op(*a[:4], fractions=(0.5, 0.75), mix=a[4]), (q, k, v, temperature, mix), fast_mode=True
    )
    assert torch.autograd.gradcheck(lambda *a: reference_op(*a, fractions=None), (q, k, v, temperature), fast_mode=True)


def test_reference_fraction_one_is_plain_softmax():
    q, k, v, temperature, _ = make_inputs(2, 2, 6, 11)
    full = reference_op(q, k, v, temperature, fractions=(1.0,))
    mdta = reference_op(q, k, v, temperature, fractions=None)
    assert torch.allclose(full, mdta, rtol=1e-12, atol=1e-14)


def test_reference_one_hot_mix_is_single_fraction():
    q, k, v, temperature, _ = make_inputs(2, 2, 9, 13)
    mix = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    mixed = reference_op(q, k, v, temperature, fractions=(0.3, 0.5, 0.9), mix=mix)
    single = reference_op(q, k, v, temperature, fractions=(0.5,))
    assert torch.allclose(mixed, single, rtol=1e-12, atol=1e-14)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    c=st.integers(2, 9),
    length=st.integers(1, 20),
    fractions=st.sampled_from([None, DEFAULT, (0.5,), (1.0, 0.34)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_numpy_on_drawn_shapes(b, h, c, length, fractions, seed):
    assume(fractions is None or all(int(c * f) >= 1 for f in fractions))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, temperature, _ = make_inputs(b, h, c, length, gen=gen)
    got = reference_op(q, k, v, temperature, fractions=fractions)
    assert torch.allclose(got, numpy_topm(q, k, v, temperature, fractions, None), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must have 4"),
        (lambda a: {**a, "k": a["k"][..., :-1]}, ValueError, "k must have shape"),
        (lambda a: {**a, "temperature": a["temperature"][:1]}, ValueError, "temperature must have shape"),
        (lambda a: {**a, "fractions": (0.5, 1.5)}, ValueError, r"fractions\[1\]"),
        (lambda a: {**a, "fractions": (0.1,)}, ValueError, "keeps int"),
        (lambda a: {**a, "fractions": None, "mix": torch.ones(4)}, ValueError, "mix must be None"),
        (lambda a: {**a, "mix": torch.ones(3)}, ValueError, "mix must have shape"),
        (lambda a: {**a, "v": a["v"].double()}, TypeError, "one dtype"),
        (lambda a: {**a, "q": a["q"].int()}, TypeError, "floating-point"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    q, k, v, temperature, _ = make_inputs(1, 2, 5, 8, dtype=torch.float32)
    args = mutate({"q": q, "k": k, "v": v, "temperature": temperature, "fractions": DEFAULT, "mix": None})
    with pytest.raises(error, match=match):
        Fn.topm_channel_attention(
            args["q"], args["k"], args["v"], args["temperature"], fractions=args["fractions"], mix=args["mix"]
        )


# ---------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "c, fractions, with_mix",
    [(5, None, False), (7, DEFAULT, False), (5, DEFAULT, True), (7, (0.3, 1.0, 0.6), True)],
)
def test_triton_matches_reference(c, fractions, with_mix):
    q, k, v, temperature, mix = make_inputs(
        2, 3, c, 37, n_fracs=len(fractions) if with_mix else 0, dtype=torch.float32
    )
    assert_close(triton_vs_reference(q, k, v, temperature, mix, fractions))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(1, 3),
    c=st.integers(2, 20),
    length=st.integers(2, 50),  # at L = 1, q^ = sign(q): dq, dk are exactly 0 and a relative error is noise
    fractions=st.sampled_from([None, DEFAULT, (0.5, 1.0)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference_on_drawn_shapes(h, c, length, fractions, seed):
    assume(fractions is None or all(int(c * f) >= 1 for f in fractions))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, temperature, mix = make_inputs(
        1, h, c, length, n_fracs=len(fractions or ()), dtype=torch.float32, gen=gen
    )
    assert_close(triton_vs_reference(q, k, v, temperature, mix, fractions, block_l=16, splits=2))


@pytest.mark.parametrize("c, block_l, splits", [(48, 16, 3), (13, 32, 2), (1, 16, 2)])
def test_triton_launchers_with_split_reductions(c, block_l, splits):
    """Several L blocks per split and several splits per (b,h): the partial reductions are exercised."""
    fractions = DEFAULT if c > 1 else (1.0,)
    q, k, v, temperature, mix = make_inputs(1, 2, c, 70, n_fracs=len(fractions), dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, temperature, mix, fractions, block_l=block_l, splits=splits))


def test_triton_non_contiguous_inputs():
    b, h, c, length = 2, 3, 5, 37
    # q: heads split out of a channels-last-like (B, L, h*c) tensor; k: a slice; v: transposed storage
    q = torch.randn(b, length, h * c).view(b, length, h, c).permute(0, 2, 3, 1)
    k = torch.randn(b, h, c + 2, length + 3)[:, :, 1:-1, 2:-1]
    v = torch.randn(b, h, length, c).transpose(-1, -2)
    temperature = (torch.rand(2 * h) + 0.5)[::2]
    mix = (torch.rand(2 * len(DEFAULT)) + 0.1)[1::2]
    assert not any(x.is_contiguous() for x in (q, k, v, temperature, mix))
    assert_close(triton_vs_reference(q, k, v, temperature, mix, DEFAULT))


def test_triton_ties_keep_lower_index():
    """Exactly tied scores: the kept set must follow the stable order (lower index first).

    Key rows are scaled one-hot vectors, several on the same pixel, so every score is one product
    q^[i, l] * 1 and duplicates tie exactly in float32 and float64 alike."""
    q, _, v, temperature, _ = make_inputs(1, 2, 7, 37, dtype=torch.float32)
    k = torch.zeros_like(q)
    for row, pixel in enumerate([0, 2, 5, 2, 7, 2, 0]):
        k[:, :, row, pixel] = 3.0
    scores = cplfast.reference.channel_attention.channel_scores(q.double(), k.double(), temperature.double())
    assert torch.equal(scores[..., 1], scores[..., 5]) and torch.equal(scores[..., 0], scores[..., 6])
    assert_close(triton_vs_reference(q, k, v, temperature, None, (3 / 7, 5 / 7)))


def test_triton_zero_norm_row():
    """A row of zeros hits the eps clamp of the normalisation (no gradient through the clamped norm)."""
    q, k, v, temperature, mix = make_inputs(1, 2, 5, 37, n_fracs=2, dtype=torch.float32)
    q[0, 1, 2] = 0.0
    k[0, 0, 3] = 0.0
    assert_close(triton_vs_reference(q, k, v, temperature, mix, (0.4, 1.0)))


def test_triton_fraction_one_equals_plain_softmax():
    q, k, v, temperature, _ = make_inputs(1, 2, 7, 20, dtype=torch.float32)
    with cplfast.use_backend("triton"):
        full = Fn.topm_channel_attention(q, k, v, temperature, fractions=(1.0,))
        mdta = Fn.topm_channel_attention(q, k, v, temperature, fractions=None)
    assert rel(full, mdta) <= 1e-6


def test_triton_launchers_overwrite_poisoned_buffers(monkeypatch):
    from cplfast.kernels import channel_attention as kernels

    def poisoned(shape, dtype, device):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned)
    q, k, v, temperature, mix = make_inputs(2, 3, 7, 37, n_fracs=4, dtype=torch.float32)
    errors = triton_vs_reference(q, k, v, temperature, mix, DEFAULT, block_l=16, splits=2)
    assert all(np.isfinite(e) for e in errors.values()), errors
    assert_close(errors)


def test_opcheck_custom_ops():
    from cplfast.ops import channel_attention as ops

    q, k, v, temperature, mix = make_inputs(1, 2, 5, 9, n_fracs=2, dtype=torch.float32)
    for x in (q, k, v, temperature, mix):
        x.requires_grad_()
    torch.library.opcheck(ops.topm_channel_attention_fwd, (q, k, v, temperature, mix, [2, 4]))
    _, *saved = ops.topm_channel_attention_fwd(q, k, v, temperature, None, [])
    grad_out = torch.randn_like(q)
    plain = (grad_out, q.detach(), k.detach(), v.detach(), temperature.detach(), None, *[s.detach() for s in saved], [])
    torch.library.opcheck(ops.topm_channel_attention_bwd, plain, test_utils=NO_AUTOGRAD_CHECKS)


def test_torch_compile_fullgraph():
    from cplfast.ops.channel_attention import topm_channel_attention as fused

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = torch.nn.Parameter(torch.rand(2) + 0.5)
            self.mix = torch.nn.Parameter(torch.rand(2))

        def forward(self, x):
            q, k, v = x.chunk(3, dim=2)
            return fused(q, k, v, self.temperature, fractions=(0.4, 0.8), mix=self.mix).sin()

    block = Block()
    x = torch.randn(1, 2, 15, 10, requires_grad=True)
    with cplfast.use_backend("triton"):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.square().sum().backward()
    grads = [x.grad, block.temperature.grad, block.mix.grad]
    x64 = x.detach().double().requires_grad_()
    t64, mix64 = (p.detach().double().requires_grad_() for p in (block.temperature, block.mix))
    q, k, v = x64.chunk(3, dim=2)
    want = reference_op(q, k, v, t64, fractions=(0.4, 0.8), mix=mix64).sin()
    want.square().sum().backward()
    assert rel(out, want) <= 2e-5
    for got, ref in zip(grads, [x64.grad, t64.grad, mix64.grad]):
        assert rel(got, ref) <= 2e-3


# ---------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------

CUDA_TOLERANCES = {torch.float32: (2e-5, 2e-3), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCES), ids=str)
@pytest.mark.parametrize(
    "shape, fractions, with_mix",
    [((2, 3, 7, 37), DEFAULT, True), ((4, 2, 48, 4099), DEFAULT, False), ((2, 1, 64, 1000), None, False),
     ((1, 2, 96, 513), (0.5, 0.75), True)],
)
def test_cuda_matches_reference(dtype, shape, fractions, with_mix):
    q, k, v, temperature, mix = make_inputs(
        *shape, n_fracs=len(fractions) if with_mix else 0, dtype=torch.float32, device="cuda"
    )
    q, k, v = (x.to(dtype) for x in (q, k, v))
    fwd_tol, grad_tol = CUDA_TOLERANCES[dtype]
    assert_close(triton_vs_reference(q, k, v, temperature, mix, fractions), fwd_tol, grad_tol)
