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


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """Element-wise error of ``a`` against ``b``: max |a - b| / (|b| + max(rms(b), floor)), i.e. relative
    for the large entries and relative to the typical magnitude for entries near zero."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    scale = b.square().mean().sqrt().clamp_min(floor)
    return ((a - b).abs() / (b.abs() + scale)).max().item()


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


def triton_vs_reference(q, k, v, temperature, mix, fractions, *, floor=1e-30, **launch):
    """Forward and every input gradient of the Triton path (fp32) against autograd on the float64
    reference. Returns {name: element-wise error (see ``rel``)}; ``floor``: least magnitude scale."""
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
        errors[name] = rel(got, want, floor)
    return errors


def assert_close(errors, fwd_tol=1e-6, grad_tol=1e-5):
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
    c=st.integers(2, 36),
    length=st.integers(2, 40),  # at L = 1, q^ = sign(q): dq, dk are exactly 0 and a relative error is noise
    fractions=st.sampled_from([None, DEFAULT, (0.5, 1.0)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference_on_drawn_shapes(h, c, length, fractions, seed):
    assume(fractions is None or all(int(c * f) >= 1 for f in fractions))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, temperature, mix = make_inputs(
        1, h, c, length, n_fracs=len(fractions or ()), dtype=torch.float32, gen=gen
    )
    launch = dict(chunk=16, block_l=16, splits=2, block_r=8, rank_chunk=8)
    assert_close(triton_vs_reference(q, k, v, temperature, mix, fractions, **launch))


@pytest.mark.parametrize("c, block_l, splits", [(48, 16, 3), (13, 32, 2), (1, 16, 2)])
def test_triton_launchers_with_split_reductions(c, block_l, splits):
    """Several L blocks per split and several splits per (b,h): the partial reductions are exercised."""
    fractions = DEFAULT if c > 1 else (1.0,)
    q, k, v, temperature, mix = make_inputs(1, 2, c, 70, n_fracs=len(fractions), dtype=torch.float32)
    assert_close(triton_vs_reference(q, k, v, temperature, mix, fractions, block_l=block_l, splits=splits))


@pytest.mark.parametrize("fractions, with_mix", [(DEFAULT, True), (None, False)])
def test_triton_chunked_launches(fractions, with_mix):
    """Every loop of the launches taken several times and ended by a partial step: c = 40 in three
    K-chunks of 16 (a 3x3 grid of Gram tiles, three row blocks over L, three K steps), five row blocks
    of 8 in the c x c kernels, ten rank steps of 4 competitors, two splits of four L blocks."""
    from cplfast.kernels.channel_attention import make_plan

    q, k, v, temperature, mix = make_inputs(1, 2, 40, 61, n_fracs=4 if with_mix else 0, dtype=torch.float32)
    plan = make_plan(q.shape, gpu=False, chunk=16, block_l=16, splits=2, block_r=8, rank_chunk=4)
    assert (plan.tiles, plan.l_blocks, plan.splits, plan.blocks_per_split, plan.row_blocks) == (3, 4, 2, 2, 5)
    assert_close(triton_vs_reference(q, k, v, temperature, mix, fractions, plan=plan))


def cuda_plan_case(c, length, fractions, with_mix):
    """The plan the launcher builds for an H100 (132 SMs), run under the interpreter."""
    from cplfast.kernels.channel_attention import make_plan

    q, k, v, temperature, mix = make_inputs(
        1, 1, c, length, n_fracs=len(fractions) if with_mix and fractions else 0, dtype=torch.float32
    )
    plan = make_plan(q.shape, gpu=True, sms=132)
    errors = triton_vs_reference(q, k, v, temperature, mix, fractions, plan=plan)
    return plan, errors


@pytest.mark.parametrize(
    "c, fractions, with_mix",
    [(96, DEFAULT, True), (96, None, False), pytest.param(160, DEFAULT, False, marks=pytest.mark.slow)],
)
def test_triton_cuda_plan(c, fractions, with_mix):
    """c = 96 (refinement / decoder level 1) and c = 160 (PIP level 3) with the CUDA block sizes:
    K-chunks of 32 (no padding to 128 / 256), several row blocks, rank steps and L splits."""
    plan, errors = cuda_plan_case(c, 150, fractions, with_mix)
    assert plan.chunk == 32 and plan.tiles == c // 32
    assert plan.row_blocks > 1 and plan.rank_chunk < plan.c and plan.splits == 3
    assert_close(errors)


@pytest.mark.slow
@pytest.mark.parametrize("c, fractions", [(192, DEFAULT), (80, DEFAULT), (40, None)])
def test_triton_cuda_plan_more_widths(c, fractions):
    """Six K-chunks (c = 192), a masked last chunk (c = 80, 40 in chunks of 32)."""
    plan, errors = cuda_plan_case(c, 70, fractions, True)
    assert plan.chunk == 32 and plan.tiles == -(-c // 32)
    assert_close(errors)


def test_triton_non_contiguous_inputs():
    b, h, c, length = 2, 2, 21, 37
    # q: heads split out of a channels-last-like (B, L, h*c) tensor; k: a slice; v: transposed storage
    q = torch.randn(b, length, h * c).view(b, length, h, c).permute(0, 2, 3, 1)
    k = torch.randn(b, h, c + 2, length + 3)[:, :, 1:-1, 2:-1]
    v = torch.randn(b, h, length, c).transpose(-1, -2)
    temperature = (torch.rand(2 * h) + 0.5)[::2]
    mix = (torch.rand(2 * len(DEFAULT)) + 0.1)[1::2]
    assert not any(x.is_contiguous() for x in (q, k, v, temperature, mix))
    assert_close(triton_vs_reference(q, k, v, temperature, mix, DEFAULT))
    assert_close(triton_vs_reference(q, k, v, temperature, mix, DEFAULT, chunk=16, block_l=16, block_r=4))


def one_hot_keys(q, pixels, scale=3.0):
    """Key rows that are scaled one-hot vectors: every score is one product q^[i, l] * 1, so rows
    sharing a pixel tie exactly in float32 and float64 alike."""
    k = torch.zeros_like(q)
    for row, pixel in enumerate(pixels):
        k[:, :, row, pixel] = scale
    return k


LAUNCHES = {"interpreter": {}, "chunked": dict(chunk=16, block_l=16, block_r=8, rank_chunk=4, splits=2)}


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_triton_ties_keep_lower_index(launch):
    """Exactly tied scores: the kept set must follow the stable order (lower index first), also when
    the tied competitors lie in different rank steps."""
    q, _, v, temperature, _ = make_inputs(1, 2, 7, 37, dtype=torch.float32)
    k = one_hot_keys(q, [0, 2, 5, 2, 7, 2, 0])
    scores = cplfast.reference.channel_attention.channel_scores(q.double(), k.double(), temperature.double())
    assert torch.equal(scores[..., 1], scores[..., 5]) and torch.equal(scores[..., 0], scores[..., 6])
    assert_close(triton_vs_reference(q, k, v, temperature, None, (3 / 7, 5 / 7), **LAUNCHES[launch]))

    q, _, v, temperature, mix = make_inputs(1, 2, 33, 40, n_fracs=4, dtype=torch.float32)
    k = one_hot_keys(q, [(3 * row) % 5 for row in range(33)])  # duplicated key rows: 5 groups of ties
    assert_close(triton_vs_reference(q, k, v, temperature, mix, DEFAULT, **LAUNCHES[launch]))


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_triton_all_scores_equal(launch):
    """Every key row the same one-hot vector: each row's scores are all equal, so the top m are the
    first m columns. (dq is 0 then: the rows of dA sum to 0 and all k^ rows are equal; its float64
    value is rounding noise, so errors are measured against a magnitude floor of 1.)"""
    q, _, v, temperature, mix = make_inputs(1, 2, 21, 30, n_fracs=4, dtype=torch.float32)
    k = one_hot_keys(q, [4] * 21)
    scores = cplfast.reference.channel_attention.channel_scores(q.double(), k.double(), temperature.double())
    assert torch.equal(scores, scores[..., :1].expand_as(scores))
    assert_close(triton_vs_reference(q, k, v, temperature, mix, DEFAULT, floor=1.0, **LAUNCHES[launch]))


def test_triton_cuda_plan_ties():
    """Duplicated key rows with the CUDA plan at c = 96 (rank steps of 2 competitors)."""
    from cplfast.kernels.channel_attention import make_plan

    q, _, v, temperature, mix = make_inputs(1, 1, 96, 40, n_fracs=4, dtype=torch.float32)
    k = one_hot_keys(q, [(7 * row) % 11 for row in range(96)])
    plan = make_plan(q.shape, gpu=True, sms=132)
    assert_close(triton_vs_reference(q, k, v, temperature, mix, DEFAULT, plan=plan))


def test_triton_zero_norm_row():
    """A row of zeros hits the eps clamp of the normalisation (no gradient through the clamped norm)."""
    q, k, v, temperature, mix = make_inputs(1, 2, 5, 37, n_fracs=2, dtype=torch.float32)
    q[0, 1, 2] = 0.0
    k[0, 0, 3] = 0.0
    assert_close(triton_vs_reference(q, k, v, temperature, mix, (0.4, 1.0)))


def test_make_plan_rejects_bad_settings():
    from cplfast.kernels.channel_attention import channel_attention_forward, make_plan

    with pytest.raises(ValueError, match="chunk must be a power of two"):
        make_plan((1, 1, 40, 10), gpu=False, chunk=24)
    with pytest.raises(ValueError, match="block_l must be a power of two"):
        make_plan((1, 1, 40, 10), gpu=False, block_l=8)
    with pytest.raises(ValueError, match="splits must be"):
        make_plan((1, 1, 40, 10), gpu=False, splits=0)
    q, k, v, temperature, _ = make_inputs(1, 1, 8, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="plan is for c=40"):
        channel_attention_forward(q, k, v, temperature, None, [], plan=make_plan((1, 1, 40, 10), gpu=False))


def test_cuda_plan_shapes():
    """The CUDA plan keeps every tile off c x c: K-chunks of 32 without padding 96 / 160 to a power of
    two, and the L blocks on the unbounded grid axis."""
    from cplfast.kernels.channel_attention import make_plan

    for c, chunk in [(12, 16), (32, 32), (40, 32), (48, 32), (64, 32), (80, 32), (96, 32), (128, 32),
                     (160, 32), (192, 32), (256, 32)]:
        plan = make_plan((8, 2, c, 4096), gpu=True, sms=132)
        assert plan.chunk == chunk, c
        assert plan.block_r * plan.block_c <= 1024 and plan.block_r * plan.block_c * plan.rank_chunk <= 8192
    plan = make_plan((1, 1, 48, 7680 * 4320), gpu=True, sms=132)
    assert plan.l_blocks > 65_535 and plan.splits == 2 * 132 // plan.tiles**2  # two waves of programs


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
    q, k, v, temperature, mix = make_inputs(2, 3, 19, 37, n_fracs=4, dtype=torch.float32)
    errors = triton_vs_reference(q, k, v, temperature, mix, DEFAULT, chunk=16, block_l=16, splits=2, block_r=4)
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
    assert rel(out, want) <= 1e-6
    for got, ref in zip(grads, [x64.grad, t64.grad, mix64.grad]):
        assert rel(got, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------

CUDA_TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


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


def test_triton_large_temperature_is_exact():
    """Scores up to 96, past fp32 exp's range (88.7) unless the row maximum is subtracted first. Rows of
    +-1 over L = 64 have norm 8, so G^ = (q . k) / 64 and G^ * t are exact in fp32 for t = 96 and 90 (key
    row j is query row j with j % 2 signs flipped: every row's maximum is 87 or more)."""
    gen = torch.Generator().manual_seed(0)
    c, length = 7, 64
    q = (torch.randint(0, 2, (1, 2, c, length), generator=gen) * 2 - 1).float()
    flips = torch.arange(length)[None, :] < (torch.arange(c) % 2)[:, None]
    k = torch.where(flips, -q, q)
    v = torch.randn(1, 2, c, length, generator=gen)
    temperature = torch.tensor([96.0, 90.0])
    scores = cplfast.reference.channel_attention.channel_scores(q.double(), k.double(), temperature.double())
    assert scores.max() > 90 and scores.amax(dim=-1).min() >= 87
    assert_close(triton_vs_reference(q, k, v, temperature, torch.tensor([0.4, 0.3, 0.2, 0.1]), DEFAULT))
    assert_close(triton_vs_reference(q, k, v, temperature, None, None))
