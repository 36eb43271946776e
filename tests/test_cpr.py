"""ContrastivePromptLoss with batch negatives (issue #8): the other images' outputs as extra keys.

The oracle builds, for every anchor, an explicit negative set (its K negatives + the other B-1
outputs) and calls the reference InfoNCE on it, one image at a time, in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cplfast
from cplfast import reference
from cplfast.features import FilterBankPyramid


def pooled_pair(images: torch.Tensor) -> list[torch.Tensor]:
    """A tiny stand-in extractor: the pixels and a 2x2 average (odd sizes drop the last row/column)."""
    return [images * 1.5, F.avg_pool2d(images, 2)]


FEATURES = {"filterbank": (FilterBankPyramid(), [1.0, 0.5, 0.25]), "pooled": (pooled_pair, None)}


def brute_force(features, output, target, negatives, temperature, weight, level_weights):
    """weight * sum_l w_l * mean_{b, locations} infonce(a_b, p_b, [n_{1..K, b}, a_g for g != b])."""
    k, b = negatives.shape[:2]
    anchors = features(output)
    positives = features(target)
    negative_levels = [level.unflatten(0, (k, b)) for level in features(negatives.flatten(0, 1))]
    total = 0
    for level, (a, p, n) in enumerate(zip(anchors, positives, negative_levels)):
        per_image = []
        for i in range(b):
            others = torch.cat([a[:i], a[i + 1:]]).unsqueeze(1)  # (B-1, 1, C, H, W)
            keys = torch.cat([n[:, i : i + 1], others])  # (K + B-1, 1, C, H, W)
            per_image.append(reference.infonce(a[i : i + 1], p[i : i + 1], keys, temperature=temperature,
                                               dim=1, reduction="none"))
        w = 1.0 if level_weights is None else level_weights[level]
        total = total + w * torch.cat(per_image).mean()
    return weight * total


def random_case(b: int, k: int = 2, c: int = 3, h: int = 13, w: int = 11, dtype=torch.float64):
    target = torch.rand(b, c, h, w, dtype=dtype)
    output = (target + 0.2 * torch.randn_like(target)).requires_grad_()
    negatives = (target + 0.4 * torch.randn(k, b, c, h, w, dtype=dtype)).requires_grad_()
    return output, target, negatives


def value_and_grads(loss_fn, output, target, negatives):
    output, negatives = output.detach().requires_grad_(), negatives.detach().requires_grad_()
    loss = loss_fn(output, target, negatives)
    loss.backward()
    return loss.detach(), output.grad, negatives.grad


@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("b", [2, 3])
def test_batch_negatives_equal_brute_force(features, b):
    extractor, level_weights = FEATURES[features]
    loss_fn = cplfast.ContrastivePromptLoss(temperature=0.3, weight=0.7, features=extractor,
                                            level_weights=level_weights, batch_negatives=True)
    output, target, negatives = random_case(b)
    got = value_and_grads(loss_fn, output, target, negatives)
    expected = value_and_grads(
        lambda o, t, n: brute_force(extractor, o, t, n, 0.3, 0.7, level_weights), output, target, negatives
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # the other outputs only add terms to the log-sum-exp: the loss grows
    plain = cplfast.ContrastivePromptLoss(temperature=0.3, weight=0.7, features=extractor, level_weights=level_weights)
    assert got[0] > plain(output, target, negatives)


def test_batch_negatives_float32_close_to_float64():
    loss_fn = cplfast.ContrastivePromptLoss(batch_negatives=True)
    output, target, negatives = random_case(3, k=3, h=9, w=15)
    got = value_and_grads(loss_fn, output.float(), target.float(), negatives.float())
    expected = value_and_grads(loss_fn, output, target, negatives)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


def test_batch_negatives_with_detached_negatives():
    loss_fn = cplfast.ContrastivePromptLoss(batch_negatives=True, detach_negatives=True)
    output, target, negatives = random_case(3, h=8, w=9)
    loss_fn(output, target, negatives).backward()
    assert negatives.grad is None and output.grad.abs().sum() > 0


def test_single_image_batch_equals_plain_loss():
    output, target, negatives = random_case(1, k=3)
    plain = value_and_grads(cplfast.ContrastivePromptLoss(), output, target, negatives)
    batch_fn = cplfast.ContrastivePromptLoss(batch_negatives=True, gather=True)
    batch = value_and_grads(batch_fn, output, target, negatives)
    for p, q in zip(plain, batch):
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_gather_without_process_group_is_local():
    output, target, negatives = random_case(3, h=7, w=5)
    local = value_and_grads(cplfast.ContrastivePromptLoss(batch_negatives=True), output, target, negatives)
    gathered_fn = cplfast.ContrastivePromptLoss(batch_negatives=True, gather=True)
    gathered = value_and_grads(gathered_fn, output, target, negatives)
    for a, b in zip(local, gathered):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_batch_negatives_through_the_triton_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    loss_fn = cplfast.ContrastivePromptLoss(batch_negatives=True, features=pooled_pair)
    output, target, negatives = random_case(3, h=5, w=7, dtype=torch.float32)
    results = {}
    for backend in ("reference", "triton"):
        with cplfast.use_backend(backend):
            results[backend] = value_and_grads(loss_fn, output, target, negatives)
    for ref, tri in zip(results["reference"], results["triton"]):
        torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"gather": True}, ValueError, r"gather=True needs batch_negatives=True"),
    ({"batch_negatives": 1}, TypeError, r"^batch_negatives must be a bool, got int"),
    ({"batch_negatives": True, "gather": "yes"}, TypeError, r"^gather must be a bool, got str"),
])
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        cplfast.ContrastivePromptLoss(**kwargs)


def test_repr_shows_the_options():
    text = repr(cplfast.ContrastivePromptLoss(batch_negatives=True, gather=True))
    assert "batch_negatives=True" in text and "gather=True" in text
    assert "batch_negatives=False, gather=False" in repr(cplfast.ContrastivePromptLoss())
