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


# ----------------------------------------------------------------------------------------------------
# The CPL authors' template ("l1-push") and the VGG16 feature space (issue 14)


def test_l1_push_equals_the_template_and_detaches_negatives():
    output, target, negatives = random_case(2, k=3)
    bank = FilterBankPyramid()
    loss_fn = cplfast.ContrastivePromptLoss(form="l1-push", weight=0.7)
    loss, out_grad, neg_grad = value_and_grads(loss_fn, output, target, negatives)
    expected = 0
    for j in range(3):  # -weight * mean_k sum_l w_l * mean |phi_l(out) - phi_l(neg_k)|, w = (0.2, 0.3, 0.5)
        for w, a, n in zip((0.2, 0.3, 0.5), bank(output.detach()), bank(negatives[j].detach())):
            expected = expected + w * (a - n).abs().mean() / 3
    torch.testing.assert_close(loss, -0.7 * expected, rtol=1e-12, atol=1e-12)
    assert out_grad.abs().sum() > 0
    assert neg_grad is None  # the negatives are constants, as under the template's no_grad
    # the target plays no part: the template's pull to the ground truth is the trainer's pixel L1
    torch.testing.assert_close(loss_fn(output, torch.zeros_like(target), negatives), loss_fn(output, target, negatives))
    weighted = cplfast.ContrastivePromptLoss(form="l1-push", level_weights=[1.0, 0.0, 0.0], weight=1.0)
    torch.testing.assert_close(weighted(output, target, negatives),
                               -(bank(output)[0].unsqueeze(0) - torch.stack([bank(n)[0] for n in negatives])).abs().mean())
    with pytest.raises(ValueError, match="level_weights"):
        cplfast.ContrastivePromptLoss(form="l1-push", features=pooled_pair)(output, target, negatives)
    with pytest.raises(ValueError, match="form"):
        cplfast.ContrastivePromptLoss(form="ratio")
    with pytest.raises(ValueError, match="infonce"):
        cplfast.ContrastivePromptLoss(form="l1-push", batch_negatives=True)
    assert "form='l1-push'" in repr(loss_fn)
    # 'filters' is an alias of the default filter bank
    plain = cplfast.ContrastivePromptLoss()
    torch.testing.assert_close(cplfast.ContrastivePromptLoss(features="filters")(output, target, negatives),
                               plain(output, target, negatives))


def _vgg16_state(seed=0):
    """A random state_dict with torchvision vgg16's keys and shapes up to relu3_3 (plus a classifier key)."""
    g = torch.Generator().manual_seed(seed)
    state, cin = {}, 3
    for index, cout in zip((0, 2, 5, 7, 10, 12, 14), (64, 64, 128, 128, 256, 256, 256)):
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(cout, generator=g) * 0.01
        cin = cout
    state["classifier.0.weight"] = torch.zeros(2, 2)
    return state


def _vgg16_by_hand(state, images):
    x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def conv(x, i):
        return F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))

    r12 = conv(conv(x, 0), 2)
    r22 = conv(conv(F.max_pool2d(r12, 2), 5), 7)
    r33 = conv(conv(conv(F.max_pool2d(r22, 2), 10), 12), 14)
    return [r12, r22, r33]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vgg16_features_from_a_weights_file(tmp_path, suffix):
    from safetensors.torch import save_file

    from cplfast.features import VGG16Features

    state = _vgg16_state()
    path = tmp_path / f"vgg16{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    extractor = VGG16Features(path)
    images = torch.rand(2, 3, 12, 8)
    got = extractor(images)
    assert [tuple(f.shape) for f in got] == [(2, 64, 12, 8), (2, 128, 6, 4), (2, 256, 3, 2)]
    for a, b in zip(got, _vgg16_by_hand(state, images)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not extractor.train().training  # frozen: stays in eval mode
    loss = cplfast.ContrastivePromptLoss(features="vgg16", vgg_weights=path, form="l1-push")
    assert loss(images, images, images.unsqueeze(0) * 0.5).dim() == 0


def test_vgg16_uses_torchvision_cache_and_says_what_is_missing(tmp_path, monkeypatch):
    from cplfast.features import VGG16_FILE, VGG16Features, default_vgg16_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_vgg16_weights() == tmp_path / "hub" / "checkpoints" / VGG16_FILE
    with pytest.raises(FileNotFoundError) as missing:
        VGG16Features()
    message = str(missing.value)
    assert "\n" not in message and "weight cache" in message and VGG16_FILE in message
    with pytest.raises(FileNotFoundError, match="vgg_weights path"):
        cplfast.ContrastivePromptLoss(features="vgg16", vgg_weights=tmp_path / "nowhere.pth")
    default_vgg16_weights().parent.mkdir(parents=True)
    torch.save(_vgg16_state(1), default_vgg16_weights())  # as torchvision caches it
    images = torch.rand(1, 3, 8, 8)
    for a, b in zip(VGG16Features(layers=("relu2_2",))(images), _vgg16_by_hand(_vgg16_state(1), images)[1:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        VGG16Features(tmp_path / "partial.pth")
