"""The demo / train / eval / restore commands, end to end on tiny settings, and their error paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cplfast.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _cli import one_error_line, run_cli  # noqa: E402
from cplfast.data import degrade, load_image, save_image


# Commands and deterministic runs change process-wide torch settings; the fixture puts them back.
pytestmark = pytest.mark.usefixtures("restore_torch_globals")




@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint trained for two steps by ``cplfast train`` (shared by the tests below)."""
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--steps", "2", "--batch", "2", "--patch", "16", "--tasks", "noise,haze", "--negatives",
                     "1", "--out", str(out), "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


@pytest.fixture()
def pairs(tmp_path):
    root = tmp_path / "pairs"
    for k in range(2):
        clean = torch.rand(3, 20, 28)
        save_image(clean, root / "target" / f"im{k}.png")
        save_image(degrade(load_image(root / "target" / f"im{k}.png"), "noise25", k), root / "input" / f"im{k}.png")
    return root


def test_train_writes_a_loadable_checkpoint(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"model.safetensors", "config.json", "train_state.safetensors"} <= names
    config = json.loads((run_dir / "config.json").read_text())
    assert config["step"] == 2 and config["model"]["prompt"] == "cpl" and config["model"]["preset"] == "tiny"
    assert set(config["routing_by_task"]) == {"noise", "haze"}


def test_train_resume_extends_and_rejects_changes(run_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "--resume", run_dir, "--steps", "3", "--out", tmp_path / "more", "--quiet",
                        "--threads", "1")
    assert code == 0 and "resuming" in out
    assert json.loads((tmp_path / "more" / "config.json").read_text())["step"] == 3
    code, _, err = run_cli(capsys, "train", "--resume", run_dir, "--batch", "4")
    assert "only --steps" in one_error_line(code, err)
    # the log of the resumed run comes along: step 2 (the last of run_dir), then step 3 of the continuation
    log = (tmp_path / "more" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [2, 3]
    # resuming into a folder that holds another run must not overwrite it
    before = (tmp_path / "more" / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", run_dir, "--steps", "4", "--out", tmp_path / "more", "--quiet")
    assert "already holds a training run" in one_error_line(code, err)
    assert (tmp_path / "more" / "model.safetensors").read_bytes() == before


def test_a_run_stopped_by_its_time_budget_resumes_with_a_larger_budget(tmp_path, capsys):
    run = tmp_path / "budget"
    code, _, _ = run_cli(capsys, "train", "--steps", "1000", "--batch", "2", "--patch", "16", "--tasks", "noise",
                      "--negatives", "0", "--time-budget", "0.5", "--out", run, "--quiet", "--threads", "1")
    assert code == 0
    step = json.loads((run / "config.json").read_text())["step"]
    assert 0 < step < 1000
    code, _, err = run_cli(capsys, "train", "--resume", run, "--quiet", "--threads", "1")
    assert "--time-budget" in one_error_line(code, err)
    code, _, _ = run_cli(capsys, "train", "--resume", run, "--time-budget", "1.5", "--quiet", "--threads", "1")
    assert code == 0
    assert json.loads((run / "config.json").read_text())["step"] > step


def test_restore_file_and_folder(run_dir, pairs, tmp_path, capsys):
    src = pairs / "input" / "im0.png"
    code, out, _ = run_cli(capsys, "restore", src, "-o", tmp_path / "one.png", "--checkpoint", run_dir, "--threads", "1")
    assert code == 0
    assert load_image(tmp_path / "one.png").shape == load_image(src).shape
    assert "prompt3: #" in out and "closest degradation:" in out
    code, out, _ = run_cli(capsys, "restore", pairs / "input", "-o", tmp_path / "many", "--checkpoint",
                        run_dir / "model.safetensors", "--tile", "16", "--tile-mode", "blend", "--overlap", "4", "--threads", "1")
    assert code == 0 and len([line for line in out.splitlines() if " -> " in line]) == 2
    assert "restored 2 of 2 image(s)" in out
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["im0.png", "im1.png"]


def test_eval_prints_and_writes_tables(run_dir, pairs, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", run_dir, "--data", pairs, "--channel", "y", "--crop-border", "2",
                        "--out", tmp_path, "--threads", "1")
    assert code == 0
    assert "PSNR in" in out and "mean" in out
    md = (tmp_path / "eval_y.md").read_text()
    rows = (tmp_path / "eval_y.csv").read_text().strip().splitlines()
    assert "| task |" in md and len(rows) == 3  # header, the task, the mean
    assert rows[1].split(",")[0] == "pairs" and rows[1].split(",")[1] == "2"


def test_clean_errors(run_dir, pairs, tmp_path, capsys):
    notimg = tmp_path / "notes.png"
    notimg.write_text("hello")
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(os.urandom(64))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((run_dir / "model.safetensors").read_bytes()[:200])
    cases = [
        (("restore", tmp_path / "missing.png", "-o", tmp_path / "o.png", "--checkpoint", run_dir), "no such"),
        (("restore", notimg, "-o", tmp_path / "o.png", "--checkpoint", run_dir), "cannot read"),
        (("restore", pairs / "input" / "im0.png", "-o", tmp_path / "o.png", "--checkpoint", tmp_path / "nope"), "no such"),
        (("restore", pairs / "input" / "im0.png", "-o", tmp_path / "o.png", "--checkpoint", corrupt), "not a valid"),
        (("restore", pairs / "input" / "im0.png", "-o", tmp_path / "o.png", "--checkpoint", truncated), "not a valid"),
        (("restore", pairs / "input" / "im0.png", "-o", tmp_path / "o.png", "--checkpoint",
          run_dir / "train_state.safetensors"), "training state"),
        (("eval", "--checkpoint", run_dir, "--data", tmp_path / "nodata"), "no such"),
        (("train", "--data", tmp_path / "nodata", "--steps", "1"), "no such"),
        (("train", "--patch", "20", "--steps", "1", "--out", tmp_path / "r"), "multiple of 8"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv)
        assert needle in one_error_line(code, err), (argv, err)


def test_help_and_subprocess_error():
    # a real process: exit status and stderr as a user sees them
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cplfast", "restore", "missing.png", "-o", "x.png", "--checkpoint", "c"],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    for command in ("demo", "train", "eval", "restore"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.slow
def test_demo_meets_its_targets(tmp_path, capsys, request):
    """The full demo (minutes on a CPU): mean PSNR gain >= 2 dB and the report files.

    Runs only when asked for: ``pytest -m slow`` or ``CPLFAST_SLOW=1``.
    """
    markexpr = request.config.getoption("markexpr") or ""
    if os.environ.get("CPLFAST_SLOW") != "1" and not ("slow" in markexpr and "not slow" not in markexpr):
        pytest.skip("the full demo takes minutes; run with -m slow or CPLFAST_SLOW=1")
    code, out, _ = run_cli(capsys, "demo", "--out", tmp_path, "--quiet")
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["tasks"]) == {"noise", "rain", "haze", "blur", "lowlight"}
    gains = [t["psnr_out"] - t["psnr_in"] for t in report["tasks"].values()]
    assert sum(gains) / len(gains) >= 2.0
    assert Path(report["checkpoint"]).exists()
    for name in ("grid.png", "routing.png", "results.md", "results.csv"):
        assert (tmp_path / name).stat().st_size > 0
