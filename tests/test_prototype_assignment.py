"""Tests of ``prototype_assignment`` (SPEC §3.6): ``softmax(cos(e, prototypes) / tau)``, reference only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cplfast import functional


def numpy_assignment(e: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> np.ndarray:
    """Cosine similarity with the L2 norms clamped at 1e-12, then a row softmax, in float64 numpy."""
    e, prototypes = e.detach().double().numpy(), prototypes.detach().double().numpy()
    e_unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    p_unit = prototypes / np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
    logits = (e_unit @ p_unit.T) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("b,t,e_dim,temperature", [(5, 3, 7, 0.1), (1, 6, 2, 0.5), (4, 1, 9, 2.0), (3, 5, 64, 0.07)])
def test_matches_numpy(b, t, e_dim, temperature):
    e = torch.randn(b, e_dim, dtype=torch.float64)
    prototypes = torch.randn(t, e_dim, dtype=torch.float64)
    a = functional.prototype_assignment(e, prototypes, temperature=temperature)
    assert a.shape == (b, t)
    np.testing.assert_allclose(a.numpy(), numpy_assignment(e, prototypes, temperature), rtol=1e-12, atol=1e-15)


def test_float32_close_to_float64():
    e, prototypes = torch.randn(6, 11), torch.randn(4, 11)
    a = functional.prototype_assignment(e, prototypes, temperature=0.2)
    assert a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), numpy_assignment(e, prototypes, 0.2), rtol=1e-5, atol=1e-7)


def test_gradcheck():
    e = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    prototypes = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda e, p: functional.prototype_assignment(e, p, temperature=0.3), (e, prototypes)
    )


def test_properties():
    e = torch.randn(7, 6, dtype=torch.float64)
    prototypes = torch.randn(5, 6, dtype=torch.float64)
    a = functional.prototype_assignment(e, prototypes, temperature=0.25)
    torch.testing.assert_close(a.sum(1), torch.ones(7, dtype=torch.float64))
    assert (a > 0).all()
    # cosine similarity ignores positive scaling of either argument
    scaled = functional.prototype_assignment(3.5 * e, 0.2 * prototypes, temperature=0.25)
    torch.testing.assert_close(scaled, a)
    # permuting the prototypes permutes the columns
    order = torch.randperm(5)
    torch.testing.assert_close(functional.prototype_assignment(e, prototypes[order], temperature=0.25), a[:, order])
    # a lower temperature sharpens every row
    sharper = functional.prototype_assignment(e, prototypes, temperature=0.05)
    assert (sharper.max(1).values >= a.max(1).values).all()
    assert (sharper.argmax(1) == a.argmax(1)).all()


def test_embedding_along_a_prototype_prefers_it_and_zero_embedding_is_uniform():
    prototypes = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64)).Q.T  # 4 orthonormal rows
    e = 2.0 * prototypes[[2, 0]] + 1e-3 * torch.randn(2, 8, dtype=torch.float64)
    a = functional.prototype_assignment(e, prototypes, temperature=0.1)
    assert a.argmax(1).tolist() == [2, 0]
    uniform = functional.prototype_assignment(torch.zeros(3, 8, dtype=torch.float64), prototypes, temperature=0.1)
    torch.testing.assert_close(uniform, torch.full((3, 4), 0.25, dtype=torch.float64))


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 5), t=st.integers(1, 6), e_dim=st.integers(1, 12),
    temperature=st.floats(0.02, 5.0), seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(b, t, e_dim, temperature, seed):
    torch.manual_seed(seed)
    e = torch.randn(b, e_dim, dtype=torch.float64)
    prototypes = torch.randn(t, e_dim, dtype=torch.float64)
    a = functional.prototype_assignment(e, prototypes, temperature=temperature)
    np.testing.assert_allclose(a.numpy(), numpy_assignment(e, prototypes, temperature), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(a.sum(1).numpy(), np.ones(b), rtol=1e-12)


@pytest.mark.parametrize(
    "e,prototypes,temperature,error,words",
    [
        (torch.randn(2, 3, 1), torch.randn(4, 3), 0.1, ValueError, "^e must"),
        (torch.randn(2, 3), torch.randn(4), 0.1, ValueError, "^prototypes must"),
        (torch.randn(2, 3), torch.randn(4, 5), 0.1, ValueError, "^prototypes must"),
        (torch.randn(2, 3), torch.randn(0, 3), 0.1, ValueError, "^prototypes must"),
        (torch.randint(0, 2, (2, 3)), torch.randn(4, 3), 0.1, TypeError, "^e must"),
        (torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), 0.1, TypeError, "dtype"),
        (torch.randn(2, 3), torch.randn(4, 3, device="meta"), 0.1, ValueError, "device"),
        ([[1.0, 2.0, 3.0]], torch.randn(4, 3), 0.1, TypeError, "^e must"),
        (torch.randn(2, 3), torch.randn(4, 3), 0.0, ValueError, "^temperature must"),
        (torch.randn(2, 3), torch.randn(4, 3), -0.1, ValueError, "^temperature must"),
        (torch.randn(2, 3), torch.randn(4, 3), float("nan"), ValueError, "^temperature must"),
        (torch.randn(2, 3), torch.randn(4, 3), None, TypeError, "^temperature must"),
    ],
)
def test_bad_inputs_raise_clear_errors(e, prototypes, temperature, error, words):
    with pytest.raises(error, match=words):
        functional.prototype_assignment(e, prototypes, temperature=temperature)
