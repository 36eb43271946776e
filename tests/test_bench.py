"""Tests of the benchmark harness (``cplfast bench``): schema, ratios, failures, targets, merging, plots,
interleaved and shuffled timing rounds, the correctness check, and ``benchmarks/cpu_vs_official.py``."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cplfast.bench import merge, results, write_outputs
from cplfast.bench.cases import FULL, make_case
from cplfast.bench.ops import OP_BENCHMARKS
from cplfast.bench import runner
from cplfast.bench.runner import BenchConfig
from cplfast.bench.suite import run_suite
from cplfast.bench.timing import Sampler, interleave
from cplfast.cli import main

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"op", "mode", "shape", "provider", "median_ms", "p20_ms", "p80_ms", "peak_mb", "min_ms", "max_ms",
               "rounds", "correct"}
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
        assert 0 < row["min_ms"] <= row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] <= row["max_ms"], row
        assert row["rounds"] >= 5 and row["correct"] is True, row
        assert row["peak_mb"] is None or row["peak_mb"] >= 0
    orders = {(o["op"], o["mode"], o["shape"]): o["orders"] for o in doc["orders"]}
    for row in doc["results"]:
        rounds = orders[(row["op"], row["mode"], row["shape"])]
        assert len(rounds) == row["rounds"] and all(order.count(row["provider"]) == 1 for order in rounds)
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
    assert any("RuntimeError: kernel exploded" in e and "second line" not in e for e in errors), errors
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
    from cplfast.models.promptir import PIP_BASE_PROMPT_DIMS

    assert [w for _, _, w, _ in shapes.PIP_INTERACTIONS] == list(PIP_BASE_PROMPT_DIMS)
    assert {h for _, _, _, h in shapes.PIP_INTERACTIONS} == {base.heads[2]}
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
    assert main(["bench", "--device", "cpu", "--rounds", "0", "--out", str(tmp_path)]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- interleaving
class _RecordingSampler(Sampler):
    """A fake timer: logs which provider was sampled and returns the next of its scripted times."""

    timer = "fake"

    def __init__(self, name: str, log: list, times: list[float]):
        super().__init__()
        self.name, self.log, self.times = name, log, list(times)

    def sample(self) -> float:
        self.log.append(self.name)
        self.calls += 1
        return self.times[(self.calls - 1) % len(self.times)]


def test_interleave_times_each_provider_once_per_round_in_fresh_seeded_orders():
    names = ("cplfast", "eager", "compile", "sdpa")

    def run(seed):
        log = []
        samplers = {n: _RecordingSampler(n, log, [1.0]) for n in names}
        return log, interleave(samplers, random.Random(seed), min_rounds=12, max_rounds=12)

    log, rounds = run(7)
    assert len(rounds.orders) == 12
    assert [log[i:i + 4] for i in range(0, len(log), 4)] == rounds.orders  # the recorded order is the call order
    assert all(sorted(order) == sorted(names) for order in rounds.orders)
    assert len({tuple(order) for order in rounds.orders}) > 1
    assert len({order[0] for order in rounds.orders}) > 1  # nobody always goes first
    assert run(7)[1].orders == rounds.orders  # seeded: reproducible
    assert run(8)[1].orders != rounds.orders
    assert all(len(rounds.samples[n]) == 12 for n in names)


def test_interleave_drops_a_failing_provider_and_goes_on():
    log = []

    class Breaks(_RecordingSampler):
        def sample(self):
            if self.calls == 2:
                raise RuntimeError("boom")
            return super().sample()

    samplers = {"ok": _RecordingSampler("ok", log, [1.0]), "bad": Breaks("bad", log, [1.0])}
    rounds = interleave(samplers, random.Random(0), min_rounds=6, max_rounds=6)
    assert str(rounds.errors["bad"]) == "boom"
    assert len(rounds.samples["ok"]) == 6 and len(rounds.samples["bad"]) == 2
    assert rounds.orders[-1] == ["ok"]
    with pytest.raises(ValueError, match="min_rounds"):
        interleave(samplers, random.Random(0), min_rounds=0, max_rounds=1)


def test_interleave_runs_until_the_budget_is_spent():
    ticks = iter(range(1000))
    samplers = {"a": _RecordingSampler("a", [], [1.0])}
    rounds = interleave(samplers, random.Random(0), min_rounds=2, max_rounds=100, budget_s=10,
                        clock=lambda: float(next(ticks)))
    # the clock starts at 0 and is read once per round after min_rounds: rounds 3..11 see 1..9 s, then 10 s stops
    assert len(rounds.orders) == 11
    rounds = interleave(samplers, random.Random(0), min_rounds=3, max_rounds=5, budget_s=1e9)
    assert len(rounds.orders) == 5


@pytest.fixture
def fake_timer(monkeypatch):
    """Replace the timers with recording fakes: per provider a scripted time sequence (ms)."""
    log: list[str] = []
    script = {"cplfast": [1.0, 2.0, 3.0, 4.0, 5.0], "eager": [10.0, 30.0, 20.0, 50.0, 40.0]}

    def fake_make_sampler(prepare, config, use_graph, rounds):
        prepare()  # the setup runs as for a real timer
        return _RecordingSampler("?", log, [0.0])

    real_interleave = runner.interleave

    def naming_interleave(samplers, rng, **kwargs):
        for name, sampler in samplers.items():
            sampler.name, sampler.times = name, script.get(name, [7.0])
        return real_interleave(samplers, rng, **kwargs)

    monkeypatch.setattr(runner, "make_sampler", fake_make_sampler)
    monkeypatch.setattr(runner, "interleave", naming_interleave)
    monkeypatch.setattr(runner, "peak_mb", lambda prepare, device: 1.0)
    return log


def test_suite_interleaves_providers_and_reports_the_spread(fake_timer, tmp_path):
    config = _tiny_config(providers=("cplfast", "eager"), extras=False, rounds=5, seed=3, cpu_budget_s=0.0)
    doc = run_suite(config, ["prompt_token_attention"])
    log = fake_timer
    rows = doc["results"]
    assert rows and all(r["rounds"] == 5 for r in rows)
    # the log, cut into rounds, is exactly the recorded orders, case by case and mode by mode
    recorded = [order for o in doc["orders"] for order in o["orders"]]
    assert sum(map(len, recorded)) == len(log)
    position = 0
    for order in recorded:
        assert log[position:position + len(order)] == order and sorted(order) == ["cplfast", "eager"]
        position += len(order)
    assert len({tuple(order) for order in recorded}) == 2  # both orders occur
    assert all(o["seed"] == f'3:prompt_token_attention:{o["shape"]}:{o["mode"]}' for o in doc["orders"])
    for row in rows:
        want = {"cplfast": (3.0, 1.8, 4.2, 1.0, 5.0), "eager": (30.0, 18.0, 42.0, 10.0, 50.0)}[row["provider"]]
        got = (row["median_ms"], row["p20_ms"], row["p80_ms"], row["min_ms"], row["max_ms"])
        assert got == pytest.approx(want), row
    detail = next(d for d in doc["details"] if d["provider"] == "cplfast")
    assert detail["order_seed"].startswith("3:prompt_token_attention:") and detail["rounds"] == 5
    assert all(r["speedup_vs_eager"] == pytest.approx(10.0) for r in doc["ratios"])
    write_outputs(doc, tmp_path, plots=False)
    table = (tmp_path / "results.md").read_text()
    assert "| 3.000 [1.800–4.200] (1.000–5.000) |" in table and "30.000 [18.000–42.000] (10.000–50.000)" in table
    assert "median [p20–p80] (min–max)" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["orders"] == doc["orders"] and saved["results"][0]["min_ms"] == rows[0]["min_ms"]


# ---------------------------------------------------------------------------------------------- correctness
class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient scaled by 1.01 (a kernel whose backward is slightly wrong)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


@pytest.mark.parametrize("fault", ["output", "gradient"])
def test_a_wrong_provider_is_flagged_never_silently_timed(fake_timer, monkeypatch, tmp_path, fault):
    from cplfast import reference

    bench = OP_BENCHMARKS["prompt_token_attention"]

    def wrong():
        def fn(q, k, v, **kwargs):
            out = reference.prompt_token_attention(q, k, v, **kwargs)
            return out * (1 + 1e-3) if fault == "output" else _ScaleGrad.apply(out)
        return fn

    monkeypatch.setattr(bench, "fused", wrong)
    doc = run_suite(_tiny_config(providers=("cplfast", "eager"), extras=False, rounds=5, cpu_budget_s=0.0),
                    ["prompt_token_attention"])
    fused = [r for r in doc["results"] if r["provider"] == "cplfast"]
    eager = [r for r in doc["results"] if r["provider"] == "eager"]
    assert eager and all(r["correct"] is True for r in eager)
    assert all(r["median_ms"] is not None for r in fused)  # timed, but marked
    for row in fused:
        infer = row["shape"].startswith("B=1 ")
        # a wrong gradient leaves the inference case (forward only, no_grad) correct
        assert row["correct"] is (fault == "gradient" and infer), row
    wrong_keys = {(r["mode"], r["shape"]) for r in fused if r["correct"] is False}
    failures = {(f["mode"], f["shape"]): f["error"] for f in doc["failures"] if f["provider"] == "cplfast"}
    assert set(failures) == wrong_keys
    for error in failures.values():
        assert error.startswith("wrong result (WRONG: differs from the float64 reference"), error
        assert ("= output 1.00e-03" in error) is (fault == "output"), error
        assert fault == "output" or "= grad[" in error, error
    ratios = {(r["mode"], r["shape"]): r["speedup_vs_eager"] for r in doc["ratios"]}
    for key, value in ratios.items():
        assert (value is None) == (key in wrong_keys)
    write_outputs(doc, tmp_path, plots=False)
    assert "**WRONG** " in (tmp_path / "results.md").read_text()


def test_the_check_tolerance_fits_the_dtype_and_catches_non_finite_values():
    want = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert runner.relative_error(want.float(), want) == 0.0
    assert runner.relative_error(want + 4e-4, want) == pytest.approx(1e-4)
    assert runner.relative_error(torch.tensor([1.0, float("nan"), 4.0]), want) == float("inf")
    assert runner.relative_error(want[:2], want) == float("inf")
    assert runner.relative_error(None, torch.zeros(3)) == 0.0
    assert runner.TOLERANCES[torch.float32] < runner.TOLERANCES[torch.float16] < runner.TOLERANCES[torch.bfloat16]


def test_cli_exits_nonzero_when_a_result_is_wrong(fake_timer, monkeypatch, tmp_path):
    from cplfast import reference

    bench = OP_BENCHMARKS["supcon"]
    monkeypatch.setattr(bench, "fused", lambda: (lambda z, labels, **kw: reference.supcon(z, labels, **kw) * 1.01))
    code = main(["bench", "--device", "cpu", "--quick", "--ops", "supcon", "--no-sweep", "--providers", "cplfast",
                 "eager", "--quiet", "--no-plots", "--out", str(tmp_path)])
    assert code == 1
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["correct"] for r in doc["results"] if r["provider"] == "cplfast"} == {False}


# ---------------------------------------------------------------------------------------------- --audit
def test_cli_audit_runs_the_compile_audit(monkeypatch, capsys):
    from cplfast.kernels import audit

    calls = []
    monkeypatch.setattr(audit, "main", lambda argv=None: calls.append(list(argv)) or 0)
    assert main(["bench", "--audit"]) == 0
    assert main(["bench", "--audit", "--full", "--arch", "sm_90"]) == 0
    assert calls == [["--quick"], ["--arch", "sm_90"]]
    assert main(["bench", "--full", "--out", "x"]) == 2
    assert "--full only applies to --audit" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- cpu_vs_official
@pytest.fixture(scope="module")
def cvo():
    spec = importlib.util.spec_from_file_location("cpu_vs_official", REPO / "benchmarks" / "cpu_vs_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_vs_official_pairs_runs_in_shuffled_order(cvo):
    clock = [0.0]
    log = []

    def runner_for(name, cost):
        def run():
            log.append(name)
            clock[0] += cost
        return run

    runs = {"cplfast": runner_for("cplfast", 1.0), "baseline": runner_for("baseline", 3.0)}
    times, orders = cvo.paired_times(runs, 12, random.Random(1), warmup=1, clock=lambda: clock[0])
    assert log[:2] == ["cplfast", "baseline"]  # warm-up
    assert [log[i:i + 2] for i in range(2, len(log), 2)] == orders
    assert all(sorted(o) == ["baseline", "cplfast"] for o in orders)
    assert {o[0] for o in orders} == {"cplfast", "baseline"}  # each side goes first in some pairs
    assert times == {"cplfast": [1.0] * 12, "baseline": [3.0] * 12}
    summary = cvo.compare_pairs(times["cplfast"], times["baseline"])
    assert summary["ratio_median"] == 3.0 and summary["ratio_ci"] == [3.0, 3.0]
    assert summary["verdict"].startswith("cplfast faster")


def test_cpu_vs_official_median_interval_and_verdicts(cvo):
    assert cvo.median_interval([1.0] * 5) is None  # 2/32 > 5 %: no 95 % interval from five pairs
    low, high, coverage = cvo.median_interval([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])
    assert (low, high) == (1.0, 6.0) and coverage == pytest.approx(1 - 2 / 64)
    values = [float(v) for v in range(1, 21)]
    low, high, coverage = cvo.median_interval(values)
    assert (low, high) == (6.0, 15.0) and coverage >= 0.95  # P(B <= 5) = 2.1 %, P(B <= 6) = 5.8 % for n = 20
    ours = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    mixed = cvo.compare_pairs(ours, [0.9, 1.1, 0.95, 1.05, 1.2, 0.8, 1.0])
    assert mixed["verdict"].startswith("no measurable difference")
    assert mixed["cplfast"]["p20_ms"] == 1000.0 and mixed["baseline"]["min_ms"] == pytest.approx(800.0)
    assert cvo.compare_pairs(ours, [0.5] * 7)["verdict"].startswith("cplfast slower")
    assert cvo.compare_pairs([1.0] * 3, [2.0] * 3)["ratio_ci"] is None
    with pytest.raises(ValueError):
        cvo.compare_pairs([1.0], [1.0, 2.0])


def test_cpu_vs_official_tiny_run_names_its_baseline(cvo, tmp_path, capsys):
    assert cvo.main(["--out", str(tmp_path), "--preset", "tiny", "--quick", "--repeats", "6", "--threads", "1"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "re-implementation" in doc["baseline"] and "not the upstream code" in doc["baseline"]
    assert {r["mode"] for r in doc["results"]} == {"inference", "train_step"}
    for row in doc["results"]:
        assert row["pairs"] == 6 and len(row["ratios"]) == 6 and len(row["orders"]) == 6
        assert row["ratio_ci"][0] <= row["ratio_median"] <= row["ratio_ci"][1]
        assert row["max_abs_diff"] <= 1e-4
        for side in ("cplfast", "baseline"):
            stats = row[side]
            assert stats["min_ms"] <= stats["p20_ms"] <= stats["median_ms"] <= stats["p80_ms"] <= stats["max_ms"]
    assert "Baseline: the project's own plain re-implementation" in (tmp_path / "results.md").read_text()
    assert "baseline: the project's own" in capsys.readouterr().out


def _fake_checkout(root: Path, body: str) -> Path:
    """A stand-in for a va1shn9v/PromptIR checkout: net/model.py built on tests/_official_promptir.py."""
    (root / "net").mkdir(parents=True)
    (root / "net" / "model.py").write_text(
        "import importlib.util\n"
        f"_spec = importlib.util.spec_from_file_location('_fake_upstream', {str(REPO / 'tests' / '_official_promptir.py')!r})\n"
        "_m = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_m)\n"
        "class PromptIR(_m.OfficialPromptIR):\n"
        "    def __init__(self, decoder=False):\n"
        "        assert decoder, 'the benchmark must build the decoder (prompt) variant'\n"
        "        super().__init__(**_m.TINY_ARGS)\n" + body)
    return root


def test_cpu_vs_official_times_an_upstream_checkout(cvo, tmp_path):
    repo = _fake_checkout(tmp_path / "PromptIR", "")
    out = tmp_path / "out"
    assert cvo.main(["--out", str(out), "--preset", "tiny", "--quick", "--repeats", "2", "--threads", "1",
                     "--official-repo", str(repo)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["baseline"].startswith("the upstream PromptIR code") and str(repo / "net" / "model.py") in doc["baseline"]
    assert all(r["ratio_ci"] is None and r["verdict"].startswith("too few pairs") for r in doc["results"])
    assert str(repo) not in sys.path


def test_cpu_vs_official_refuses_a_baseline_that_disagrees(cvo, tmp_path):
    body = ("    def forward(self, img):\n"
            "        return super().forward(img) + 1e-3\n")
    repo = _fake_checkout(tmp_path / "PromptIR", body)
    with pytest.raises(SystemExit, match="differs from cplfast's .* nothing timed"):
        cvo.main(["--out", str(tmp_path / "o"), "--preset", "tiny", "--quick", "--repeats", "2", "--threads", "1",
                  "--official-repo", str(repo)])
    with pytest.raises(SystemExit, match="net/model.py does not exist"):
        cvo.main(["--out", str(tmp_path / "o"), "--official-repo", str(tmp_path / "nowhere")])


def test_e2e_inference_is_checked_against_the_reference_backend(fake_timer, monkeypatch):
    from cplfast.bench import e2e

    real = e2e.prepare_workload

    def wrong_for_cplfast(case, provider, config, model, cpr):
        prepare = real(case, provider, config, model, cpr)
        if provider != "cplfast":
            return prepare
        fn = prepare()
        return lambda: (lambda: fn() * 1.01)

    monkeypatch.setattr(e2e, "prepare_workload", wrong_for_cplfast)
    from cplfast.bench import runner

    monkeypatch.setattr(runner, "peak_mb", lambda prepare, device: 1.0)  # the memory probe of every timing
    doc = run_suite(_tiny_config(providers=("cplfast", "eager"), rounds=3, cpu_budget_s=0.0), [e2e.INFER])
    rows = {r["provider"]: r for r in doc["results"]}
    assert rows["eager"]["correct"] is True and rows["cplfast"]["correct"] is False
    assert rows["cplfast"]["median_ms"] is not None and rows["cplfast"]["rounds"] >= 3
    assert [f["provider"] for f in doc["failures"]] == ["cplfast"]
    assert doc["ratios"][0]["speedup_vs_eager"] is None


def test_cpu_summary_calls_gpu_targets_not_applicable_and_skips_not_failures(capsys):
    """Old: a CPU --quick run ended with "2 failed ... 0 met, 14 missed" for cases that were skipped or are
    GPU targets."""
    from cplfast.commands.bench import _print_summary

    target = dict(op="infonce", shape="K=4", metric="speedup_vs_eager", target=4.0, value=1.1, met=False)
    doc = dict(device="cpu (x86_64), 1 thread", torch="2.13", triton="3.9", commit="abc", results=[], ratios=[],
               targets=[target] * 3, conditions={"reduced_shapes": True},
               failures=[dict(op="supcon", mode="forward", shape="N=8", provider="compile",
                              error="skipped: torch.compile is slow on the CPU")])
    _print_summary(doc)
    out = capsys.readouterr().out
    assert "SPEC §8 targets: not applicable (3 GPU targets; this run is on the CPU)" in out
    assert "missed" not in out.lower() and "MISSED" not in out
    assert "0 failed" in out and "1 skipped or not applicable" in out and "  skipped: supcon" in out

    gpu = dict(doc, device="NVIDIA H100 80GB HBM3", conditions={}, failures=[])
    _print_summary(gpu)
    assert "SPEC §8 targets: 0 met, 3 missed, 0 unmeasured" in capsys.readouterr().out
