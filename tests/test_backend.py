"""Backend selection and dispatch (SPEC §2): set_backend / use_backend / CPLFAST_BACKEND and resolve()."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cplfast
from cplfast import _backend, functional, reference


@pytest.fixture(autouse=True)
def _restore_default_backend():
    saved = _backend._default
    yield
    _backend._default = saved


def small_inputs(dtype=torch.float32, device="cpu"):
    """One valid argument set per op that has a Triton kernel."""
    opts = dict(dtype=dtype, device=device)
    return {
        "sparse_prompt": lambda: functional.sparse_prompt(
            torch.randn(2, 3, 5, 5, **opts), torch.randn(4, 3, **opts), torch.randn(4, **opts),
            torch.randn(4, 2, 3, 3, **opts), k=2),
        "topm_channel_attention": lambda: functional.topm_channel_attention(
            torch.randn(1, 2, 6, 9, **opts), torch.randn(1, 2, 6, 9, **opts), torch.randn(1, 2, 6, 9, **opts),
            torch.ones(2, **opts)),
        "prompt_token_attention": lambda: functional.prompt_token_attention(
            torch.randn(1, 2, 9, 4, **opts), torch.randn(1, 2, 3, 4, **opts), torch.randn(1, 2, 3, 4, **opts)),
        "infonce": lambda: functional.infonce(
            torch.randn(2, 4, 3, 3, **opts), torch.randn(2, 4, 3, 3, **opts), torch.randn(3, 2, 4, 3, 3, **opts)),
        "supcon": lambda: functional.supcon(torch.randn(6, 4, **opts), torch.tensor([0, 1, 0, 1, 2, 2], device=device)),
    }


def run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


# ----------------------------------------------------------------------------------------------------
# set_backend / get_backend / use_backend


@pytest.mark.parametrize("name", ["auto", "triton", "reference", "Reference", "TRITON"])
def test_set_backend_accepts_names_case_insensitively(name):
    cplfast.set_backend(name)
    assert cplfast.get_backend() == name.lower()


@pytest.mark.parametrize("bad", ["cuda", "", "ref", None, 3, ["auto"]])
def test_set_backend_rejects_bad_names_and_keeps_the_old_one(bad):
    cplfast.set_backend("reference")
    with pytest.raises(ValueError, match=r"name must be one of \('auto', 'triton', 'reference'\)"):
        cplfast.set_backend(bad)
    assert cplfast.get_backend() == "reference"


def test_use_backend_rejects_bad_names_before_entering():
    cplfast.set_backend("auto")
    with pytest.raises(ValueError, match="name must be one of"):
        with cplfast.use_backend("fast"):
            pytest.fail("the block must not run")
    assert cplfast.get_backend() == "auto"


def test_use_backend_nests_and_restores():
    cplfast.set_backend("auto")
    with cplfast.use_backend("reference"):
        assert cplfast.get_backend() == "reference"
        with cplfast.use_backend("triton"):
            assert cplfast.get_backend() == "triton"
            with cplfast.use_backend("auto"):
                assert cplfast.get_backend() == "auto"
            assert cplfast.get_backend() == "triton"
        assert cplfast.get_backend() == "reference"
    assert cplfast.get_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    cplfast.set_backend("triton")
    with pytest.raises(KeyError):
        with cplfast.use_backend("reference"):
            raise KeyError("boom")
    assert cplfast.get_backend() == "triton"


def test_use_backend_wins_over_set_backend_inside_the_block():
    cplfast.set_backend("auto")
    with cplfast.use_backend("reference"):
        cplfast.set_backend("triton")
        assert cplfast.get_backend() == "reference"
    assert cplfast.get_backend() == "triton"


@pytest.mark.skipif(not _backend.interpreter_enabled(), reason="needs TRITON_INTERPRET=1 for CPU kernels")
def test_compiled_code_follows_backend_changes():
    def pick(x):
        return x * (2.0 if _backend.resolve("infonce", x) == "triton" else 3.0)

    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    x = torch.ones(2)
    with cplfast.use_backend("reference"):
        assert compiled(x)[0].item() == 3.0
    with cplfast.use_backend("triton"):
        assert compiled(x)[0].item() == 2.0
    with cplfast.use_backend("reference"):
        assert compiled(x)[0].item() == 3.0


# ----------------------------------------------------------------------------------------------------
# resolve(): which implementation a call gets


def test_auto_on_cpu_resolves_to_reference():
    cplfast.set_backend("auto")
    t = torch.randn(3)
    assert _backend.resolve("infonce", t, None, t.double()) == "reference"
    with cplfast.use_backend("reference"):
        assert _backend.resolve("infonce", t) == "reference"


@pytest.mark.parametrize("op", ["sparse_prompt", "topm_channel_attention", "prompt_token_attention", "infonce", "supcon"])
def test_auto_on_cpu_calls_the_reference(op, monkeypatch):
    calls = []
    original = getattr(reference, op)

    def spy(*args, **kwargs):
        calls.append(op)
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, op, spy)
    cplfast.set_backend("auto")
    small_inputs()[op]()
    assert calls == [op]


def test_triton_backend_on_cpu_with_interpreter_resolves_to_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with cplfast.use_backend("triton"):
        assert _backend.resolve("infonce", torch.randn(2), torch.randn(2, dtype=torch.float16)) == "triton"


@pytest.mark.parametrize("op", ["sparse_prompt", "topm_channel_attention", "prompt_token_attention", "infonce", "supcon"])
def test_forced_triton_rejects_float64(op):
    with cplfast.use_backend("triton"):
        with pytest.raises(TypeError, match=rf"^{op}: the Triton kernels take float32.*float64.*'reference' backend"):
            small_inputs(torch.float64)[op]()
    # the same call is fine on the reference backend
    with cplfast.use_backend("reference"):
        small_inputs(torch.float64)[op]()


def test_prototype_assignment_always_runs_the_reference():
    e, p = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with cplfast.use_backend("triton"):
        a = functional.prototype_assignment(e, p)
    torch.testing.assert_close(a, reference.prototype_assignment(e, p))


def test_forced_triton_without_the_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with cplfast.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"^infonce: backend 'triton' needs the 'triton' package"):
            small_inputs()["infonce"]()
    cplfast.set_backend("auto")  # auto quietly uses the reference
    small_inputs()["infonce"]()


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error():
    """In a fresh process with TRITON_INTERPRET unset and CPLFAST_BACKEND=triton."""
    result = run_python(
        """
        import torch, cplfast
        from cplfast import functional
        assert cplfast.get_backend() == "triton", cplfast.get_backend()
        q = torch.randn(1, 2, 9, 4)
        try:
            functional.prompt_token_attention(q, q[:, :, :3], q[:, :, :3])
        except RuntimeError as err:
            print("ERROR:", err)
        else:
            print("NO ERROR")
        """,
        TRITON_INTERPRET=None, CPLFAST_BACKEND="triton",
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR: prompt_token_attention: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1" in result.stdout


# ----------------------------------------------------------------------------------------------------
# CPLFAST_BACKEND


def fresh_backend_module(monkeypatch, value: str | None):
    """A separate copy of cplfast._backend imported with CPLFAST_BACKEND=value (the real one is untouched)."""
    if value is None:
        monkeypatch.delenv("CPLFAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("CPLFAST_BACKEND", value)
    spec = importlib.util.spec_from_file_location("_cplfast_backend_copy", _backend.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("reference", "reference"), ("Triton", "triton")])
def test_env_var_sets_the_default_backend(monkeypatch, value, expected):
    module = fresh_backend_module(monkeypatch, value)
    assert module.get_backend() == expected
    with module.use_backend("auto"):
        assert module.get_backend() == "auto"
    assert module.get_backend() == expected


def test_env_var_with_a_bad_name_fails_at_import_naming_the_variable(monkeypatch):
    with pytest.raises(ValueError, match=r"^CPLFAST_BACKEND must be one of \('auto', 'triton', 'reference'\), got 'gpu'"):
        fresh_backend_module(monkeypatch, "gpu")


# ----------------------------------------------------------------------------------------------------
# GPU: auto sends CUDA tensors to the kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_resolves_to_triton():
    cplfast.set_backend("auto")
    t = torch.randn(3, device="cuda")
    assert _backend.resolve("infonce", t) == "triton"
    assert _backend.resolve("infonce", t.double()) == "reference"  # float64 has no kernel: the reference
    assert _backend.resolve("infonce", t, torch.randn(3)) == "reference"  # mixed devices never reach a kernel


def test_autocast_mixed_dtypes_are_cast_like_autocast_does():
    """bf16 activations with fp32 parameters are accepted under autocast and rejected outside it."""
    x = torch.randn(2, 3, 6, 6).bfloat16()
    weight, bias, prompts = torch.randn(4, 3), torch.randn(4), torch.randn(4, 2, 3, 3)
    with pytest.raises(TypeError, match="dtype"):
        functional.sparse_prompt(x, weight, bias, prompts, k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, routing = functional.sparse_prompt(x, weight, bias, prompts, k=1)
        loss = functional.infonce(x, x.float(), x.float()[None])
    assert out.dtype == torch.bfloat16 and routing.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    expected, _ = functional.sparse_prompt(x, weight.bfloat16(), bias.bfloat16(), prompts.bfloat16(), k=1)
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------------------------------
# values that define no result are errors, not numbers (SPEC §9)
# ----------------------------------------------------------------------------------------------------


def test_supcon_with_one_sample_is_an_error_not_nan():
    with pytest.raises(ValueError, match=r"^z must hold at least 2 samples \(N >= 2\).*N=1"):
        functional.supcon(torch.randn(1, 8), torch.tensor([0]))


def test_infonce_without_negatives_is_an_error_not_zero():
    anchor = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"^negatives must hold at least one negative \(K >= 1\), got K=0"):
        functional.infonce(anchor, torch.randn_like(anchor), anchor.new_empty((0, 2, 3, 4, 5)))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_topm_channel_attention_refuses_non_positive_or_non_finite_temperature(bad):
    q = torch.randn(1, 2, 4, 9)
    temperature = torch.tensor([1.0, bad])
    with pytest.raises(ValueError, match=r"^temperature must be finite and > 0"):
        functional.topm_channel_attention(q, q, q, temperature)
    # a trainable temperature is the model's own business (training may move it): not checked
    out = functional.topm_channel_attention(q, q, q, torch.tensor([1.0, 0.5], requires_grad=True))
    assert out.shape == q.shape
