"""Degradations, datasets and image I/O (cplfast.data)."""

import math

import numpy as np
import pytest
import torch

from cplfast.data import (
    COMPOSITE_TASKS,
    TASKS,
    DegradationDataset,
    PairedFolderDataset,
    defocus_blur,
    depth_proxy,
    degrade,
    embedded_eval_dataset,
    embedded_images,
    folder_dataset,
    gaussian_noise,
    haze,
    load_image,
    low_light,
    make_generator,
    motion_blur,
    pair_folders,
    parse_task,
    promptir_dataset,
    rain_streaks,
    save_image,
)
from cplfast.data.embedded import EVAL_IMAGES, TRAIN_IMAGES, eval_crop_boxes


def _image(h=37, w=29, b=None):
    shape = (3, h, w) if b is None else (b, 3, h, w)
    return (torch.rand(shape) * 255).round() / 255


ALL_TASKS = list(TASKS) + ["noise15", "noise50", "motion_blur", "defocus_blur"] + list(COMPOSITE_TASKS)


# ------------------------------------------------------------------------------------ degradations
@pytest.mark.parametrize("task", ALL_TASKS)
def test_degrade_is_seeded_and_keeps_shape_and_range(task):
    x = _image()
    seed = int(torch.randint(0, 2**31, ()))
    a = degrade(x, task, seed)
    b = degrade(x, task, torch.Generator().manual_seed(seed))
    c = degrade(x, task, seed + 1)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal((a * 255).round() / 255, a)  # quantised to the uint8 grid
    assert not torch.equal(a, x)


def test_numpy_generator_and_global_rng_are_reproducible():
    x = _image()
    assert torch.equal(degrade(x, "rain", np.random.default_rng(3)), degrade(x, "rain", np.random.default_rng(3)))
    torch.manual_seed(11)
    a = degrade(x, "noise")
    torch.manual_seed(11)
    assert torch.equal(a, degrade(x, "noise"))
    with pytest.raises(TypeError, match="generator"):
        make_generator("seed")


def test_gaussian_noise_follows_the_uint8_protocol():
    x = torch.full((3, 64, 64), 128 / 255)
    sigma = float(torch.randint(10, 40, ()))
    y = gaussian_noise(x, sigma, 5)
    noise = y * 255 - 128
    assert torch.equal(noise, noise.round())  # integers: truncated to uint8
    # truncation lowers the mean by ~0.5; the spread is sigma
    assert abs(float(noise.mean()) + 0.5) < 0.15 * sigma / 8
    assert abs(float(noise.std()) - sigma) < 0.05 * sigma
    assert torch.equal(gaussian_noise(x, 0.0, 1), x)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise(x, -1.0)


def test_haze_is_the_scattering_model():
    x = _image()
    depth = torch.rand(37, 29) * 10
    beta, airlight = 0.04 + 0.16 * float(torch.rand(())), 0.8 + 0.2 * float(torch.rand(()))
    t = torch.exp(-beta * depth)
    assert torch.allclose(haze(x, beta=beta, airlight=airlight, depth=depth), x * t + airlight * (1 - t), atol=1e-6)
    assert torch.allclose(haze(x, beta=50.0, airlight=airlight), torch.full_like(x, airlight), atol=1e-5)
    with pytest.raises(ValueError, match="depth"):
        haze(x, depth=torch.rand(5, 5))


def test_depth_proxy_ramp_and_scene_scale():
    lum = float(torch.rand(()))
    flat = torch.full((3, 40, 10), lum)
    top, height = 0.3 + 0.7 * float(torch.rand(())), 64.0
    d = depth_proxy(flat, near=2.0, far=12.0, top=top, scene_height=height)
    rows = torch.arange(40, dtype=torch.float32)
    expected = 2.0 + 10.0 * (0.7 * (top - rows / height).clamp(0, 1) + 0.3 * lum)
    assert torch.allclose(d[0, :, 3], expected, atol=1e-5)
    whole = depth_proxy(flat, near=1.0, far=6.0)  # default: the ramp spans the frame, far at the top
    assert float(whole[0, 0, 0]) == pytest.approx(1 + 5 * (0.7 + 0.3 * lum), abs=1e-5)
    assert float(whole[0, -1, 0]) == pytest.approx(1 + 5 * 0.3 * lum, abs=1e-5)


def test_blur_preserves_constants_and_mean():
    c = float(torch.rand(()))
    flat = torch.full((2, 3, 40, 33), c)
    assert torch.allclose(motion_blur(flat, length=11, angle=float(torch.rand(()) * 180)), flat, atol=1e-6)
    assert torch.allclose(defocus_blur(flat, radius=2.7), flat, atol=1e-6)
    x = _image(64, 64)
    y = defocus_blur(x, radius=3.0)
    assert abs(float(y.mean() - x.mean())) < 0.02
    assert float((y[:, 1:] - y[:, :-1]).abs().mean()) < float((x[:, 1:] - x[:, :-1]).abs().mean())


def test_rain_only_brightens_and_low_light_darkens():
    x = _image(48, 40)
    y = rain_streaks(x, density=0.01, length=12, angle=10, generator=2)
    assert (y >= x - 1e-7).all() and (y > x).any()
    exact = low_light(x, gamma=2.2, gain=0.3, photons=0, read_noise=0)
    assert torch.allclose(exact, 0.3 * x.pow(2.2), atol=1e-6)
    noisy = low_light(x, gamma=2.2, gain=0.3, photons=200, read_noise=0.01, generator=4)
    assert float(noisy.mean()) < 0.5 * float(x.mean())
    assert not torch.equal(noisy, exact)


def test_batched_input_and_bad_input():
    x = _image(b=2)
    assert degrade(x, "haze+rain", 0).shape == x.shape
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(x, "snow", 0)
    with pytest.raises(ValueError, match="repeats"):
        parse_task("noise+noise25")
    with pytest.raises(TypeError, match="floating"):
        degrade((x * 255).to(torch.uint8), "noise", 0)
    with pytest.raises(ValueError, match="shape"):
        degrade(torch.rand(5, 5), "noise", 0)


def test_composites_apply_in_physical_order():
    assert parse_task("noise+haze+rain") == ("haze", "rain", "noise")
    assert parse_task("lowlight+blur") == ("blur", "lowlight")
    _, applied = degrade(_image(), "noise25+lowlight", 1, return_params=True)
    assert [name for name, _ in applied] == ["lowlight", "noise25"]
    assert applied[1][1]["sigma"] == 25


# ---------------------------------------------------------------------------------------- datasets
def test_degradation_dataset_is_index_addressed():
    images = [_image(40, 52), _image(30, 30)]
    ds = DegradationDataset(images, TASKS, patch=24, seed=3)
    i = int(torch.randint(0, 10_000, ()))
    a, b, c = ds[i], ds[i], ds[i + 1]
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(a["input"], c["input"])
    assert a["input"].shape == (3, 24, 24)
    assert [ds[k]["task"] for k in range(7)] == [0, 1, 2, 3, 4, 0, 1]
    other_seed = DegradationDataset(images, TASKS, patch=24, seed=4)
    assert not torch.equal(other_seed[i]["input"], a["input"])


def test_degradation_dataset_without_patch_is_finite():
    ds = DegradationDataset([_image(16, 24), _image(20, 20)], ("noise25", "haze"), patch=None)
    assert len(ds) == 4
    assert ds[3]["input"].shape == (3, 20, 20) and ds[3]["task"] == 1
    with pytest.raises(IndexError):
        ds[4]


def test_embedded_images_split_and_eval_crops():
    assert not set(TRAIN_IMAGES) & set(EVAL_IMAGES)
    train = embedded_images("train", max_side=128)
    assert len(train) >= 5 and all(t.shape[0] == 3 and max(t.shape[1:]) <= 128 for _, t in train)
    boxes = eval_crop_boxes(100, 160, 48, 5)
    assert len(boxes) == 5 and len(set(boxes)) == 5
    assert all(0 <= y <= 52 and 0 <= x <= 112 for y, x in boxes)
    ev = embedded_eval_dataset(("noise", "haze"), crop=32, crops_per_image=2, max_side=96)
    again = embedded_eval_dataset(("noise", "haze"), crop=32, crops_per_image=2, max_side=96)
    assert len(ev) == 2 * 2 * len(EVAL_IMAGES)
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(ev.items, again.items))
    # the same boxes for every task, different degradations
    assert torch.equal(ev[0]["target"], ev[len(ev) // 2]["target"])


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)


def test_paired_folder_dataset_and_name_matching(tmp_path):
    clean = [_image(24, 32) for _ in range(3)]
    for k, c in enumerate(clean):
        _write(tmp_path / "pairs" / "target" / f"img{k}.png", c)
        _write(tmp_path / "pairs" / "input" / f"img{k}.png", degrade(c, "noise", k))
    ds = PairedFolderDataset(tmp_path / "pairs")
    assert len(ds) == 3 and torch.equal(ds[1]["target"], clean[1])
    cropped = PairedFolderDataset(tmp_path / "pairs", patch=16, seed=1)
    item = cropped[int(torch.randint(0, 100, ()))]
    assert item["input"].shape == (3, 16, 16)
    # rain-N -> norain-N and NAME_beta_A -> NAME
    _write(tmp_path / "rainy" / "rain-7.png", clean[0])
    _write(tmp_path / "gt" / "norain-7.png", clean[0])
    _write(tmp_path / "hazy" / "0012_0.8_0.2.png", clean[1])
    _write(tmp_path / "clear" / "0012.png", clean[1])
    assert [p[1].name for p in pair_folders(tmp_path / "rainy", tmp_path / "gt")] == ["norain-7.png"]
    assert [p[1].name for p in pair_folders(tmp_path / "hazy", tmp_path / "clear")] == ["0012.png"]
    with pytest.raises(ValueError, match="no matching"):
        pair_folders(tmp_path / "rainy", tmp_path / "clear")


def test_promptir_tree_and_folder_dataset(tmp_path):
    root = tmp_path / "data"
    for k in range(2):
        c = _image(32, 32)
        _write(root / "Train" / "Denoise" / f"{k}.png", c)
        _write(root / "Train" / "Derain" / "gt" / f"norain-{k}.png", c)
        _write(root / "Train" / "Derain" / "rainy" / f"rain-{k}.png", degrade(c, "rain", k))
        _write(root / "test" / "denoise" / "bsd" / f"{k}.png", c)
        _write(root / "test" / "dehaze" / "outdoor" / "target" / f"{k}.png", c)
        _write(root / "test" / "dehaze" / "outdoor" / "input" / f"{k}_0.9.png", degrade(c, "haze", k))
    train = promptir_dataset(root, patch=16)
    assert train.tasks == ["noise", "rain"]
    assert [train[i]["task"] for i in range(4)] == [0, 1, 0, 1]
    test = promptir_dataset(root)
    assert test.tasks == ["haze/outdoor", "noise15/bsd", "noise25/bsd", "noise50/bsd"]
    assert len(test) == 8
    assert isinstance(folder_dataset(root / "test" / "dehaze" / "outdoor"), PairedFolderDataset)
    clean_only = folder_dataset(root / "Train" / "Denoise", patch=16, tasks=("haze",))
    assert clean_only.tasks == ["haze"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        folder_dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        folder_dataset(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- io
def test_image_io_roundtrip_and_errors(tmp_path):
    x = _image(13, 17)
    path = save_image(x, tmp_path / "a.png")
    assert torch.equal(load_image(path), x)
    from PIL import Image

    grey = (np.random.default_rng(0).random((9, 11)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert g.shape == (3, 9, 11) and torch.equal(g[0], g[2])
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    assert not math.isnan(float(x.sum()))
