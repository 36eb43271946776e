"""SPEC §8's CPU rule: cplfast's reference path must not be slower than the official PromptIR code.

Times ``cplfast.models.PromptIR(prompt="promptir", preset="base")`` on the reference backend against
``tests/_official_promptir.OfficialPromptIR`` (the official ``net/model.py`` operation for operation:
``(B, HW, C)`` LayerNorm views, the materialised ``(B, N, D, S, S)`` prompt mix) holding the same weights,
on the CPU: inference (no grad) and a training step (forward, L1, backward). The two models alternate
call by call so that load on a shared machine hits both alike; the medians and their ratio are written
as JSON and markdown.

    python benchmarks/cpu_vs_official.py --out benchmarks/results/cpu-DATE [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _official_promptir import OfficialPromptIR  # noqa: E402

import cplfast  # noqa: E402
from cplfast.models import PromptIR  # noqa: E402

CASES = (  # (mode, batch, side)
    ("inference", 1, 128),
    ("inference", 1, 256),
    ("train_step", 2, 64),
)


def _workload(model, mode: str, x: torch.Tensor, y: torch.Tensor):
    if mode == "inference":
        def run():
            with torch.no_grad():
                model(x)
    else:
        def run():
            model.zero_grad(set_to_none=True)
            (model(x) - y).abs().mean().backward()
    return run


def _time_alternating(runs: dict, repeats: int) -> dict[str, list[float]]:
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = PromptIR(prompt="promptir", preset="base")
    official = OfficialPromptIR()
    official.load_state_dict(ours.state_dict(), strict=True)
    rows = []
    with cplfast.use_backend("reference"):
        for mode, batch, side in CASES:
            x, y = torch.rand(batch, 3, side, side), torch.rand(batch, 3, side, side)
            for model in (ours, official):
                model.train(mode == "train_step")
            with torch.no_grad():
                err = (ours(x) - official(x)).abs().max().item()
            times = _time_alternating({"cplfast": _workload(ours, mode, x, y),
                                       "official": _workload(official, mode, x, y)}, args.repeats)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            rows.append({"mode": mode, "shape": [batch, 3, side, side], "median_ms": med,
                         "min_ms": {name: min(t) * 1e3 for name, t in times.items()},
                         "speedup_vs_official": med["official"] / med["cplfast"], "max_abs_diff": err})
            print(f"{mode:10s} {batch}x3x{side}x{side}: cplfast {med['cplfast']:.0f} ms, official "
                  f"{med['official']:.0f} ms, speedup {rows[-1]['speedup_vs_official']:.2f}x (max |diff| {err:.1e})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "repeats": args.repeats,
            "model": "PromptIR base (35.6 M parameters), fp32, reference backend", "results": rows}
    (out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["# cplfast reference path vs the official PromptIR forward, CPU\n",
             f"{meta['device']}, torch {meta['torch']}, {meta['date']}, median of {args.repeats} alternating runs.\n",
             "| mode | shape | cplfast ms | official ms | speedup | max abs diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['median_ms']['cplfast']:.0f} | "
                     f"{r['median_ms']['official']:.0f} | {r['speedup_vs_official']:.2f}x | {r['max_abs_diff']:.1e} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
