"""Exact streaming restore (issue 15): the whole-image forward in row bands, for every variant.

Every comparison is against the model's own whole-image forward in fp32 on fresh random weights and
images: max |difference| <= 1e-4 and PSNR >= 60 dB, at three band sizes (including bands that do not
divide the height and a single band), odd image sizes (padded to 8 by ``restore``), batch 2.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cplfast.models import PromptIR
from cplfast.models import inference
from cplfast.models.streaming import (
    LiveTensorBytes,
    StreamingError,
    attention_probs,
    chunk_rows_for_budget,
    count_sweeps,
    estimate_streaming_bytes,
    interpolation_matrix,
    stream_forward,
)
from cplfast.reference.channel_attention import topm_channel_attention

pytestmark = pytest.mark.usefixtures("restore_torch_globals")

VARIANTS = [
    ("promptir", {}),
    ("cpl", {"top_k": 2}),
    ("pip", {}),
    ("dppd", {}),
    ("none", {}),
]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.double(), b.double()).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _model(prompt: str, preset: str = "tiny", seed: int = 0, **kwargs) -> PromptIR:
    torch.manual_seed(seed)
    model = PromptIR(prompt, preset, **kwargs).eval()
    with torch.no_grad():  # sharper attention than the init's temperature 1, so the Gram matters
        for name, p in model.named_parameters():
            if name.endswith("temperature"):
                p.uniform_(0.5, 4.0)
    return model


def _assert_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"max |difference| {err:.3g}"
    assert _psnr(got.clamp(0, 1), want.clamp(0, 1)) >= 60.0


@pytest.mark.parametrize("prompt,kwargs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_stream_forward_equals_the_whole_image_forward(prompt, kwargs):
    torch.set_num_threads(1)
    model = _model(prompt, **kwargs)
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, aux = model(x, return_aux=True)
    for rows in (8, 16, 24, 64):  # 5 bands, 3 (last partial), 2 (last partial), one band
        got, routing = stream_forward(model, x, chunk_rows=rows, return_routing=True)
        _assert_exact(got, want)
        assert set(routing) == set(aux["routing"])
        for key, value in aux["routing"].items():
            torch.testing.assert_close(routing[key], value, rtol=1e-5, atol=1e-6)
    assert not model.training


def test_stream_forward_pip_official_layers_with_forced_routing():
    """PIP without a router (the official network) needs routing; forced routing is honoured."""
    model = _model("pip", pip_router=False)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    routing = {key: torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1]]) for key in model.routing_keys}
    with torch.no_grad():
        want = model(x, routing=routing)
    _assert_exact(stream_forward(model, x, chunk_rows=16, routing=routing), want)
    for key in model.routing_keys:  # the generators' mode and hooks are left as they were
        gen = getattr(model, key)
        assert not gen.training and not gen.LGM._forward_hooks
    with pytest.raises(ValueError, match="labels"):
        stream_forward(model, x, chunk_rows=16)


@pytest.mark.parametrize("prompt", ["promptir", "cpl", "dppd"])
def test_forced_routing_matches_the_forward(prompt):
    model = _model(prompt, seed=3)
    x = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(3))
    width = model.config.num_degradations if prompt == "dppd" else model.config.prompt_len
    weights = torch.softmax(torch.randn(1, width, generator=torch.Generator().manual_seed(4)), 1)
    routing = {key: weights for key in model.routing_keys}
    with torch.no_grad():
        want = model(x, routing=routing)
    got, used = stream_forward(model, x, chunk_rows=8, routing=routing, return_routing=True)
    _assert_exact(got, want)
    torch.testing.assert_close(used[model.routing_keys[0]], weights)


def test_input_is_left_alone_and_training_mode_restored():
    model = _model("promptir").train()
    x = torch.rand(1, 3, 24, 24)
    before = x.clone()
    stream_forward(model, x, chunk_rows=8)
    assert torch.equal(x, before) and model.training


def test_bad_arguments_are_named():
    model = _model("none")
    x = torch.rand(1, 3, 16, 16)
    for rows in (0, 12, 8.0, True, None):
        with pytest.raises(StreamingError, match="chunk_rows"):
            stream_forward(model, x, chunk_rows=rows)
    with pytest.raises(ValueError, match="multiples of 8"):
        stream_forward(model, torch.rand(1, 3, 12, 16), chunk_rows=8)


# ------------------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("out_size,in_size", [(37, 5), (16, 16), (8, 24), (3, 7), (50, 1), (1, 6)])
def test_interpolation_matrix_is_pytorchs_bilinear(out_size, in_size):
    v = torch.randn(2, 4, in_size, 3, dtype=torch.float64)
    want = F.interpolate(v, size=(out_size, 3), mode="bilinear", align_corners=False)
    got = torch.einsum("oi,bcij->bcoj", interpolation_matrix(out_size, in_size, dtype=torch.float64), v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fractions", [None, (1 / 2, 2 / 3, 3 / 4, 4 / 5)])
def test_attention_from_statistics_matches_the_reference(fractions):
    g = torch.Generator().manual_seed(5)
    b, h, c, length = 2, 3, 10, 57
    q, k, v = (torch.randn(b, h, c, length, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 0, 1] = 0  # a zero row: the norm is clamped to eps as in F.normalize
    temperature = torch.rand(h, generator=g, dtype=torch.float64) + 0.5
    mix = None if fractions is None else torch.rand(4, generator=g, dtype=torch.float64)
    want = topm_channel_attention(q, k, v, temperature, fractions=fractions, mix=mix)
    chunks = [(0, 20), (20, 41), (41, length)]  # statistics summed over chunks of pixels
    gram = sum(q[..., a:e] @ k[..., a:e].transpose(-2, -1) for a, e in chunks)
    q_sq = sum((q[..., a:e] ** 2).sum(-1) for a, e in chunks)
    k_sq = sum((k[..., a:e] ** 2).sum(-1) for a, e in chunks)
    probs = attention_probs(gram, q_sq, k_sq, temperature, fractions, mix)
    torch.testing.assert_close(probs @ v, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ restore API
@pytest.mark.parametrize("prompt", ["cpl", "pip", "dppd"])
def test_restore_exact_chunks_on_odd_sizes(prompt):
    torch.set_num_threads(1)
    model = _model(prompt, seed=6)
    image = torch.rand(2, 3, 45, 67, generator=torch.Generator().manual_seed(6))  # pads to 48 x 72
    whole, routing = model.restore(image)
    for tile in (8, 24, 40):  # bands of 8, 8 and 16 rows
        got, got_routing = model.restore(image, tile=tile)
        _assert_exact(got, whole)
        for key, value in routing.items():
            torch.testing.assert_close(got_routing[key], value, rtol=1e-5, atol=1e-6)
    stats = {}
    got, _ = model.restore(image[0], tile=24, stats=stats)
    _assert_exact(got, whole[0])
    assert stats["mode"] == "exact" and stats["chunk_rows"] == 8 and stats["chunks"] == 6
    assert 0 < stats["peak_bytes"] <= stats["estimated_bytes"]


def test_tile_chunk_rows():
    assert inference.tile_chunk_rows(256, 1024, 1536) == 40  # 256² / 1536 = 42.7 -> 40
    assert inference.tile_chunk_rows(16, 40, 40) == 8
    assert inference.tile_chunk_rows(512, 100, 100) == 104  # at most the padded height
    assert inference.tile_chunk_rows(8, 5000, 6000) == 8


def test_parse_memory():
    assert inference.parse_memory("4GB") == 4 * 10**9
    assert inference.parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert inference.parse_memory(" 512 mb ") == 512 * 10**6
    assert inference.parse_memory("2G") == 2 * 2**30
    assert inference.parse_memory(12345) == 12345
    for bad in ("4 parsecs", "GB", "-1GB", "0", ""):
        with pytest.raises(ValueError, match="max_memory"):
            inference.parse_memory(bad)
    with pytest.raises(TypeError, match="max_memory"):
        inference.parse_memory(True)


def test_max_memory_picks_the_mode_and_the_chunk_size():
    torch.set_num_threads(1)
    model = _model("promptir", seed=7)
    image = torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(7))
    whole, _ = model.restore(image)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())

    stats = {}
    got, _ = model.restore(image, max_memory="10GB", stats=stats)
    assert stats["mode"] == "whole" and torch.equal(got, whole)

    fixed = params + 2 * image.numel() * 4
    rows16 = estimate_streaming_bytes(model, 1, 64, 48, 16)
    budget = fixed + rows16 + 100  # room for 16-row chunks, not for 24
    assert estimate_streaming_bytes(model, 1, 64, 48, 24) > rows16 + 100
    got, _ = model.restore(image, max_memory=budget, stats=stats)
    assert stats["mode"] == "exact" and stats["chunk_rows"] == 16 and stats["chunks"] == 4
    _assert_exact(got, whole)
    assert stats["peak_bytes"] + fixed <= budget  # measured within the budget
    assert stats["peak_method"].startswith("live tensor bytes")

    with pytest.raises(inference.NotEnoughMemoryError, match=r"max_memory=.* too small .*--max-memory \d+MiB"):
        model.restore(image, max_memory=fixed + 1000)
    with pytest.raises(ValueError, match="not both"):
        model.restore(image, max_memory="1GB", tile=16)
    with pytest.raises(ValueError, match="tile_mode"):
        model.restore(image, tile=16, tile_mode="seamless")
    with pytest.raises(ValueError, match="blend"):
        model.restore(image, tile_mode="blend")


def test_blend_stays_available_and_differs_from_exact():
    model = _model("promptir", seed=8)
    image = F.avg_pool2d(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)), 5, 1, 2)
    whole, _ = model.restore(image)
    exact, _ = model.restore(image, tile=16)
    blend, _ = model.restore(image, tile=32, overlap=8, tile_mode="blend")
    _assert_exact(exact, whole)
    assert (blend - whole).abs().max() > 1e-3  # independent tiles change the result


def test_progress_counts_every_band_of_every_sweep():
    model = _model("pip")
    x = torch.rand(1, 3, 40, 16)
    steps = []
    stream_forward(model, x, chunk_rows=16, progress=steps.append)
    assert len(steps) == count_sweeps(model) * 3  # 40 rows in bands of 16: 3 per sweep


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("prompt,kwargs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_memory_estimate_bounds_the_measured_peak(prompt, kwargs):
    torch.set_num_threads(1)
    model = _model(prompt, **kwargs)
    x = torch.rand(1, 3, 64, 40)
    for rows in (8, 32):
        with LiveTensorBytes() as meter:
            stream_forward(model, x, chunk_rows=rows)
        estimate = estimate_streaming_bytes(model, 1, 64, 40, rows)
        assert meter.peak <= estimate <= 2 * meter.peak, (rows, meter.peak, estimate)
    assert chunk_rows_for_budget(model, 1, 64, 40, estimate_streaming_bytes(model, 1, 64, 40, 32)) == 32
    assert chunk_rows_for_budget(model, 1, 64, 40, 1000) is None


def test_streaming_needs_a_fraction_of_the_whole_image_peak():
    torch.set_num_threads(1)
    model = _model("promptir")
    x = torch.rand(1, 3, 256, 128)
    with torch.no_grad(), LiveTensorBytes() as whole:
        want = model(x)
    with LiveTensorBytes() as streamed:
        got = stream_forward(model, x, chunk_rows=16)
    _assert_exact(got, want)
    assert streamed.peak * 3 <= whole.peak, (streamed.peak, whole.peak)


def test_live_tensor_bytes_counts_views_once_and_frees():
    with LiveTensorBytes() as meter:
        a = torch.empty(1000)  # 4000 bytes
        b = a[:10]
        a.add_(1)
        del a
        assert meter.live == 4000  # the view keeps the storage alive
        del b
        assert meter.live == 0
        c = torch.ones(250) * 2  # 1000 bytes (the ones are freed after the product)
    assert meter.peak == 4000 and meter.live == 1000
    del c


# ------------------------------------------------------------------------------------------------- CLI
def _checkpoint(folder: Path, prompt: str = "cpl") -> Path:
    from cplfast.checkpoint import save_model
    from cplfast.train import build_model

    spec = {"prompt": prompt, "preset": "tiny", "top_k": 1, "overrides": {}}
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("temperature"):
                p.uniform_(0.5, 4.0)
    save_model(folder, model.state_dict(), {"format": "cplfast-checkpoint", "model": spec, "tasks": ["noise", "haze"]})
    return folder


def _photo(path: Path, h: int, w: int) -> Path:
    from cplfast.data.io import save_image

    g = torch.Generator().manual_seed(9)
    smooth = F.interpolate(torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g), size=(h, w), mode="bicubic")
    save_image((smooth[0] + 0.05 * torch.randn(3, h, w, generator=g)).clamp(0, 1), path)
    return path


def _cli(capsys, *argv):
    from cplfast.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _restore_cli(capsys, ckpt, src, dst, *extra):
    code, out, err = _cli(capsys, "restore", src, "-o", dst, "--checkpoint", ckpt, "--threads", "1", "--quiet", *extra)
    assert code == 0, err
    return out


def _same_image(capsys, ckpt, src, tmp_path, *extra):
    from cplfast.data.io import load_image

    _restore_cli(capsys, ckpt, src, tmp_path / "whole.png")
    out = _restore_cli(capsys, ckpt, src, tmp_path / "chunks.png", *extra)
    whole, chunks = load_image(tmp_path / "whole.png"), load_image(tmp_path / "chunks.png")
    assert _psnr(chunks, whole) >= 60.0
    return out


def test_cli_tile_and_max_memory_give_the_whole_image(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    src = _photo(tmp_path / "photo.png", 61, 90)
    out = _same_image(capsys, ckpt, src, tmp_path, "--tile", "32")
    assert "exact, 8 chunks of 8 rows" in out and "peak " in out
    _restore_cli(capsys, ckpt, src, tmp_path / "whole.png")
    out = _restore_cli(capsys, ckpt, src, tmp_path / "budget.png", "--max-memory", "1GB")
    assert "whole image" in out  # 1 GB holds the whole image at once

    code, _, err = _cli(capsys, "restore", src, "-o", tmp_path / "x.png", "--checkpoint", ckpt, "--threads", "1",
                        "--quiet", "--max-memory", "100KB")
    assert code != 0 and "too small" in err and "Traceback" not in err
    for extra, message in ((["--tile-mode", "blend"], "needs --tile"), (["--tile", "16", "--overlap", "4"], "blend only"),
                           (["--tile", "16", "--max-memory", "1GB"], "not both"), (["--max-memory", "lots"], "--max-memory")):
        code, _, err = _cli(capsys, "restore", src, "-o", tmp_path / "y.png", "--checkpoint", ckpt, *extra)
        assert code != 0 and message in err and "Traceback" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["cpl", "pip"])
def test_cli_tile_256_on_a_1024x1536_photo(tmp_path, capsys, prompt):
    """The issue's acceptance: ``--tile 256`` on a 1024 x 1536 photo gives the image restored without it."""
    ckpt = _checkpoint(tmp_path / "ckpt", prompt)
    src = _photo(tmp_path / "photo.png", 1024, 1536)
    out = _same_image(capsys, ckpt, src, tmp_path, "--tile", "256")
    assert "exact, 26 chunks of 40 rows" in out


@pytest.mark.slow
@pytest.mark.parametrize("prompt,kwargs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_exact_at_1024x1536_for_every_variant(prompt, kwargs):
    """The issue's acceptance size: a 1021 x 1533 image (padded to 1024 x 1536 inside), 3 chunk sizes."""
    torch.set_num_threads(2)
    model = _model(prompt, **kwargs)
    small = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(11))
    image = F.interpolate(small, size=(1021, 1533), mode="bilinear")[0].clamp(0, 1)
    whole, _ = model.restore(image, check_memory_first=False)
    for tile in (96, 256, 512):  # bands of 8, 40 and 168 rows
        got, _ = model.restore(image, tile=tile)
        _assert_exact(got, whole)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["promptir", "cpl", "pip", "dppd"])
def test_base_preset_streams_exactly(prompt):
    model = _model(prompt, "base")
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = model(x)
    for rows in (8, 40, 96):
        _assert_exact(stream_forward(model, x, chunk_rows=rows), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16/bf16 streaming runs on a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prompt", ["promptir", "pip", "dppd"])
def test_half_precision_on_cuda(prompt, dtype):
    model = _model(prompt).cuda()
    x = torch.rand(1, 3, 64, 96, device="cuda")
    with torch.no_grad():
        want = model(x)
        model_half = model.to(dtype)
        ref = model_half(x.to(dtype)).float()
    got = stream_forward(model_half, x.to(dtype), chunk_rows=16).float()
    tol = 2 * (ref - want).abs().max().item() + 1e-3  # streaming adds no more than the dtype's own rounding
    assert (got - want).abs().max().item() <= tol
