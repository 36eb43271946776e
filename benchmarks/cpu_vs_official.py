"""SPEC §8's CPU rule: cplfast's reference path must not be slower than the official PromptIR code.

What the baseline is. By default the "official" side is NOT the upstream PromptIR code: it is
``tests/_official_promptir.OfficialPromptIR``, this project's own plain re-implementation of upstream's
``net/model.py`` (written from the published architecture, operation for operation: ``(B, HW, C)``
LayerNorm views, the materialised ``(B, N, D, S, S)`` prompt mix), which holds the same weights. With
``--official-repo PATH`` the baseline is the upstream code itself: ``PATH/net/model.py`` of a checkout of
va1shn9v/PromptIR is imported, ``PromptIR(decoder=True)`` is built from it, cplfast's weights are loaded
into it strictly (the state_dict keys are the same), and its outputs must agree with cplfast's (max abs
difference <= 1e-4 in fp32) before anything is timed. Upstream's model has the ``base`` widths only, so
use it with ``--preset base`` (the default). No upstream code is shipped with cplfast.

What is timed: ``cplfast.models.PromptIR(prompt="promptir")`` on the ``reference`` backend against the
baseline, on the CPU: inference (no grad) and a training step (forward, L1 loss, backward).

How: paired and randomised. For every case, ``--repeats`` pairs are timed; in each pair both models run
once, in an order shuffled afresh per pair (``random.Random(--seed)``), so drift of a shared machine hits
both sides alike and neither always runs first. Per pair the ratio ``t_baseline / t_cplfast`` is taken
(> 1: cplfast is faster); reported are its median with a distribution-free 95 % interval (order statistics
of the pair ratios: the ranks whose binomial(n, 1/2) tail is at most 2.5 % on each side; needs >= 6
pairs), and the median, p20 / p80, min and max of each side. An interval that contains 1 means no
difference is measurable at this noise level.

    python benchmarks/cpu_vs_official.py --out benchmarks/results/cpu-DATE [--threads 2] [--repeats 15]
    python benchmarks/cpu_vs_official.py --out OUT --official-repo ~/src/PromptIR
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
OUTPUT_TOLERANCE = 1e-4  # max abs difference of the restored images, fp32
CASES = (  # (mode, batch, side)
    ("inference", 1, 128),
    ("inference", 1, 256),
    ("train_step", 2, 64),
)
QUICK_CASES = (("inference", 1, 32), ("train_step", 1, 32))
DEFAULT_BASELINE = ("the project's own plain re-implementation of the official PromptIR network "
                    "(tests/_official_promptir.py, OfficialPromptIR), not the upstream code")


# ---------------------------------------------------------------------------------------------- statistics
def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty list."""
    data = sorted(values)
    point = q * (len(data) - 1)
    lo, hi = math.floor(point), math.ceil(point)
    return data[lo] + (data[hi] - data[lo]) * (point - lo)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """Distribution-free interval for the median: ``(low, high, coverage)``, or None when n is too small.

    With the values sorted, ``[x_(k), x_(n+1-k)]`` covers the median with probability
    ``1 - 2 P(B <= k-1)``, ``B ~ Binomial(n, 1/2)``; ``k`` is the largest rank keeping that >= ``confidence``.
    """
    n = len(values)
    data = sorted(values)
    tail = (1 - confidence) / 2
    k, cdf = 0, 0.0
    for j in range(n):
        cdf += math.comb(n, j) / 2**n  # P(B <= j)
        if cdf > tail:
            break
        k = j + 1
    if k == 0:
        return None
    below = sum(math.comb(n, j) for j in range(k)) / 2**n
    return data[k - 1], data[n - k], 1 - 2 * below


def side_stats(seconds: list[float]) -> dict:
    ms = [t * 1e3 for t in seconds]
    return {"median_ms": statistics.median(ms), "p20_ms": quantile(ms, 0.2), "p80_ms": quantile(ms, 0.8),
            "min_ms": min(ms), "max_ms": max(ms)}


def compare_pairs(ours: list[float], baseline: list[float], confidence: float = 0.95) -> dict:
    """Per-pair ratios ``baseline / ours`` (same repeat), their median, interval and a verdict."""
    if len(ours) != len(baseline) or not ours:
        raise ValueError(f"need the same non-zero number of times on both sides, got {len(ours)} and {len(baseline)}")
    ratios = [b / o for o, b in zip(ours, baseline)]
    interval = median_interval(ratios, confidence)
    if interval is None:
        verdict = f"too few pairs for a {confidence:.0%} interval (need at least 6)"
        ci, coverage = None, None
    else:
        low, high, coverage = interval
        ci = [low, high]
        if low > 1:
            verdict = "cplfast faster (the interval is above 1)"
        elif high < 1:
            verdict = "cplfast slower (the interval is below 1)"
        else:
            verdict = "no measurable difference (the interval contains 1)"
    return {"pairs": len(ratios), "ratios": ratios, "ratio_median": statistics.median(ratios),
            "ratio_ci": ci, "ci_coverage": coverage, "verdict": verdict,
            "cplfast": side_stats(ours), "baseline": side_stats(baseline)}


def paired_times(runs: dict[str, Callable[[], object]], repeats: int, rng: random.Random, *, warmup: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Time every run once per repeat, in an order shuffled afresh each repeat; ``(seconds, orders)``."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    orders: list[list[str]] = []
    for _ in range(repeats):
        order = list(runs)
        rng.shuffle(order)
        orders.append(order)
        for name in order:
            start = clock()
            runs[name]()
            times[name].append(clock() - start)
    return times, orders


# ---------------------------------------------------------------------------------------------- models
def load_upstream_class(repo: Path):
    """``PromptIR`` from ``repo/net/model.py`` (a checkout of va1shn9v/PromptIR), imported from that file."""
    model_py = Path(repo).expanduser().resolve() / "net" / "model.py"
    if not model_py.is_file():
        raise SystemExit(f"--official-repo: {model_py} does not exist (expected a checkout of va1shn9v/PromptIR)")
    root = str(model_py.parents[1])
    sys.path.insert(0, root)  # upstream modules import their siblings from the checkout's root
    try:
        spec = importlib.util.spec_from_file_location("promptir_upstream_net_model", model_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as err:
        raise SystemExit(f"--official-repo: importing {model_py} failed: {err} (upstream's model needs e.g. einops)")
    finally:
        if root in sys.path:
            sys.path.remove(root)
    if not hasattr(module, "PromptIR"):
        raise SystemExit(f"--official-repo: {model_py} defines no PromptIR")
    return module.PromptIR, model_py


def build_models(preset: str, official_repo: Path | None):
    """``(ours, baseline, description)`` with the baseline holding ours' weights (strict load)."""
    from cplfast.models import PromptIR

    ours = PromptIR(prompt="promptir", preset=preset)
    if official_repo is None:
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from _official_promptir import TINY_ARGS, OfficialPromptIR
        finally:
            sys.path.remove(str(REPO / "tests"))
        baseline = OfficialPromptIR(**(TINY_ARGS if preset == "tiny" else {}))
        description = DEFAULT_BASELINE
    else:
        upstream, model_py = load_upstream_class(official_repo)
        baseline = upstream(decoder=True)
        description = f"the upstream PromptIR code: PromptIR(decoder=True) from {model_py}"
    try:
        baseline.load_state_dict(ours.state_dict(), strict=True)
    except RuntimeError as err:
        raise SystemExit(f"the baseline does not take cplfast's {preset!r} weights strictly: "
                         f"{str(err).splitlines()[0]}")
    return ours, baseline, description


def workload(model, mode: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    if mode == "inference":
        def run():
            with torch.no_grad():
                model(x)
    else:
        def run():
            model.zero_grad(set_to_none=True)
            (model(x) - y).abs().mean().backward()
    return run


# ---------------------------------------------------------------------------------------------- main
def measure(ours, baseline, cases, repeats: int, seed: int, log=print) -> list[dict]:
    import cplfast

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with cplfast.use_backend("reference"):
        for mode, batch, side in cases:
            x = torch.rand(batch, 3, side, side, generator=generator)
            y = torch.rand(batch, 3, side, side, generator=generator)
            for model in (ours, baseline):
                model.train(mode == "train_step")
            with torch.no_grad():
                diff = (ours(x) - baseline(x)).abs().max().item()
            if not diff <= OUTPUT_TOLERANCE:
                raise SystemExit(f"{mode} {batch}x3x{side}x{side}: the baseline's output differs from cplfast's by "
                                 f"{diff:.2e} (max abs) > {OUTPUT_TOLERANCE:g}: not the same network, nothing timed")
            times, orders = paired_times({"cplfast": workload(ours, mode, x, y),
                                          "baseline": workload(baseline, mode, x, y)}, repeats, rng)
            row = {"mode": mode, "shape": [batch, 3, side, side], "max_abs_diff": diff, "orders": orders}
            row.update(compare_pairs(times["cplfast"], times["baseline"]))
            rows.append(row)
            log(format_row(row))
    return rows


def _ms(stats: dict) -> str:
    return (f"{stats['median_ms']:.0f} ms [p20 {stats['p20_ms']:.0f}, p80 {stats['p80_ms']:.0f}; "
            f"min {stats['min_ms']:.0f}]")


def format_row(row: dict) -> str:
    ci = row["ratio_ci"]
    interval = "n/a" if ci is None else f"{ci[0]:.2f}-{ci[1]:.2f}"
    return (f"{row['mode']:10s} {'x'.join(map(str, row['shape']))}: cplfast {_ms(row['cplfast'])}, baseline "
            f"{_ms(row['baseline'])}; paired ratio baseline/cplfast median {row['ratio_median']:.2f}x "
            f"(95% CI {interval}): {row['verdict']} (max |diff| {row['max_abs_diff']:.1e})")


def markdown(meta: dict) -> str:
    lines = [
        "# cplfast reference path vs the official PromptIR forward, CPU", "",
        f"Baseline: {meta['baseline']}.", "",
        f"{meta['device']}, torch {meta['torch']}, {meta['date']}; {meta['repeats']} pairs per case, the order "
        f"of the two models shuffled in every pair (seed {meta['seed']}). Ratio = baseline time / cplfast time of "
        "the same pair (> 1: cplfast faster); its median and a distribution-free 95 % interval (order "
        "statistics). Side columns: median [p20–p80] (min) in ms.", "",
        "| mode | shape | cplfast ms | baseline ms | ratio median | 95 % CI | verdict | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in meta["results"]:
        c, b = r["cplfast"], r["baseline"]
        ci = "n/a" if r["ratio_ci"] is None else f"{r['ratio_ci'][0]:.2f}–{r['ratio_ci'][1]:.2f}"
        lines.append(f"| {r['mode']} | {'x'.join(map(str, r['shape']))} | {c['median_ms']:.0f} [{c['p20_ms']:.0f}–"
                     f"{c['p80_ms']:.0f}] ({c['min_ms']:.0f}) | {b['median_ms']:.0f} [{b['p20_ms']:.0f}–"
                     f"{b['p80_ms']:.0f}] ({b['min_ms']:.0f}) | {r['ratio_median']:.2f}× | {ci} | {r['verdict']} | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15, help="timed pairs per case (>= 6 for a 95%% interval)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the images and the pair orders")
    parser.add_argument("--preset", choices=("base", "tiny"), default="base",
                        help="model widths (upstream's code builds base only; tiny is for smoke tests)")
    parser.add_argument("--official-repo", type=Path, default=None, metavar="PATH",
                        help="a checkout of va1shn9v/PromptIR: time its net/model.py PromptIR instead of the "
                             "project's re-implementation")
    parser.add_argument("--quick", action="store_true", help="tiny images (a smoke test, not a measurement)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    ours, baseline, description = build_models(args.preset, args.official_repo)
    print(f"baseline: {description}")
    rows = measure(ours, baseline, QUICK_CASES if args.quick else CASES, args.repeats, args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    meta = {"device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "repeats": args.repeats,
            "seed": args.seed, "baseline": description,
            "method": "paired: per repeat both models once, order shuffled per repeat; ratio = baseline / cplfast "
                      "per pair; median ratio with a distribution-free interval (order statistics, binomial)",
            "model": f"PromptIR {args.preset} ({params:.1f} M parameters), fp32, reference backend",
            "results": rows}
    (out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "results.md").write_text(markdown(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
