"""Tests of ``sparse_prompt`` (SPEC §3.1).

Part 1 checks the reference (the oracle) against formulations written here from the spec: numpy loops
with a hand-written bilinear resize, PromptIR's repeat-and-sum, float64 gradcheck, properties and bad
input. Part 2 checks the fused Triton kernel (interpreter on CPU, or CUDA) against the reference
evaluated in float64: outputs and every input gradient, odd shapes, layouts, poisoned buffers,
``torch.library.opcheck`` and ``torch.compile``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cplfast
from cplfast import functional
from cplfast._backend import interpreter_enabled
from cplfast.reference.sparse_prompt import sparse_prompt as reference_sparse_prompt
from cplfast.reference.sparse_prompt import topk_mask

# ----------------------------------------------------------------------------------------- helpers


def make_inputs(b, c, h, w, n, d, s, *, bias=True, dtype=torch.float64, device="cpu", scale=1.0):
    x = torch.randn(b, c, h, w, dtype=dtype, device=device)
    weight = torch.randn(n, c, dtype=dtype, device=device) * scale
    bias_t = torch.randn(n, dtype=dtype, device=device) if bias else None
    prompts = torch.randn(n, d, s, s, dtype=dtype, device=device)
    return x, weight, bias_t, prompts


def numpy_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of (..., H, W), align_corners=False, written per output pixel from the formula
    src = max((dst + 0.5) * in / out - 0.5, 0); i1 = min(i0 + 1, in - 1)."""
    in_h, in_w = img.shape[-2:]
    out = np.zeros(img.shape[:-2] + (out_h, out_w))

    def taps(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    for oy in range(out_h):
        y0, y1, ly = taps(oy, in_h, out_h)
        for ox in range(out_w):
            x0, x1, lx = taps(ox, in_w, out_w)
            out[..., oy, ox] = (
                (1 - ly) * ((1 - lx) * img[..., y0, x0] + lx * img[..., y0, x1])
                + ly * ((1 - lx) * img[..., y1, x0] + lx * img[..., y1, x1])
            )
    return out


def numpy_sparse_prompt(x, weight, bias, prompts, k, temperature, renorm, size):
    """SPEC §3.1 step by step in numpy float64 (top-k by a stable sort on -w: lower index wins ties)."""
    x, weight, prompts = (t.detach().double().numpy() for t in (x, weight, prompts))
    n = weight.shape[0]
    emb = x.mean(axis=(2, 3))
    logits = emb @ weight.T + (0.0 if bias is None else bias.detach().double().numpy())
    z = logits / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    w = e / e.sum(axis=1, keepdims=True)
    if k < n:
        kept = np.zeros_like(w)
        for row in range(w.shape[0]):
            order = np.argsort(-w[row], kind="stable")[:k]
            kept[row, order] = w[row, order]
            if renorm:
                kept[row] /= kept[row].sum()
        w = kept
    mixed = np.einsum("bn,ndij->bdij", w, prompts)
    out_h, out_w = size if size is not None else x.shape[-2:]
    return numpy_bilinear(mixed, out_h, out_w), w


def promptir_repeat_formulation(x, weight, bias, prompts):
    """PromptIR's PromptGenBlock mixing step: the (B,N,D,S,S) repeat, summed over N, then resized."""
    b, _, h, w = x.shape
    emb = x.mean(dim=(-2, -1))
    prompt_weights = F.softmax(F.linear(emb, weight, bias), dim=1)
    repeated = prompts.unsqueeze(0).repeat(b, 1, 1, 1, 1)
    prompt = (prompt_weights[:, :, None, None, None] * repeated).sum(dim=1)
    return F.interpolate(prompt, (h, w), mode="bilinear"), prompt_weights


# ------------------------------------------------------------------------------ reference: the oracle

REFERENCE_CASES = [
    # b, c, h, w, n, d, s, k, temperature, renorm, bias, size
    (2, 5, 7, 9, 7, 3, 6, 3, 0.7, True, True, None),
    (3, 4, 6, 6, 7, 2, 6, 7, 1.0, False, False, None),
    (2, 5, 5, 4, 7, 2, 9, 1, 1.3, False, True, (4, 3)),
    (1, 3, 3, 11, 5, 3, 4, 2, 2.5, True, False, (10, 3)),
]


@pytest.mark.parametrize("b,c,h,w,n,d,s,k,temperature,renorm,bias,size", REFERENCE_CASES)
def test_reference_matches_numpy_loops(b, c, h, w, n, d, s, k, temperature, renorm, bias, size):
    x, weight, bias_t, prompts = make_inputs(b, c, h, w, n, d, s, bias=bias)
    out, routing = reference_sparse_prompt(
        x, weight, bias_t, prompts, k=k, temperature=temperature, renorm=renorm, size=size
    )
    expected_out, expected_routing = numpy_sparse_prompt(x, weight, bias_t, prompts, k, temperature, renorm, size)
    assert out.shape == expected_out.shape
    np.testing.assert_allclose(routing.numpy(), expected_routing, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.numpy(), expected_out, rtol=1e-10, atol=1e-12)


GRADCHECK_CASES = [
    (2, 3, 3, 4, 5, 2, 3, 2, 0.7, True, True, None),
    (2, 3, 4, 4, 5, 2, 4, 5, 1.0, False, False, None),
    (1, 2, 3, 3, 4, 2, 4, 1, 1.3, False, True, (2, 3)),
]


@pytest.mark.parametrize("b,c,h,w,n,d,s,k,temperature,renorm,bias,size", GRADCHECK_CASES)
def test_reference_gradcheck(b, c, h, w, n, d, s, k, temperature, renorm, bias, size):
    inputs = make_inputs(b, c, h, w, n, d, s, bias=bias)
    inputs = [t.requires_grad_() if t is not None else None for t in inputs]

    def fn(x, weight, bias_t, prompts):
        out, routing = reference_sparse_prompt(
            x, weight, bias_t, prompts, k=k, temperature=temperature, renorm=renorm, size=size
        )
        return out, routing

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7)


def test_reference_k_equal_n_is_dense():
    x, weight, bias, prompts = make_inputs(2, 5, 6, 7, 7, 3, 5)
    dense_out, dense_routing = functional.sparse_prompt(x, weight, bias, prompts, k=None, temperature=0.8)
    for renorm in (False, True):
        out, routing = functional.sparse_prompt(x, weight, bias, prompts, k=7, temperature=0.8, renorm=renorm)
        torch.testing.assert_close(out, dense_out, rtol=0, atol=0)
        torch.testing.assert_close(routing, dense_routing, rtol=0, atol=0)
    torch.testing.assert_close(dense_routing.sum(1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_reference_topk_keeps_k_and_renorm_sums_to_one(k):
    x, weight, bias, prompts = make_inputs(4, 5, 3, 4, 7, 2, 3)
    _, plain = functional.sparse_prompt(x, weight, bias, prompts, k=k)
    _, renormed = functional.sparse_prompt(x, weight, bias, prompts, k=k, renorm=True)
    assert ((plain != 0).sum(1) == k).all()
    assert ((renormed != 0) == (plain != 0)).all()
    torch.testing.assert_close(renormed.sum(1), torch.ones(4, dtype=torch.float64))
    # the kept entries are the k largest softmax weights
    _, dense = functional.sparse_prompt(x, weight, bias, prompts, k=None)
    smallest_kept = torch.where(plain != 0, dense, torch.inf).min(1).values
    largest_dropped = torch.where(plain == 0, dense, -torch.inf).max(1).values
    assert (smallest_kept >= largest_dropped).all()


def test_topk_mask_ties_prefer_lower_index():
    w = torch.tensor([[0.2, 0.3, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])
    assert topk_mask(w, 1).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert topk_mask(w, 3).tolist() == [[True, True, True, False], [True, True, True, False]]


def test_reference_equals_promptir_repeat_formulation():
    x, weight, bias, prompts = make_inputs(3, 6, 9, 7, 5, 4, 6)
    expected_out, expected_routing = promptir_repeat_formulation(x, weight, bias, prompts)
    out, routing = functional.sparse_prompt(x, weight, bias, prompts)
    torch.testing.assert_close(routing, expected_routing)
    torch.testing.assert_close(out, expected_out)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3), c=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 7),
    n=st.integers(1, 6), d=st.integers(1, 3), s=st.integers(1, 6), k_frac=st.floats(0.0, 1.0),
    temperature=st.floats(0.2, 4.0), renorm=st.booleans(), bias=st.booleans(),
    size=st.one_of(st.none(), st.tuples(st.integers(1, 9), st.integers(1, 9))),
    seed=st.integers(0, 2**16),
)
def test_reference_hypothesis_shapes(b, c, h, w, n, d, s, k_frac, temperature, renorm, bias, size, seed):
    torch.manual_seed(seed)
    k = max(1, min(n, round(k_frac * n)))
    x, weight, bias_t, prompts = make_inputs(b, c, h, w, n, d, s, bias=bias)
    out, routing = functional.sparse_prompt(
        x, weight, bias_t, prompts, k=k, temperature=temperature, renorm=renorm, size=size
    )
    expected_out, expected_routing = numpy_sparse_prompt(x, weight, bias_t, prompts, k, temperature, renorm, size)
    np.testing.assert_allclose(routing.numpy(), expected_routing, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), expected_out, rtol=1e-9, atol=1e-11)


def _good_args():
    x, weight, bias, prompts = make_inputs(2, 5, 4, 4, 7, 3, 3, dtype=torch.float32)
    return dict(x=x, weight=weight, bias=bias, prompts=prompts)


def _call(**changes):
    args = _good_args()
    kwargs = {key: changes.pop(key) for key in ("k", "temperature", "renorm", "size") if key in changes}
    args.update(changes)
    return functional.sparse_prompt(args["x"], args["weight"], args["bias"], args["prompts"], **kwargs)


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(x=torch.randn(2, 5, 4)), ValueError, "^x must"),
        (dict(x=torch.randn(2, 6, 4, 4)), ValueError, "^weight must"),
        (dict(weight=torch.randn(7, 5, 1)), ValueError, "^weight must"),
        (dict(prompts=torch.randn(6, 3, 3, 3)), ValueError, "^prompts must"),
        (dict(prompts=torch.randn(7, 3, 3, 4)), ValueError, "square"),
        (dict(prompts=torch.randn(7, 3, 3)), ValueError, "^prompts must"),
        (dict(bias=torch.randn(6)), ValueError, "^bias must"),
        (dict(x=torch.randint(0, 3, (2, 5, 4, 4))), TypeError, "^x must"),
        (dict(weight=torch.randn(7, 5, dtype=torch.float64)), TypeError, "dtype"),
        (dict(x="not a tensor"), TypeError, "^x must"),
        (dict(prompts=torch.randn(7, 3, 3, 3, device="meta")), ValueError, "device"),
        (dict(x=torch.randn(2, 5, 0, 4)), ValueError, "^x must"),
        (dict(k=0), ValueError, "^k must"),
        (dict(k=8), ValueError, "^k must"),
        (dict(k=2.0), TypeError, "^k must"),
        (dict(k=True), TypeError, "^k must"),
        (dict(temperature=0.0), ValueError, "^temperature must"),
        (dict(temperature=-1.0), ValueError, "^temperature must"),
        (dict(temperature=float("nan")), ValueError, "^temperature must"),
        (dict(temperature=float("inf")), ValueError, "^temperature must"),
        (dict(temperature="hot"), TypeError, "^temperature must"),
        (dict(renorm=1), TypeError, "^renorm must"),
        (dict(size=(0, 4)), ValueError, "^size must"),
        (dict(size=(4,)), ValueError, "^size must"),
        (dict(size=(4.0, 4)), ValueError, "^size must"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, error, words):
    with pytest.raises(error, match=words):
        _call(**changes)


def test_bad_inputs_rejected_on_triton_backend_too():
    with cplfast.use_backend("triton"):
        with pytest.raises(ValueError, match="k"):
            _call(k=0)
        if cplfast._backend.triton_available():
            x, weight, bias, prompts = make_inputs(2, 5, 4, 4, 7, 3, 3, dtype=torch.float64)
            with pytest.raises(TypeError, match="float64"):
                functional.sparse_prompt(x, weight, bias, prompts, k=2)


# ---------------------------------------------------------------------------------- the Triton kernel

HAS_CUDA = torch.cuda.is_available()
TOLERANCES = {  # (forward, gradients): max |got - want| / max(max |want|, ERR_FLOOR), element-wise
    torch.float32: (1e-6, 1e-5),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
ERR_FLOOR = 1e-2  # keeps gradients that vanish exactly (k=1 with renorm) from dividing rounding noise by 0


def max_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = ERR_FLOOR) -> float:
    """Largest element-wise error relative to the largest expected magnitude (with a floor)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return 0.0
    return ((actual - expected).abs().max() / max(expected.abs().max().item(), floor)).item()


KERNEL_TARGETS = [
    pytest.param(
        "cpu", torch.float32, id="interp-fp32",
        marks=pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 for CPU tensors"),
    ),
    *[
        pytest.param(
            "cuda", dtype, id=f"cuda-{str(dtype)[6:]}",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
        )
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    ],
]


def _target_or_skip():
    if HAS_CUDA:
        return "cuda"
    if interpreter_enabled():
        return "cpu"
    pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    from cplfast.kernels import sparse_prompt as module

    return module


def run_both(x, weight, bias, prompts, *, k, temperature=1.0, renorm=False, size=None, grad_layout=None,
             use_out=True, use_routing=True):
    """Kernel forward/backward and the float64 reference on the same values; returns both result dicts."""
    # detach() keeps the caller's layout (channels-last, strided views)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias, prompts)]
    with cplfast.use_backend("triton"):
        out, routing = functional.sparse_prompt(
            *leaves, k=k, temperature=temperature, renorm=renorm, size=size
        )
    grad_out = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    if grad_layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "strided":
        grad_out = torch.randn(out.shape[0], out.shape[1], out.shape[2], 2 * out.shape[3], dtype=out.dtype,
                               device=out.device)[..., ::2]
    grad_routing = torch.randn(routing.shape, dtype=routing.dtype, device=routing.device)
    loss = 0
    if use_out:
        loss = loss + (out * grad_out).sum()
    if use_routing:
        loss = loss + (routing * grad_routing).sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True, materialize_grads=True)

    ref_leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in leaves]
    ref_out, ref_routing = reference_sparse_prompt(
        *ref_leaves, k=k, temperature=temperature, renorm=renorm, size=size
    )
    ref_loss = 0
    if use_out:
        ref_loss = ref_loss + (ref_out * grad_out.double().cpu()).sum()
    if use_routing:
        ref_loss = ref_loss + (ref_routing * grad_routing.double().cpu()).sum()
    ref_grads = torch.autograd.grad(
        ref_loss, [t for t in ref_leaves if t is not None], allow_unused=True, materialize_grads=True
    )
    names = [name for name, t in zip(("x", "weight", "bias", "prompts"), leaves) if t is not None]
    kernel = dict(out=out, routing=routing, **{f"grad_{n}": g for n, g in zip(names, grads)})
    reference = dict(out=ref_out, routing=ref_routing, **{f"grad_{n}": g for n, g in zip(names, ref_grads)})
    return kernel, reference


def assert_matches(kernel, reference, dtype):
    forward_tol, grad_tol = TOLERANCES[dtype]
    for key, expected in reference.items():
        actual = kernel[key]
        assert actual.shape == expected.shape, key
        assert actual.dtype == dtype, key
        assert torch.isfinite(actual).all(), key
        tol = grad_tol if key.startswith("grad_") else forward_tol
        err = max_err(actual, expected)
        assert err <= tol, f"{key}: element-wise error {err:.3g} > {tol}"


KERNEL_CASES = [
    # b, c, h, w, n, d, s, k, temperature, renorm, bias, size
    pytest.param(2, 5, 7, 9, 7, 3, 6, 3, 0.7, True, True, None, id="upscale-k3-renorm"),
    pytest.param(3, 5, 6, 6, 7, 2, 6, 7, 1.0, False, False, None, id="identity-dense-nobias"),
    pytest.param(2, 5, 5, 4, 7, 2, 9, 1, 1.3, False, True, (4, 3), id="downscale-k1"),
    pytest.param(1, 5, 3, 11, 7, 3, 4, 3, 2.5, False, False, (10, 3), id="mixed-k3-nobias"),
    pytest.param(2, 5, 4, 4, 7, 2, 4, 7, 0.5, True, True, (4, 4), id="identity-kN-renorm-ignored"),
    pytest.param(2, 5, 3, 3, 7, 2, 5, 1, 1.0, True, True, (5, 5), id="k1-renorm-routing-constant"),
]


@pytest.mark.parametrize("device,dtype", KERNEL_TARGETS)
@pytest.mark.parametrize("b,c,h,w,n,d,s,k,temperature,renorm,bias,size", KERNEL_CASES)
def test_kernel_matches_reference(kernels, device, dtype, b, c, h, w, n, d, s, k, temperature, renorm, bias, size):
    inputs = make_inputs(b, c, h, w, n, d, s, bias=bias, dtype=dtype, device=device)
    kernel, reference = run_both(*inputs, k=k, temperature=temperature, renorm=renorm, size=size)
    assert_matches(kernel, reference, dtype)
    if k < n:
        assert ((kernel["routing"] != 0).sum(1) == k).all()


@pytest.mark.parametrize("device,dtype", KERNEL_TARGETS)
def test_kernel_channels_last_and_strided_inputs(kernels, device, dtype):
    x, weight, bias, prompts = make_inputs(2, 5, 5, 7, 7, 3, 4, dtype=dtype, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    kernel, reference = run_both(x, weight, bias, prompts, k=3, renorm=True, grad_layout="channels_last")
    assert_matches(kernel, reference, dtype)
    # strided views everywhere: x sliced along W (H and W no longer fold), weight and prompts transposed
    x_big = torch.randn(2, 5, 6, 13, dtype=dtype, device=device)
    x_view = x_big[:, :, 1:, ::2]
    weight_view = torch.randn(5, 7, dtype=dtype, device=device).t()
    prompts_view = torch.randn(7, 3, 6, 6, dtype=dtype, device=device).transpose(-1, -2)
    assert not (x_view.is_contiguous() or weight_view.is_contiguous() or prompts_view.is_contiguous())
    kernel, reference = run_both(x_view, weight_view, bias, prompts_view, k=5, size=(4, 9), grad_layout="strided")
    assert_matches(kernel, reference, dtype)


@pytest.mark.parametrize("device,dtype", KERNEL_TARGETS)
@pytest.mark.parametrize("use_out,use_routing", [(True, False), (False, True)])
def test_kernel_gradient_from_one_output(kernels, device, dtype, use_out, use_routing):
    inputs = make_inputs(2, 5, 4, 6, 7, 2, 5, dtype=dtype, device=device)
    kernel, reference = run_both(*inputs, k=3, renorm=True, temperature=0.9, use_out=use_out,
                                 use_routing=use_routing)
    assert_matches(kernel, reference, dtype)


@pytest.mark.parametrize("device,dtype", KERNEL_TARGETS)
def test_kernel_broadcast_grad_out(kernels, device, dtype):
    # loss = out.sum() hands the backward an expanded grad_out with all strides 0
    x, weight, bias, prompts = make_inputs(2, 5, 4, 3, 7, 2, 5, dtype=dtype, device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, prompts)]
    with cplfast.use_backend("triton"):
        out, _ = functional.sparse_prompt(*leaves, k=3, size=(3, 6))
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref_out, _ = reference_sparse_prompt(*ref_leaves, k=3, size=(3, 6))
    ref_grads = torch.autograd.grad(ref_out.sum(), ref_leaves)
    for grad, ref_grad in zip(grads, ref_grads):
        assert max_err(grad, ref_grad) <= TOLERANCES[dtype][1]


def test_kernel_never_leaves_buffers_unwritten(kernels, monkeypatch):
    """Every buffer the launchers allocate starts as NaN: anything left unwritten shows in the results."""
    device = _target_or_skip()

    def poisoned(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned)
    n, k, size = 7, 3, (7, 4)
    x, weight, bias, prompts = make_inputs(3, 5, 6, 5, n, 2, 5, dtype=torch.float32, device=device)
    result = kernels.forward(x, weight, bias, prompts, k, 0.8, True, size)
    for name, tensor in result._asdict().items():
        assert torch.isfinite(tensor).all(), name
    ref_leaves = [t.double().cpu().requires_grad_() for t in (x, weight, bias, prompts)]
    ref_out, ref_routing = reference_sparse_prompt(*ref_leaves, k=k, temperature=0.8, renorm=True, size=size)
    assert max_err(result.out, ref_out) < 1e-6
    assert max_err(result.routing, ref_routing) < 1e-6

    grad_out = torch.randn(ref_out.shape, device=device)
    grad_routing = torch.randn(ref_routing.shape, device=device)
    grads = kernels.backward(
        grad_out, grad_routing, weight, prompts, result.emb, result.probs, result.mixw, k, 0.8, True, (6, 5), size
    )
    for name, tensor in grads._asdict().items():
        assert torch.isfinite(tensor).all(), name
    ref_grads = torch.autograd.grad(
        (ref_out * grad_out.double().cpu()).sum() + (ref_routing * grad_routing.double().cpu()).sum(), ref_leaves
    )
    assert max_err(grads.grad_emb, ref_grads[0][:, :, 0, 0]) < 1e-5
    assert max_err(grads.grad_weight, ref_grads[1]) < 1e-5
    assert max_err(grads.grad_bias, ref_grads[2]) < 1e-5
    assert max_err(grads.grad_prompts, ref_grads[3]) < 1e-5


@pytest.mark.parametrize("device,dtype", KERNEL_TARGETS)
def test_kernel_unselected_components_get_zero_prompt_gradient(kernels, device, dtype):
    # a one-image batch with k=2 of 7: five prompt components are never used
    inputs = make_inputs(1, 5, 4, 4, 7, 2, 3, dtype=dtype, device=device)
    kernel, reference = run_both(*inputs, k=2)
    unused = kernel["routing"][0] == 0
    assert int(unused.sum()) == 5
    assert (kernel["grad_prompts"][unused] == 0).all()
    assert_matches(kernel, reference, dtype)


def test_kernel_rejects_too_many_components(kernels):
    n = kernels.MAX_COMPONENTS + 1
    x, weight, bias, prompts = make_inputs(1, 2, 2, 2, n, 1, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="N="):
        kernels.forward(x, weight, bias, prompts, 1, 1.0, False, (2, 2))


# ----------------------------------------------------------------- launch plans the GPU uses, forced here

# PromptIR prompt level 1 at 128^2 training patches (SPEC §8): B=8, C=96, H=W=S=64, D=64, N=5.
LEVEL1 = dict(b=8, c=96, hw=64, n=5, d=64, s=64)
H200_SMS = 132


def _plans_for(kernels, monkeypatch, forward_overrides=None, backward_overrides=None, *, sms=None):
    """Make the launchers use the CUDA planning (with ``sms`` SMs) or the given overrides, and record every
    plan they launch with."""
    used = {"forward": [], "backward": []}
    forward_plan, backward_plan = kernels.forward_plan, kernels.backward_plan

    def forward_spy(*args, cuda, sms: int = 1, **kwargs):
        if sms_override is not None:
            cuda, sms = True, sms_override
        plan = forward_plan(*args, cuda=cuda, sms=sms, **kwargs, **(forward_overrides or {}))
        used["forward"].append(plan)
        return plan

    def backward_spy(*args, cuda, sms: int = 1, **kwargs):
        if sms_override is not None:
            cuda, sms = True, sms_override
        plan = backward_plan(*args, cuda=cuda, sms=sms, **kwargs, **(backward_overrides or {}))
        used["backward"].append(plan)
        return plan

    sms_override = sms
    monkeypatch.setattr(kernels, "forward_plan", forward_spy)
    monkeypatch.setattr(kernels, "backward_plan", backward_spy)
    return used


def test_cuda_plans_at_prompt_level1(kernels):
    """The settings the launchers pick on an H200 at prompt level 1 training (what the scaled-down tests
    below run): several GAP splits and loop iterations, several output/prompt blocks, several partials."""
    b, c, hw, n, d, s = (LEVEL1[key] for key in ("b", "c", "hw", "n", "d", "s"))
    nchw = kernels.forward_plan(b, c, hw, hw, n, d, (hw, hw), channels_last=False, cuda=True, sms=H200_SMS)
    assert nchw == kernels.ForwardPlan(gap_block_c=4, gap_block_hw=512, split=3, hw_per_split=1536,
                                       router_block_c=8, block=64, block_b=16, d_per_program=13, num_warps=4)
    last = kernels.forward_plan(b, c, hw, hw, n, d, (hw, hw), channels_last=True, cuda=True, sms=H200_SMS)
    assert last == kernels.ForwardPlan(gap_block_c=32, gap_block_hw=32, split=8, hw_per_split=512,
                                       router_block_c=8, block=64, block_b=16, d_per_program=13, num_warps=4)
    back = kernels.backward_plan(b, c, n, d, s, cuda=True, sms=H200_SMS)
    assert back == kernels.BackwardPlan(block_b=4, block=32, d_per_program=13, router_block_b=2, block_p=64,
                                        block_c=32)
    # partials per image: 128 pixel blocks x 5 channel groups; the router-grad kernel reduces them in 10 steps
    assert triton_cdiv(s * s, back.block) * triton_cdiv(d, back.d_per_program) == 640


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Scaled-down level 1 (identity resize, N=5, k=1): with the SM count below the CUDA planning picks the
# level-1 block sizes (GAP 4x512 / 32x32, 64 output pixels x 16 images, 4 images x 32 prompt pixels) and
# still makes several GAP splits, several H*W iterations per split, several output / prompt blocks, several
# channels per program and (backward) two image steps.
SCALED = dict(b=5, c=17, hw=40, n=5, d=3, s=40)
SCALED_SMS = 13


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_with_cuda_plan_scaled_level1(kernels, monkeypatch, layout):
    device = _target_or_skip()
    b, c, hw, n, d, s = (SCALED[key] for key in ("b", "c", "hw", "n", "d", "s"))
    used = _plans_for(kernels, monkeypatch, sms=SCALED_SMS)
    x, weight, bias, prompts = make_inputs(b, c, hw, hw, n, d, s, dtype=torch.float32, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    kernel, reference = run_both(x, weight, bias, prompts, k=1)
    assert_matches(kernel, reference, torch.float32)
    (fwd,), (bwd,) = used["forward"], used["backward"]
    level1_fwd = kernels.forward_plan(8, 96, 64, 64, 5, 64, (64, 64), channels_last=layout == "channels_last",
                                      cuda=True, sms=H200_SMS)
    level1_bwd = kernels.backward_plan(8, 96, 5, 64, 64, cuda=True, sms=H200_SMS)
    assert (fwd.gap_block_c, fwd.gap_block_hw, fwd.block) == (level1_fwd.gap_block_c, level1_fwd.gap_block_hw,
                                                              level1_fwd.block)
    assert fwd.split > 1 and fwd.hw_per_split > fwd.gap_block_hw  # several splits, several iterations each
    assert triton_cdiv(hw * hw, fwd.block) > 1 and 1 < fwd.d_per_program < d and fwd.block_b == level1_fwd.block_b
    assert bwd._replace(d_per_program=0) == level1_bwd._replace(d_per_program=0)
    assert triton_cdiv(s * s, bwd.block) > 1 and 1 < bwd.d_per_program < d and b > bwd.block_b


FORCED_FORWARD = dict(gap_block_c=2, gap_block_hw=4, split=3, router_block_c=2, block=16, block_b=16,
                      d_per_program=2, num_warps=4)
FORCED_BACKWARD = dict(block_b=2, block=16, d_per_program=2, router_block_b=2, block_p=2, block_c=2)


@pytest.mark.parametrize(
    "layout,k,renorm,size",
    [("nchw", 1, False, (7, 7)), ("channels_last", 6, True, (7, 7)), ("strided", 7, False, (3, 4)),
     ("nchw", 3, True, (8, 8))],
    ids=["nchw-k1-identity", "channels_last-k6-renorm-identity", "strided-dense-down", "nchw-k3-renorm-up"],
)
def test_kernel_forced_small_blocks(kernels, monkeypatch, layout, k, renorm, size):
    """Every loop and grid axis more than once: 3 GAP splits of 6 iterations, 3 channel blocks in the GAP
    and the router, several output and prompt blocks, 2 channel groups (the last one partial) forward and
    backward, 2 image steps (the last one partial) in both backward kernels, several partial-reduction
    steps and 3 router-grad programs. (Several forward image steps: test_kernel_many_images.)"""
    device = _target_or_skip()
    b, c, h, w, n, d, s = 3, 5, 7, 9, 7, 3, 7
    used = _plans_for(kernels, monkeypatch, FORCED_FORWARD, FORCED_BACKWARD)
    x, weight, bias, prompts = make_inputs(b, c, h, w, n, d, s, dtype=torch.float32, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(b, c, h + 2, 2 * w, device=device)[:, :, 1:-1, ::2]
    kernel, reference = run_both(x, weight, bias, prompts, k=k, renorm=renorm, size=size,
                                 grad_layout="strided" if layout == "strided" else None)
    assert_matches(kernel, reference, torch.float32)
    (fwd,), (bwd,) = used["forward"], used["backward"]
    assert fwd.split == 3 and fwd.hw_per_split == 24  # 63 positions: 24 + 24 + 15, 6 iterations each
    assert fwd._replace(split=3, hw_per_split=24) == kernels.ForwardPlan(**FORCED_FORWARD, hw_per_split=24)
    assert bwd == kernels.BackwardPlan(**FORCED_BACKWARD)


def test_kernel_many_images(kernels, monkeypatch):
    """B=19 > 16 images: two router/dot steps in the mix kernel (the second one partial), ten in the
    router-grad kernel, five in the prompt-grad kernel."""
    device = _target_or_skip()
    used = _plans_for(kernels, monkeypatch, dict(block=16), dict(block_b=4, router_block_b=2))
    inputs = make_inputs(19, 3, 3, 4, 5, 2, 3, dtype=torch.float32, device=device)
    kernel, reference = run_both(*inputs, k=2, renorm=True, size=(5, 4))
    assert_matches(kernel, reference, torch.float32)
    assert used["forward"][0].block_b == 16


# ----------------------------------------------------------------------------------- top-k ties, kernel


def _tied_router(pattern: str, n: int, c: int):
    """weight (n, c), bias (n,) whose logits tie exactly (in any precision) for every image."""
    if pattern == "identical-rows":  # every logit equal: k=1 must keep component 0
        return torch.randn(1, c).expand(n, c).contiguous(), torch.full((n,), 0.3)
    if pattern == "zero-router":  # a zero-initialised router: all-equal logits
        return torch.zeros(n, c), torch.zeros(n)
    # duplicated rows: component 2 leads, components 0 and 4 tie for second place, the rest trail
    weight = torch.randn(n, c) * 0.05
    weight[4] = weight[0]
    bias = torch.tensor([3.0, -1.0, 5.0, -1.5, 3.0] + [-2.0] * (n - 5))
    return weight, bias


@pytest.mark.parametrize("pattern", ["identical-rows", "zero-router", "duplicated-rows"])
@pytest.mark.parametrize("k,renorm", [(1, False), (2, False), (1, True), (2, True), (4, True)],
                         ids=["k1", "k2", "k1-renorm", "k2-renorm", "k4-renorm"])
def test_kernel_topk_ties_prefer_lower_index(kernels, pattern, k, renorm):
    """Tied logits go to the lower component index, forward and backward (a kernel breaking ties the other
    way selects different prompt components and fails here)."""
    device = _target_or_skip()
    b, c, h, w, n, d, s = 3, 6, 5, 5, 5, 2, 5
    weight, bias = _tied_router(pattern, n, c)
    x = torch.randn(b, c, h, w)
    prompts = torch.randn(n, d, s, s)
    x, weight, bias, prompts = (t.to(device) for t in (x, weight, bias, prompts))
    kernel, reference = run_both(x, weight, bias, prompts, k=k, renorm=renorm)
    assert_matches(kernel, reference, torch.float32)
    kept = (kernel["routing"] != 0).cpu()
    assert torch.equal(kept, reference["routing"] != 0)
    if pattern != "duplicated-rows":
        assert kept.tolist() == [[i < k for i in range(n)]] * b
    else:
        expected = {1: [2], 2: [0, 2], 4: [0, 1, 2, 4]}[k]
        assert kept.tolist() == [[i in expected for i in range(n)]] * b


# ------------------------------------------------------------------------- launches and zero fills


def _record_launches(kernels, monkeypatch) -> list[str]:
    """Replace every Triton kernel of the module by a recorder of its launches (name per launch)."""
    from triton.runtime.jit import KernelInterface

    launched: list[str] = []

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launch = self.fn[grid]

            def run(*args, **kwargs):
                launched.append(self.name)
                return launch(*args, **kwargs)

            return run

    for name, value in list(vars(kernels).items()):
        if isinstance(value, KernelInterface) and name.endswith("_kernel"):  # not the @jit helpers
            monkeypatch.setattr(kernels, name, Recorder(name, value))
    return launched


@pytest.mark.parametrize(
    "use_out,use_routing,expected_backward",
    [(True, True, ["_prompt_grad_kernel", "_router_grad_kernel"]),
     (True, False, ["_prompt_grad_kernel", "_router_grad_kernel"]),
     (False, True, ["_router_grad_kernel"])],
)
def test_four_launches_and_no_zero_fill(kernels, monkeypatch, use_out, use_routing, expected_backward):
    """Forward + backward is at most 4 Triton launches; no output's missing gradient is zero-filled."""
    from torch.utils._python_dispatch import TorchDispatchMode

    device = _target_or_skip()
    launched = _record_launches(kernels, monkeypatch)
    ops_seen: list[str] = []

    class OpLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops_seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, weight, bias, prompts = make_inputs(2, 5, 4, 6, 7, 2, 5, dtype=torch.float32, device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, prompts)]
    with cplfast.use_backend("triton"):
        out, routing = functional.sparse_prompt(*leaves, k=3, renorm=True)
    assert launched == ["_gap_partial_kernel", "_route_mix_kernel"]
    launched.clear()
    loss = (out.square().sum() if use_out else 0) + ((routing * torch.arange(7.0)).sum() if use_routing else 0)
    with OpLog():
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert launched == expected_backward
    fills = [op for op in ops_seen if any(word in op for word in ("zero", "fill", "full"))]
    assert not fills, fills
    assert (grads[3] is None) == (not use_out)
    assert all(g is not None for g in grads[:3])


# ------------------------------------------------------------------- registration: opcheck and compile


@pytest.fixture
def ops(kernels):
    from cplfast.ops import sparse_prompt as module

    return module


def test_opcheck_forward_and_backward_ops(ops):
    device = _target_or_skip()
    x, weight, bias, prompts = make_inputs(2, 5, 4, 3, 7, 2, 3, dtype=torch.float32, device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, prompts)]
    torch.library.opcheck(ops.sparse_prompt_op, (*leaves, 3, 0.9, True, 5, 2))
    torch.library.opcheck(
        ops.sparse_prompt_op, (x, weight, None, prompts, 7, 1.0, False, 4, 3),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    forward = ops.sparse_prompt_op(*(t.detach() for t in leaves), 3, 0.9, True, 5, 2)
    grad_out = torch.randn(2, 2, 5, 2, device=device)
    grad_routing = torch.randn(2, 7, device=device)
    torch.library.opcheck(
        ops.sparse_prompt_backward_op,
        (grad_out, grad_routing, weight.detach(), prompts.detach(), *forward[2:], 3, 0.9, True, 4, 3, 5, 2),
    )


def test_compile_fullgraph_through_the_custom_op(ops):
    device = _target_or_skip()
    x, weight, bias, prompts = make_inputs(2, 5, 4, 3, 7, 2, 3, dtype=torch.float32, device=device)

    def layer(x, weight, bias, prompts):
        out, routing = ops.sparse_prompt(x, weight, bias, prompts, k=3, temperature=0.9, renorm=True, size=(5, 4))
        return out.square().sum() + routing.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    leaves = [t.requires_grad_() for t in (x, weight, bias, prompts)]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    eager_loss = layer(*eager_leaves)
    eager_grads = torch.autograd.grad(eager_loss, eager_leaves)
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_compile_fullgraph_sparse_prompt_module(ops, kernels, monkeypatch):
    device = _target_or_skip()
    launches = []
    forward = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *args: launches.append(1) or forward(*args))
    module = cplfast.SparsePromptModule(prompt_dim=4, prompt_len=7, prompt_size=3, lin_dim=5, top_k=3).to(device)
    x = torch.randn(2, 5, 4, 3, device=device)
    with cplfast.use_backend("triton"):
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
        out = compiled(x)
        assert launches, "the compiled module did not run the Triton kernel"
        out.square().sum().backward()
        grads = [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        expected = module(x)
        expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for grad, param in zip(grads, module.parameters()):
        torch.testing.assert_close(grad, param.grad)


@pytest.mark.parametrize("k,renorm,temperature", [(2, False, 1.0), (3, True, 0.5)], ids=["k2", "k3-renorm-t0.5"])
def test_kernel_large_logits_are_exact(kernels, k, renorm, temperature):
    """Logits / temperature from -100 to 100.5: the router softmax must subtract the row maximum (exp alone
    overflows fp32 above 88.7). x = 0 makes the logits exactly the bias, and the temperatures are powers of
    two, so z = logits / temperature is exact in fp32 and the kernel must match float64 element-wise."""
    device = _target_or_skip()
    b, c, h, w, n, d, s = 2, 5, 4, 3, 5, 3, 4
    x = torch.zeros(b, c, h, w)
    weight = torch.randn(n, c)
    bias = torch.tensor([100.0, 100.5, 99.0, 0.0, -100.0]) * temperature
    prompts = torch.randn(n, d, s, s)
    x, weight, bias, prompts = (t.to(device) for t in (x, weight, bias, prompts))
    kernel, reference = run_both(x, weight, bias, prompts, k=k, renorm=renorm, temperature=temperature)
    assert_matches(kernel, reference, torch.float32)
    assert reference["routing"][0, 1] > 0.5 and reference["grad_bias"].abs().max() > 0.01
