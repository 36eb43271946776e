"""Summarise a study: mean ± std over seeds, paired differences from the baseline with 95% intervals,
routing health, a verdict per paper claim, and the figures.

Statistics. Seed s of every variant sees the same data stream, so variants are compared *paired by
seed*: d_s = score(variant, s) − score(promptir, s), the mean PSNR over the held-out tasks. The 95%
interval is Student's t over the n seeds, ``mean(d) ± t_{0.975, n−1} · sd(d) / √n`` (n = 3 gives
t = 4.30: only large, consistent effects clear zero). The unit of replication is the training run,
not the image: the held-out crops are shared by all runs, so their count does not narrow the interval.

Verdict per claim (on the mean PSNR, RGB; the same rule is applied to SSIM beside it):
**reproduced** when the interval lies above 0, **not at this scale** when it lies
below 0, **inconclusive** when it contains 0. The papers' gains are printed beside it but not tested:
their data, model size and training length differ from a CPU study by orders of magnitude.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from .variants import BASELINE, DESCRIPTIONS

# The papers' all-in-one results (mean PSNR, dB) — facts quoted from the papers for comparison.
PAPER_RESULTS = {
    "three tasks": {"promptir": 32.06, "dppd": 32.59, "cpl": 32.78},
    "five tasks": {"promptir": 29.15, "dppd": 30.09, "cpl": 30.55},
}

# (claim, variant, reference variant, paper gain on five tasks in dB or None)
CLAIMS = [
    ("CPL (SPM + CPR) beats PromptIR", "cpl", "promptir", 30.55 - 29.15),
    ("DPPD beats PromptIR", "dppd", "promptir", 30.09 - 29.15),
    ("PIP beats PromptIR", "pip", "promptir", None),
    ("SPM alone beats PromptIR (CPL ablation)", "cpl-spm", "promptir", None),
    ("CPR alone beats PromptIR (CPL ablation)", "cpl-cpr", "promptir", None),
    ("adding CPR to SPM helps (CPL ablation)", "cpl", "cpl-spm", None),
]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student's t interval of the mean of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean, std = _mean_std(diffs)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    if low > 0:
        return "reproduced"
    if high < 0:
        return "not at this scale"
    return "inconclusive"


def _metric(final: dict, channel: str = "rgb", key: str = "psnr_out") -> float:
    return final[channel]["mean"][key]


def summarise(finals: Sequence[dict], *, baseline: str = BASELINE) -> dict[str, Any]:
    """The study's numbers as one JSON-friendly dict (see the module docstring)."""
    by_variant: dict[str, dict[int, dict]] = {}
    for f in finals:
        by_variant.setdefault(f["variant"], {})[f["seed"]] = f
    variants = list(by_variant)
    summary: dict[str, Any] = {"baseline": baseline, "variants": {}, "claims": []}
    for v in variants:
        runs = by_variant[v]
        seeds = sorted(runs)
        entry: dict[str, Any] = {"description": DESCRIPTIONS.get(v, v), "seeds": seeds,
                                 "parameters": runs[seeds[0]].get("parameters")}
        for channel in ("rgb", "y"):
            for key in ("psnr_out", "ssim_out", "psnr_in", "ssim_in"):
                entry[f"{key}_{channel}"] = _mean_std([_metric(runs[s], channel, key) for s in seeds])
        tasks = [r["task"] for r in runs[seeds[0]]["rgb"]["tasks"]]
        entry["tasks"] = {t: _mean_std([next(r["psnr_out"] for r in runs[s]["rgb"]["tasks"] if r["task"] == t)
                                        for s in seeds]) for t in tasks}
        entry["tasks_gain"] = {t: _mean_std([next(r["psnr_out"] - r["psnr_in"] for r in runs[s]["rgb"]["tasks"]
                                                  if r["task"] == t) for s in seeds]) for t in tasks}
        entry["train_seconds"] = _mean_std([runs[s]["train_seconds"] for s in seeds])
        keys = sorted({k for s in seeds for k in runs[s].get("routing_health", {})})
        entry["routing"] = {
            k: {"mutual_information_bits": _mean_std([runs[s]["routing_health"][k]["mutual_information_bits"]
                                                      for s in seeds if k in runs[s]["routing_health"]]),
                "max_mutual_information_bits": runs[seeds[0]]["routing_health"][k]["max_mutual_information_bits"],
                "entropy_bits": _mean_std([runs[s]["routing_health"][k]["entropy_bits"]
                                           for s in seeds if k in runs[s]["routing_health"]])}
            for k in keys
        }
        if v != baseline and baseline in by_variant:
            common = [s for s in seeds if s in by_variant[baseline]]
            for channel in ("rgb", "y"):
                diffs = [_metric(runs[s], channel) - _metric(by_variant[baseline][s], channel) for s in common]
                entry[f"vs_{baseline}_{channel}"] = dict(zip(("mean", "low", "high"), t_interval(diffs)), seeds=common)
        summary["variants"][v] = entry
    for claim, variant, reference, paper_gain in CLAIMS:
        if variant not in by_variant or reference not in by_variant:
            continue
        common = [s for s in by_variant[variant] if s in by_variant[reference]]
        diffs = [_metric(by_variant[variant][s]) - _metric(by_variant[reference][s]) for s in common]
        mean, low, high = t_interval(diffs)
        ssim = t_interval([_metric(by_variant[variant][s], key="ssim_out") - _metric(by_variant[reference][s], key="ssim_out")
                           for s in common])
        summary["claims"].append({"claim": claim, "variant": variant, "reference": reference, "seeds": common,
                                  "diff_db": mean, "low": low, "high": high, "paper_gain_db": paper_gain,
                                  "verdict": verdict(low, high),
                                  "ssim_diff": ssim[0], "ssim_low": ssim[1], "ssim_high": ssim[2],
                                  "ssim_verdict": verdict(ssim[1], ssim[2])})
    return summary


def _pm(pair: tuple[float, float], digits: int = 2) -> str:
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def _interval(entry: dict, digits: int = 2) -> str:
    return f"{entry['mean']:+.{digits}f} [{entry['low']:+.{digits}f}, {entry['high']:+.{digits}f}]"


def markdown(summary: dict, *, config: dict | None = None) -> str:
    """The study's tables (scores, per-task PSNR, routing health, claims) as markdown."""
    base = summary["baseline"]
    variants = summary["variants"]
    lines = ["# Study: " + ", ".join(variants), ""]
    if config:
        lines += [f"Settings: {config.get('steps')} steps per run, seeds {config.get('seeds')}, "
                  f"data {config.get('data') or 'embedded photographs'}, held-out "
                  f"{config.get('eval_data') or 'crops of the embedded held-out photographs'}, device {config.get('device')}, "
                  f"{config.get('threads')} thread(s) per run.", ""]
    lines += ["## Held-out scores (mean ± std over seeds; difference from "
              f"{base}: mean [95% t interval over seeds], paired by seed)", "",
              f"| variant | params | PSNR RGB | SSIM RGB | PSNR Y | SSIM Y | Δ PSNR RGB vs {base} | Δ PSNR Y vs {base} | train s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v, e in variants.items():
        d_rgb = _interval(e[f"vs_{base}_rgb"]) if f"vs_{base}_rgb" in e else "—"
        d_y = _interval(e[f"vs_{base}_y"]) if f"vs_{base}_y" in e else "—"
        lines.append(f"| {v} ({e['description']}) | {e['parameters']:,} | {_pm(e['psnr_out_rgb'])} | "
                     f"{_pm(e['ssim_out_rgb'], 4)} | {_pm(e['psnr_out_y'])} | {_pm(e['ssim_out_y'], 4)} | {d_rgb} | "
                     f"{d_y} | {_pm(e['train_seconds'], 0)} |")
    first = next(iter(variants.values()))
    lines += ["", f"Degraded input: PSNR RGB {_pm(first['psnr_in_rgb'])}, SSIM RGB {_pm(first['ssim_in_rgb'], 4)}.", ""]
    tasks = list(first["tasks"])
    lines += ["## PSNR (RGB, dB) per task, mean ± std over seeds", "",
              "| variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for v, e in variants.items():
        lines.append(f"| {v} | " + " | ".join(_pm(e["tasks"][t]) for t in tasks) + " |")
    lines += ["", "## Routing health on the held-out set (mean ± std over seeds)", "",
              "I(task; prompt) in bits: 0 = collapsed (every degradation picks the same prompt), the maximum = "
              "each degradation its own prompt.", "",
              "| variant | router | I(task; prompt) | max | H(prompt) |", "|---|---|---|---|---|"]
    for v, e in variants.items():
        for k, r in e["routing"].items():
            lines.append(f"| {v} | {k} | {_pm(r['mutual_information_bits'])} | {r['max_mutual_information_bits']:.2f} | "
                         f"{_pm(r['entropy_bits'])} |")
    lines += ["", "## Paper claims", "",
              "Verdict: reproduced = the 95% interval of the paired difference lies above 0; not at this scale = "
              "below 0; inconclusive = it contains 0. Paper gains (five-task setting) are for reference only.", "",
              "| claim | measured Δ PSNR RGB (dB) [95% CI] | paper gain (dB) | verdict (PSNR) | Δ SSIM RGB [95% CI] | SSIM |",
              "|---|---|---|---|---|---|"]
    for c in summary["claims"]:
        gain = f"{c['paper_gain_db']:+.2f}" if c["paper_gain_db"] is not None else "—"
        lines.append(f"| {c['claim']} | {c['diff_db']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | {gain} | "
                     f"**{c['verdict']}** | {c['ssim_diff']:+.4f} [{c['ssim_low']:+.4f}, {c['ssim_high']:+.4f}] | "
                     f"{c['ssim_verdict']} |")
    return "\n".join(lines) + "\n"


def write_report(out: str | os.PathLike, finals: Sequence[dict], *, config: dict | None = None) -> list[Path]:
    """``results.json``, ``results.md``, ``curves.png``, ``tasks.png`` and ``routing_<variant>.png``."""
    import torch

    from ..checkpoint import atomic_write_bytes, atomic_write_json
    from ..figures import routing_heatmap
    from .plots import curves_png, grouped_bars_png

    out = Path(out)
    summary = summarise(finals)
    written = [out / "results.json", out / "results.md"]
    atomic_write_json(written[0], {"config": config, "summary": summary, "runs": list(finals)}, sort_keys=False)
    atomic_write_bytes(written[1], markdown(summary, config=config).encode("utf-8"))

    by_variant: dict[str, list[dict]] = {}
    for f in finals:
        by_variant.setdefault(f["variant"], []).append(f)
    curves = {}
    for v, runs in by_variant.items():
        steps = sorted({p["step"] for r in runs for p in r["curve"]})
        series = []
        for step in steps:
            values = [p["psnr"] for r in runs for p in r["curve"] if p["step"] == step]
            mean, std = _mean_std(values)
            series.append((step, mean, 0.0 if math.isnan(std) else std))
        curves[v] = series
    written.append(curves_png(curves, out / "curves.png"))
    tasks = list(next(iter(summary["variants"].values()))["tasks_gain"])
    bars = {t: {v: tuple(0.0 if math.isnan(x) else x for x in e["tasks_gain"][t]) for v, e in summary["variants"].items()}
            for t in tasks}
    written.append(grouped_bars_png(bars, out / "tasks.png", ylabel="PSNR gain (dB)",
                                    title="held-out PSNR gain over the degraded input per task (mean ± std over seeds)"))
    for v, runs in by_variant.items():
        if not runs[0].get("selection") or not any(runs[0]["selection"].values()):
            continue
        shares = {t: {k: torch.tensor([sum(r["selection"][t][k][i] for r in runs) / len(runs)
                                        for i in range(len(vec))]) for k, vec in keys.items()}
                  for t, keys in runs[0]["selection"].items()}
        written.append(routing_heatmap(shares, out / f"routing_{v}.png",
                                       title=f"{v}: share of held-out images of each degradation (rows) choosing each "
                                             f"prompt (columns), mean over {len(runs)} seeds"))
    return written


__all__ = ["CLAIMS", "PAPER_RESULTS", "markdown", "summarise", "t_interval", "verdict", "write_report"]
