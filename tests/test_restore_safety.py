"""Issue 18: ``cplfast restore`` (and the other commands) never lose a file, keep what the image is, finish
the batch, fail in one line, refuse silent garbage, show progress and check memory.

Every test reproduces a failure of the old behaviour (named in its docstring) and checks the new one.
The checkpoint is a tiny CPL model saved without training (fast); images are a few pixels.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cplfast.checkpoint import STATE_FILE, load_model_file, save_model
from cplfast.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _cli import one_error_line, run_cli  # noqa: E402
from cplfast.data.io import encode_png16, jpeg_quality, read_image, save_image

pytestmark = pytest.mark.usefixtures("restore_torch_globals")

SPEC = {"prompt": "cpl", "preset": "tiny", "top_k": 1, "overrides": {}}
PROFILE = {  # mean routing per training degradation, as cplfast train records it (prompt_len 5)
    "noise": {f"prompt{i}": [0.7, 0.05, 0.05, 0.1, 0.1] for i in (1, 2, 3)},
    "haze": {f"prompt{i}": [0.05, 0.1, 0.6, 0.05, 0.2] for i in (1, 2, 3)},
}


def _checkpoint(folder: Path, *, poison: str | None = None) -> Path:
    from cplfast.train import build_model

    torch.manual_seed(0)
    state = build_model(SPEC).state_dict()
    if poison:
        state[poison] = state[poison].clone()
        state[poison].view(-1)[0] = float("nan")
    save_model(folder, state, {"format": "cplfast-checkpoint", "model": SPEC, "tasks": ["noise", "haze"],
                               "routing_by_task": PROFILE})
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt"))




def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _png(path: Path, h: int = 12, w: int = 20, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    save_image(torch.rand(3, h, w, generator=g), path)
    return path


def _restore(capsys, ckpt, *argv):
    return run_cli(capsys, "restore", *argv, "--checkpoint", ckpt, "--threads", "1", "--quiet")


# ----------------------------------------------------------------------------------- never lose a file
def test_output_onto_input_is_refused_and_the_original_survives(ckpt, tmp_path, capsys):
    """Old: ``restore a.png -o a.png`` silently replaced the original."""
    src = _png(tmp_path / "a.png")
    before = _sha(src)
    code, _, err = _restore(capsys, ckpt, src, "-o", src)
    assert "--overwrite" in one_error_line(code, err)
    assert _sha(src) == before
    # the same file under another spelling of its path
    code, _, err = _restore(capsys, ckpt, src, "-o", tmp_path / "." / "a.png")
    assert "would replace the original" in one_error_line(code, err) and _sha(src) == before
    # --overwrite is the explicit way to replace it; no temporary file is left behind
    code, _, _ = _restore(capsys, ckpt, src, "-o", src, "--overwrite")
    assert code == 0 and _sha(src) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_folder_into_itself_is_refused(ckpt, tmp_path, capsys):
    """Old: a folder restored into itself replaced every original."""
    folder = tmp_path / "photos"
    sums = {p.name: _sha(p) for p in (_png(folder / "a.png", seed=1), _png(folder / "b.png", seed=2))}
    code, _, err = _restore(capsys, ckpt, folder, "-o", folder)
    assert "folder into itself" in one_error_line(code, err)
    assert {p.name: _sha(p) for p in folder.iterdir()} == sums
    # with a suffix the outputs are new files next to the originals
    code, _, _ = _restore(capsys, ckpt, folder, "-o", folder, "--suffix", "_restored")
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_restored.png", "b.png", "b_restored.png"]
    assert {n: _sha(folder / n) for n in sums} == sums


def test_skip_existing_and_recursive_mirroring(ckpt, tmp_path, capsys):
    """Old: no --skip-existing, sub-folders ignored (and flattened names would collide)."""
    src = tmp_path / "in"
    _png(src / "a.png", seed=1)
    _png(src / "sub" / "a.png", seed=2)
    _png(src / "sub" / "deeper" / "c.png", seed=3)
    out = tmp_path / "out"
    code, stdout, _ = _restore(capsys, ckpt, src, "-o", out, "--recursive")
    assert code == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a.png", "sub/a.png", "sub/deeper/c.png"]
    assert "restored 3 of 3" in stdout
    keep = _sha(out / "sub" / "a.png")
    (out / "a.png").unlink()
    code, stdout, _ = _restore(capsys, ckpt, src, "-o", out, "--recursive", "--skip-existing")
    assert code == 0 and "2 already existed" in stdout and "restored 1 of 3" in stdout
    assert (out / "a.png").exists() and _sha(out / "sub" / "a.png") == keep


# ----------------------------------------------------------------------------------- keep what the image is
def test_rgba_16bit_png_keeps_alpha_and_depth(ckpt, tmp_path, capsys):
    """Old: every output was 8-bit RGB (alpha dropped, 16 bits cut to 8)."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((12, 20, 4)) * 65535).astype(np.uint16)
    src = tmp_path / "rgba16.png"
    src.write_bytes(encode_png16(pixels, icc=b"not-a-real-icc-profile"))
    code, _, _ = _restore(capsys, ckpt, src, "-o", tmp_path / "out.png")
    assert code == 0
    image, info = read_image(tmp_path / "out.png")
    assert info.bits == 16 and not info.grey and info.alpha is not None
    assert np.array_equal(info.alpha, pixels[..., 3])  # the original alpha, exactly
    assert info.icc == b"not-a-real-icc-profile"
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "RGBA"
    # 16-bit output: values that are not multiples of 257 (an 8-bit image scaled up would be)
    raw = np.round(image.numpy() * 65535).astype(np.int64)
    assert (raw % 257 != 0).mean() > 0.5


def test_grey_jpeg_stays_grey_at_its_quality(ckpt, tmp_path, capsys):
    """Old: greyscale came out as tinted RGB at Pillow's default quality 75."""
    rng = np.random.default_rng(1)
    src = tmp_path / "grey.jpg"
    Image.fromarray((rng.random((16, 24)) * 255).astype(np.uint8), "L").save(src, quality=92)
    code, _, _ = _restore(capsys, ckpt, src, "-o", tmp_path / "out.jpg")
    assert code == 0
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.mode == "L" and im.format == "JPEG"
        assert abs(jpeg_quality(im.quantization) - 92) <= 5
    code, _, _ = _restore(capsys, ckpt, src, "-o", tmp_path / "q.jpg", "--quality", "60")
    with Image.open(tmp_path / "q.jpg") as im:
        assert abs(jpeg_quality(im.quantization) - 60) <= 5


def test_rotated_exif_jpeg_is_restored_upright_with_its_exif(ckpt, tmp_path, capsys):
    """Old: EXIF orientation ignored on read; EXIF dropped on write."""
    rng = np.random.default_rng(2)
    stored = (rng.random((12, 20, 3)) * 255).astype(np.uint8)  # stored landscape, shown portrait (6 = 90° cw)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "cplfast-test-camera"
    src = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(src, quality=88, exif=exif.tobytes())
    code, _, _ = _restore(capsys, ckpt, src, "-o", tmp_path / "out.jpg")
    assert code == 0
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.size == (12, 20)  # upright: width 12, height 20
        kept = im.getexif()
        assert kept.get(0x0112, 1) == 1 and kept.get(0x010F) == "cplfast-test-camera"
        assert abs(jpeg_quality(im.quantization) - 88) <= 5
        assert im.mode == "RGB"


# ----------------------------------------------------------------------------------- finish the batch
def test_a_bad_file_is_skipped_and_reported(ckpt, tmp_path, capsys):
    """Old: the folder stopped at the bad file; later good files were never restored."""
    folder = tmp_path / "in"
    _png(folder / "a.png", seed=1)
    (folder / "b.png").write_bytes(b"not an image")
    _png(folder / "c.png", seed=3)
    code, out, err = _restore(capsys, ckpt, folder, "-o", tmp_path / "out")
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    assert "skipping" in err and "b.png" in err and "restored 2 of 3" in err and "Traceback" not in err


def test_eval_skips_a_tiny_image_and_writes_its_tables(ckpt, tmp_path, capsys):
    """Old: one 7x5 image failed the evaluation after all the work and discarded every result."""
    from cplfast.data import degrade

    root = tmp_path / "pairs"
    for k, (h, w) in enumerate([(16, 20), (5, 7), (16, 16)]):
        clean = torch.rand(3, h, w)
        save_image(clean, root / "target" / f"im{k}.png")
        save_image(degrade(clean, "noise25", k), root / "input" / f"im{k}.png")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", root, "--out", tmp_path / "tables",
                          "--threads", "1")
    assert code == 1 and "im1.png" in err and "skipped 1" in err
    rows = (tmp_path / "tables" / "eval_rgb.csv").read_text().strip().splitlines()
    assert rows[1].split(",")[1] == "2"  # two images scored


def test_train_reports_an_unreadable_file_before_training(tmp_path, capsys, monkeypatch):
    """Old: an unreadable training image failed at whatever step first drew it."""
    data = tmp_path / "clean"
    for k in range(2):
        _png(data / f"im{k}.png", h=24, w=24, seed=k)
    (data / "bad.png").write_bytes(b"\x89PNG broken")
    code, out, err = run_cli(capsys, "train", "--data", data, "--tasks", "noise", "--steps", "2", "--batch", "2",
                          "--patch", "16", "--negatives", "0", "--out", tmp_path / "run", "--quiet", "--threads", "1",
                          "--save-every", "0", "--log-every", "1")
    assert code == 1
    assert err.index("skipping") < len(err) and "bad.png" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 2


# ----------------------------------------------------------------------------------- one line per error
def _deny_writes_under(monkeypatch, folder: Path, err_no: int = errno.EACCES):
    """Make writes under ``folder`` fail as a read-only folder does (tests run as root, where chmod does not)."""
    folder = folder.resolve()
    real_write, real_mkdir = Path.write_bytes, Path.mkdir

    def write_bytes(self, data):
        if self.resolve().is_relative_to(folder):
            raise PermissionError(err_no, os.strerror(err_no), str(self))
        return real_write(self, data)

    def mkdir(self, *a, **k):
        if self.resolve().is_relative_to(folder) and not self.exists():
            raise PermissionError(err_no, os.strerror(err_no), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "mkdir", mkdir)


def _no_model(monkeypatch):
    import cplfast.train

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(cplfast.train, "inference_model", fail)
    monkeypatch.setattr(cplfast.train.Trainer, "__init__", fail)


def test_read_only_output_folder_fails_before_inference(ckpt, tmp_path, capsys, monkeypatch):
    """Old: a read-only output folder failed only after inference, with a traceback."""
    src = _png(tmp_path / "a.png")
    (tmp_path / "ro").mkdir()
    _deny_writes_under(monkeypatch, tmp_path / "ro")
    _no_model(monkeypatch)
    code, _, err = _restore(capsys, ckpt, src, "-o", tmp_path / "ro" / "a.png")
    assert "cannot write" in one_error_line(code, err) and "Permission denied" in err


@pytest.mark.parametrize("command", ["train", "demo", "export"])
def test_read_only_out_for_train_demo_export(command, tmp_path, capsys, monkeypatch):
    """Old: a read-only --out for train/demo/export was a traceback (after the long work)."""
    (tmp_path / "ro").mkdir()
    _deny_writes_under(monkeypatch, tmp_path / "ro")
    _no_model(monkeypatch)
    import cplfast.commands.export as export_command

    monkeypatch.setattr(export_command, "_load_model", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    argv = {
        "train": ("train", "--steps", "1", "--out", tmp_path / "ro" / "run", "--quiet", "--threads", "1"),
        "demo": ("demo", "--out", tmp_path / "ro" / "demo", "--steps", "1", "--quiet", "--threads", "1"),
        "export": ("export", "--format", "onnx", "--preset", "tiny", "--prompt", "cpl", "-o",
                   tmp_path / "ro" / "m.onnx", "--threads", "1"),
    }[command]
    code, _, err = run_cli(capsys, *argv)
    assert "cannot write" in one_error_line(code, err)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_original(ckpt, tmp_path, capsys, monkeypatch):
    """Old: ENOSPC during the save was a traceback."""
    src = _png(tmp_path / "a.png")
    before = _sha(src)

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = _restore(capsys, ckpt, src, "-o", src, "--overwrite")
    assert "No space left on device" in one_error_line(code, err)
    assert _sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no temporary file left


def test_unknown_device_is_one_line(ckpt, tmp_path, capsys):
    """Old: ``--device tpu`` was a RuntimeError traceback from torch.device."""
    code, _, err = _restore(capsys, ckpt, _png(tmp_path / "a.png"), "-o", tmp_path / "o.png", "--device", "tpu")
    assert "unknown --device 'tpu'" in one_error_line(code, err)
    code, _, err = run_cli(capsys, "train", "--device", "tpu", "--steps", "1", "--out", tmp_path / "r")
    assert "unknown --device" in one_error_line(code, err)


def test_divergence_is_one_line(tmp_path, capsys):
    """Old: ``train --lr 1e4`` ended in a RuntimeError traceback."""
    code, _, err = run_cli(capsys, "train", "--lr", "1e4", "--steps", "30", "--batch", "2", "--patch", "16", "--tasks",
                        "noise", "--negatives", "0", "--ema", "0", "--out", tmp_path / "run", "--quiet", "--threads", "1")
    line = one_error_line(code, err)
    assert "training diverged" in line and "--lr" in line


def test_fp16_needs_cuda(ckpt, tmp_path, capsys):
    code, _, err = _restore(capsys, ckpt, _png(tmp_path / "a.png"), "-o", tmp_path / "o.png", "--fp16",
                            "--device", "cpu")
    assert "--fp16 needs a CUDA device" in one_error_line(code, err)


# ----------------------------------------------------------------------------------- refuse silent garbage
def test_nan_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    """Old: a checkpoint with NaN weights restored all-black images with exit 0."""
    bad = _checkpoint(tmp_path / "bad", poison="output.weight")
    code, _, err = _restore(capsys, bad, _png(tmp_path / "a.png"), "-o", tmp_path / "o.png")
    line = one_error_line(code, err)
    assert "'output.weight'" in line and "non-finite" in line
    assert not (tmp_path / "o.png").exists()


def test_mismatch_message_lists_the_keys(ckpt, tmp_path):
    """Old: the weights-mismatch message was cut off before the key list."""
    from cplfast.checkpoint import CheckpointError
    from cplfast.train import inference_model

    state, config = load_model_file(ckpt)
    state = {k: v for k, v in state.items() if not k.startswith("prompt1.")}
    state["extra.weight"] = torch.zeros(2)
    save_model(tmp_path, state, config)
    with pytest.raises(CheckpointError) as info:
        inference_model(tmp_path)
    text = str(info.value)
    assert "missing key(s): prompt1." in text and "1 unexpected key(s): extra.weight" in text
    assert "\n" not in text


def test_float_image_in_0_255_is_rescaled_with_a_warning(ckpt):
    """Old: a float image in 0-255 gave values in -50...363 without a word."""
    from cplfast.train import inference_model

    model, _ = inference_model(ckpt)
    x = torch.rand(3, 16, 16)
    want, _ = model.restore(x)
    with pytest.warns(UserWarning, match="0-255"):
        got, _ = model.restore(x * 255)
    assert (got - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        model.restore(x * 600 - 50)


# ----------------------------------------------------------------------------------- progress and memory
def test_memory_check_suggests_tiles(ckpt, tmp_path, capsys, monkeypatch):
    """Old: a large whole-image restore died with an allocator traceback and no hint."""
    import cplfast.models.inference as inference

    monkeypatch.setattr(inference, "free_memory", lambda device: 2 * 2**20)  # 2 MiB free
    from cplfast.train import inference_model

    model, _ = inference_model(ckpt)
    with pytest.raises(inference.NotEnoughMemoryError, match="--tile"):
        model.restore(torch.rand(3, 64, 64))
    model.restore(torch.rand(3, 64, 64), tile=32, overlap=8)  # tiles do not need the whole image's activations
    code, _, err = _restore(capsys, ckpt, _png(tmp_path / "a.png", h=64, w=64), "-o", tmp_path / "o.png")
    assert code != 0 and "--tile" in err and "Traceback" not in err


def test_progress_bar_counts_tiles_and_blocks(ckpt, monkeypatch):
    """Old: a long restore printed nothing until it finished."""
    import cplfast.models.inference as inference
    from cplfast.train import inference_model

    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(inference, "_progress_bar", Bar)
    model, _ = inference_model(ckpt)
    inference.restore(model, torch.rand(3, 40, 40), tile=16, overlap=4, tile_mode="blend", progress=True)
    assert bars[-1].total == 9 and bars[-1].n == 9 and bars[-1].closed  # 3 x 3 tiles
    inference.restore(model, torch.rand(3, 40, 40), tile=16, progress=True)  # exact: 5 bands per sweep
    assert bars[-1].n == bars[-1].total and bars[-1].total % 5 == 0 and bars[-1].total > 9 and bars[-1].closed
    inference.restore(model, torch.rand(3, 24, 24), progress=True)
    assert bars[-1].n > 3 and bars[-1].n <= bars[-1].total and bars[-1].closed
    assert not any(h for m in model.children() for h in m._forward_hooks.values())  # hooks removed


# ----------------------------------------------------------------------------------- restore options
def test_tta_is_the_mean_of_the_eight_transforms(ckpt):
    from cplfast.models.inference import dihedral, restore, restore_tta, undo_dihedral
    from cplfast.train import inference_model

    model, _ = inference_model(ckpt)
    x = torch.rand(3, 16, 24)
    for code in range(8):
        assert torch.equal(undo_dihedral(dihedral(x, code), code), x)
    assert len({tuple(dihedral(x, c).flatten()[:6].tolist()) for c in range(8)}) == 8
    got, routing = restore_tta(model, x)
    want = sum(undo_dihedral(restore(model, dihedral(x, c), routing=routing)[0], c) for c in range(8)) / 8
    assert (got - want).abs().max() < 1e-6


def test_task_forces_the_routing(ckpt, tmp_path, capsys):
    from cplfast.commands.restore import task_routing
    from cplfast.train import inference_model

    model, config = inference_model(ckpt)
    routing = task_routing(model, config, "haze")
    assert set(routing) == {"prompt1", "prompt2", "prompt3"}
    # cpl keeps the router's top-1 choice of the haze profile (prompt #2), with its weight
    assert torch.allclose(routing["prompt1"], torch.tensor([[0.0, 0.0, 0.6, 0.0, 0.0]]))
    src = _png(tmp_path / "a.png", h=16, w=16)
    code, out, _ = _restore(capsys, ckpt, src, "-o", tmp_path / "o.png", "--task", "haze")
    assert code == 0 and "prompt1: #2 (0.60)" in out
    code, _, err = _restore(capsys, ckpt, src, "-o", tmp_path / "o.png", "--task", "rain")
    assert "no routing profile for rain" in one_error_line(code, err)


# ----------------------------------------------------------------------------------- training
def test_ctrl_c_saves_the_current_step_and_temp_files_and_logs_are_cleaned(tmp_path, capsys, monkeypatch):
    """Old: Ctrl-C saved nothing since the last --save-every; killed saves left temp files forever; a fresh
    run appended to a killed run's log."""
    from cplfast.train import Trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / ".model.safetensors.tmp999999999").write_bytes(b"half a checkpoint")  # a killed save's leftover
    (run / "train_log.jsonl").write_text('{"step": 40, "loss": 1.0}\n')  # a killed run's log, no checkpoint
    real = Trainer._accumulate_gradients

    def interrupt_at_step_3(self, batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, batches)

    monkeypatch.setattr(Trainer, "_accumulate_gradients", interrupt_at_step_3)
    code, _, err = run_cli(capsys, "train", "--steps", "50", "--batch", "2", "--patch", "16", "--tasks", "noise",
                        "--negatives", "0", "--save-every", "500", "--log-every", "1", "--out", run, "--quiet",
                        "--threads", "1")
    assert code == 130 and "saved a checkpoint at step 3" in err and "--resume" in err
    assert json.loads((run / "config.json").read_text())["step"] == 3
    assert (run / STATE_FILE).exists()
    assert not (run / ".model.safetensors.tmp999999999").exists()
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_time_budget_progress_bar_total_is_stable(tmp_path, monkeypatch):
    """Old: the demo's bar total jumped (2000 -> 246 -> ... -> 507)."""
    import tqdm.auto

    from cplfast.train import TrainConfig, Trainer

    totals = []

    class Bar:
        def __init__(self, total=None, initial=0, **kwargs):
            self.total, self.n = total, initial
            totals.append(total)

        def set_postfix(self, *a, **k):
            pass

        def update(self, k=1):
            self.n += k
            totals.append(self.total)

        def close(self):
            totals.append(self.total)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    config = TrainConfig(preset="tiny", prompt="cpl", tasks=("noise",), num_negatives=0, batch=2, patch=16, steps=4,
                         time_budget=30.0, save_every=0, log_every=0, ema=0, device="cpu")
    Trainer(config, tmp_path / "run", progress=True).fit()
    assert set(totals) == {100}


def test_version(capsys):
    """Old: no ``cplfast --version``."""
    import cplfast

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"cplfast {cplfast.__version__}"
