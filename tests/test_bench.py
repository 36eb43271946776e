"""Tests of the benchmark harness (``cplfast bench``): schema, ratios, failures, targets, merging, plots."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from cplfast.bench import merge, results, write_outputs
from cplfast.bench.cases import FULL, make_case
from cplfast.bench.ops import OP_BENCHMARKS
from cplfast.bench.runner import BenchConfig
from cplfast.bench.suite import run_suite
from cplfast.cli import main

RESULT_KEYS = {"op", "mode", "shape", "provider", "median_ms", "p20_ms", "p80_ms", "peak_mb"}
RATIO_KEYS = {"op", "mode", "shape", "speedup_vs_eager", "speedup_vs_compile"}


def _tiny_config(**overrides) -> BenchConfig:
    base = dict(device=torch.device("cpu"), quick=True, sweep=False, cpu_budget_s=0.01,
                compile_backend="eager", bandwidth_gbps=10.0)
    base.update(overrides)
    return BenchConfig(**base)


def test_cli_tiny_cpu_run_writes_the_schema(tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    code = main(["bench", "--device", "cpu", "--quick", "--ops", "sparse_prompt", "--no-sweep",
                 "--compile-backend", "eager", "--cpu-budget", "0.01", "--quiet", "--out", str(out)])
    assert code == 0
    assert torch.get_num_threads() == threads  # --quick runs single-threaded, then restores the setting
    doc = json.loads((out / "results.json").read_text())
    assert list(doc)[:7] == ["device", "torch", "triton", "commit", "date", "results", "ratios"]
    assert doc["torch"] == torch.__version__
    assert doc["conditions"]["reduced_shapes"] is True and doc["conditions"]["quick"] is True

    cases = [c for c in OP_BENCHMARKS["sparse_prompt"].cases(True, "cpu") if c.group != "sweep"]
    assert {c.group for c in cases} == {"train", "infer"}
    expected = {(c.op, m, c.shape, p) for c in cases for m in c.modes for p in ("cplfast", "eager", "compile")
                if p not in c.skip_providers}
    got = {(r["op"], r["mode"], r["shape"], r["provider"]) for r in doc["results"]}
    assert got == expected
    for row in doc["results"]:
        assert set(row) == RESULT_KEYS
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["peak_mb"] is None or row["peak_mb"] >= 0
    assert {(r["op"], r["mode"], r["shape"]) for r in doc["ratios"]} == {k[:3] for k in expected}
    medians = {(r["op"], r["mode"], r["shape"], r["provider"]): r["median_ms"] for r in doc["results"]}
    for ratio in doc["ratios"]:
        assert set(ratio) == RATIO_KEYS
        key = (ratio["op"], ratio["mode"], ratio["shape"])
        assert ratio["speedup_vs_eager"] == pytest.approx(medians[key + ("eager",)] / medians[key + ("cplfast",)])
        compiled = medians.get(key + ("compile",))
        want = None if compiled is None else pytest.approx(compiled / medians[key + ("cplfast",)])
        assert ratio["speedup_vs_compile"] == want
    assert any(r["speedup_vs_compile"] is not None for r in doc["ratios"])

    assert "## sparse_prompt" in (out / "results.md").read_text()
    with Image.open(out / "sparse_prompt.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_ratios_are_medians_of_eager_and_compile_over_cplfast():
    rows, want = [], {}
    for i in range(5):
        medians = {p: random.uniform(0.01, 10.0) for p in ("cplfast", "eager", "compile")}
        shape = f"N={i + 1}"
        for provider, value in medians.items():
            rows.append({"op": "supcon", "mode": FULL, "shape": shape, "provider": provider, "median_ms": value,
                         "p20_ms": value, "p80_ms": value, "peak_mb": None})
        want[shape] = (medians["eager"] / medians["cplfast"], medians["compile"] / medians["cplfast"])
    rows.append({"op": "supcon", "mode": FULL, "shape": "failed", "provider": "cplfast", "median_ms": None,
                 "p20_ms": None, "p80_ms": None, "peak_mb": None})
    rows.append({"op": "supcon", "mode": FULL, "shape": "failed", "provider": "eager", "median_ms": 1.0,
                 "p20_ms": 1.0, "p80_ms": 1.0, "peak_mb": None})
    ratios = {r["shape"]: r for r in results.compute_ratios(rows)}
    for shape, (vs_eager, vs_compile) in want.items():
        assert ratios[shape]["speedup_vs_eager"] == pytest.approx(vs_eager)
        assert ratios[shape]["speedup_vs_compile"] == pytest.approx(vs_compile)
    assert ratios["failed"]["speedup_vs_eager"] is None and ratios["failed"]["speedup_vs_compile"] is None


def test_a_failing_provider_is_recorded_and_the_run_goes_on(monkeypatch):
    bench = OP_BENCHMARKS["prompt_token_attention"]

    def broken():
        def fn(*args, **kwargs):
            raise RuntimeError("kernel exploded\nsecond line")
        return fn

    monkeypatch.setattr(bench, "fused", broken)
    doc = run_suite(_tiny_config(providers=("cplfast", "eager"), extras=False), ["prompt_token_attention"])
    fused = [r for r in doc["results"] if r["provider"] == "cplfast"]
    eager = [r for r in doc["results"] if r["provider"] == "eager"]
    assert fused and all(r["median_ms"] is None and r["peak_mb"] is None for r in fused)
    assert eager and all(r["median_ms"] is not None for r in eager)
    errors = {f["error"] for f in doc["failures"] if f["provider"] == "cplfast"}
    assert any(e.startswith("RuntimeError: kernel exploded") and "second line" not in e for e in errors), errors
    assert all(r["speedup_vs_eager"] is None for r in doc["ratios"])


def test_missing_e2e_model_is_skipped_with_its_reason(monkeypatch):
    from cplfast.bench import e2e

    def unavailable():
        raise e2e.E2EUnavailable("cplfast.models.PromptIR is not importable (test)")

    monkeypatch.setattr(e2e, "load_model_and_loss", unavailable)
    doc = run_suite(_tiny_config(), ["e2e"])
    assert doc["results"] == []
    assert {s["op"] for s in doc["skipped"]} == set(e2e.E2E_OPS)
    assert all("not importable (test)" in s["reason"] for s in doc["skipped"])


def _doc(device: str, op: str, shape: str, medians: dict, date: str) -> dict:
    rows = [{"op": op, "mode": FULL, "shape": shape, "provider": p, "median_ms": m, "p20_ms": m, "p80_ms": m,
             "peak_mb": 1.0} for p, m in medians.items()]
    doc = {"device": device, "torch": "x", "triton": None, "commit": "abc", "date": date, "results": rows,
           "cases": [{"op": op, "shape": shape, "name": op, "group": "train", "sweep_value": None, "modes": [FULL]}],
           "details": [], "conditions": {}}
    return results.finalize(doc)


def test_merge_combines_runs_and_recomputes_ratios_and_targets():
    first = _doc("GPU", "infonce", "B=8", {"cplfast": 1.0, "eager": 5.0, "compile": 2.0}, "2026-01-01T00:00:00")
    second = _doc("GPU", "supcon", "N=16384", {"cplfast": 2.0, "eager": 3.0}, "2026-01-02T00:00:00")
    merged = merge([first, second])
    results.validate(merged)
    ratios = {r["op"]: r for r in merged["ratios"]}
    assert ratios["infonce"]["speedup_vs_eager"] == pytest.approx(5.0)
    assert ratios["supcon"]["speedup_vs_eager"] == pytest.approx(1.5)
    assert ratios["supcon"]["speedup_vs_compile"] is None
    targets = {(t["op"], t["metric"]): t["met"] for t in merged["targets"]}
    assert targets[("infonce", "speedup_vs_eager")] is True  # 5x >= 4x
    assert targets[("infonce", "speedup_vs_compile")] is True  # 2x >= 1.5x
    assert targets[("infonce", "peak_mb vs eager")] is False  # equal peaks, target <= 1/4
    assert targets[("supcon", "speedup_vs_eager")] is False  # 1.5x < 2x
    assert merged["date"] == "2026-01-02T00:00:00"
    with pytest.raises(ValueError, match="different devices"):
        merge([first, _doc("CPU", "supcon", "N=1", {"cplfast": 1.0}, "2026-01-03T00:00:00")])


def test_cli_merge_writes_outputs_from_saved_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_outputs(_doc("GPU", "infonce", "B=8", {"cplfast": 1.0, "eager": 4.0}, "2026-01-01T00:00:00"), a)
    write_outputs(_doc("GPU", "supcon", "N=16384", {"cplfast": 1.0, "eager": 2.5}, "2026-01-01T00:00:00"), b)
    assert main(["bench", "--merge", str(a), str(b / "results.json"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert {r["op"] for r in merged["results"]} == {"infonce", "supcon"}
    assert main(["bench", "--merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2


def test_every_case_has_consistent_floors():
    for bench in OP_BENCHMARKS.values():
        for quick, device in ((False, "cuda"), (True, "cuda"), (True, "cpu")):
            cases = bench.cases(quick, device)
            assert cases, (bench.name, quick, device)
            for case in cases:
                traffic = bench.traffic(case, 4)
                for mode in case.modes:
                    assert traffic[mode].bytes > 0
                if FULL in traffic:
                    fwd, bwd, full = traffic["forward"], traffic["backward"], traffic[FULL]
                    assert full.bytes == fwd.bytes + bwd.bytes and full.flops == fwd.flops + bwd.flops


def test_floors_match_hand_counts_at_spec_shapes():
    # infonce K=4, C=64, 128x128, B=8 fp32: forward reads anchor, positive and 4 negatives once.
    infonce = OP_BENCHMARKS["infonce"]
    case = make_case("infonce", "CPR", "train", B=8, K=4, C=64, H=128, W=128)
    assert infonce.traffic(case, 4)["forward"].bytes == 6 * 8 * 64 * 128 * 128 * 4
    # PIP level 1: q, k, v, out of (8, 2, 32, 128*128) fp32 forward; Gram + P@v = 4 c^2 L flops per head.
    topm = OP_BENCHMARKS["topm_channel_attention"]
    case = make_case("topm_channel_attention", "pip1", "train", B=8, h=2, c=32, L=16384, variant="topm")
    forward = topm.traffic(case, 4)["forward"]
    assert forward.bytes == 4 * 8 * 2 * 32 * 16384 * 4
    assert forward.flops >= 4 * 8 * 2 * 32 * 32 * 16384
    # supcon N=16384, D=256: 2 N^2 D flops forward.
    supcon = OP_BENCHMARKS["supcon"]
    case = make_case("supcon", "N=16k", "train", N=16384, D=256, classes=5)
    assert supcon.traffic(case, 4)["forward"].flops == 2 * 16384 ** 2 * 256


def test_spec_shapes_follow_the_model_presets():
    presets = pytest.importorskip("cplfast.models.presets")
    from cplfast.bench import shapes

    base = presets.PRESETS["base"]
    widths = base.level_widths()
    assert [s.prompt_dim for s in shapes.PROMPT_SLOTS] == list(base.prompt_dims)
    assert [s.prompt_size for s in shapes.PROMPT_SLOTS] == list(base.prompt_sizes)
    assert {s.prompt_len for s in shapes.PROMPT_SLOTS} == {base.prompt_len}
    assert [s.lin_dim for s in shapes.PROMPT_SLOTS] == list(widths[1:])
    assert [w for _, _, w, _ in shapes.LEVELS] == list(widths)
    assert [h for _, _, _, h in shapes.LEVELS] == list(base.heads)
    assert [w for _, _, w, _ in shapes.PIP_INTERACTIONS] == list(base.prompt_dims)
    assert {h for _, _, _, h in shapes.PIP_INTERACTIONS} == {base.pip_heads}
    assert [w for _, _, w, _ in shapes.DPPD_FUSIONS] == list(widths[1:])
    assert {h for _, _, _, h in shapes.DPPD_FUSIONS} == {base.heads[2]}
    assert shapes.DPPD_TOKENS == base.prompt_tokens


def test_cuda_graph_timing_is_chosen_for_launch_bound_memory_bound_cases():
    from cplfast.bench.runner import wants_graph

    def graphed(op, name, policy="auto"):
        bench = OP_BENCHMARKS[op]
        case = next(c for c in bench.cases(False, "cuda") if c.name == name and c.group == "train")
        config = BenchConfig(device=torch.device("cuda"), cudagraph=policy, bandwidth_gbps=3000.0)
        return wants_graph(bench, case, config)

    assert graphed("sparse_prompt", "prompt1")  # 58 MB forward+backward: ~19 us at 3 TB/s
    assert not graphed("infonce", "CPR")  # 570 MB: ~190 us
    assert not graphed("supcon", "N=16k")  # few bytes, but compute-bound
    assert not graphed("sparse_prompt", "prompt1", "off")
    assert graphed("infonce", "CPR", "on")
    cpu = BenchConfig(device=torch.device("cpu"), cudagraph="on", bandwidth_gbps=3000.0)
    assert not wants_graph(OP_BENCHMARKS["infonce"], OP_BENCHMARKS["infonce"].cases(False, "cuda")[0], cpu)


def test_plot_handles_failed_providers_and_sweeps(tmp_path):
    from cplfast.bench.plot import draw_op_png

    path = tmp_path / "op.png"
    bars = [("a fwd+bwd", {"eager": 2.0, "compile": 1.0, "cplfast": 0.2}), ("b infer", {"eager": 0.5, "cplfast": None})]
    lines = {"eager": [(16.0, 1.0), (32.0, 4.0)], "cplfast": [(16.0, 0.1), (32.0, None)]}
    draw_op_png(path, "op", bars, lines, "side")
    with Image.open(path) as image:
        assert image.size == (1400, 560)
        colors = {c for _, c in image.getcolors(maxcolors=1 << 16)}
    assert (40, 160, 90) in colors and (220, 90, 60) in colors  # cplfast and eager were drawn


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--ops", "nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown op 'nonsense'" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
