"""The ``results.json`` document: schema, ratios, SPEC §8 targets, merging runs.

Required keys (issue "Benchmarks and speed")::

    {"device", "torch", "triton", "commit", "date",
     "results": [{"op", "mode", "shape", "provider", "median_ms", "p20_ms", "p80_ms", "peak_mb"}],
     "ratios":  [{"op", "mode", "shape", "speedup_vs_eager", "speedup_vs_compile"}]}

Each ``results`` row also carries the spread over the timing rounds (``min_ms``, ``max_ms``, ``rounds``)
and ``correct`` (the output matched the float64 reference: true / false / null when unchecked).
A failed provider has a ``results`` row with ``null`` timings and memory; its error string is in
``failures``. A provider whose output was wrong keeps its timings, is listed in ``failures`` (with the
comparison) and is left out of the ratios. Speedups are ``median(eager) / median(cplfast)`` and
``median(compile) / median(cplfast)``, ``null`` where either side is missing or wrong. Additional top-level keys: ``conditions`` (dtype, quick mode,
reduced shapes, backend, timers, memory method, measured bandwidth), ``cases`` (every shape with its
byte / flop floors), ``details`` (timer, samples, GB/s, % of bandwidth, TFLOP/s per row), ``failures``,
``skipped`` (workloads not run, with the reason), ``orders`` (the provider order of every timing round, with
its seed) and ``targets`` (SPEC §8's bars, met or not).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

import torch

RESULT_KEYS = ("op", "mode", "shape", "provider", "median_ms", "p20_ms", "p80_ms", "peak_mb")
SPREAD_KEYS = ("min_ms", "max_ms", "rounds", "correct")  # written by every run since the interleaved timer
RATIO_KEYS = ("op", "mode", "shape", "speedup_vs_eager", "speedup_vs_compile")
TOP_KEYS = ("device", "torch", "triton", "commit", "date", "results", "ratios")
FULL = "forward+backward"


# ---------------------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def git_commit(start: str | os.PathLike | None = None) -> str:
    """``CPLFAST_COMMIT`` if set, else ``git describe --always --dirty`` of the checkout, else ``unknown``."""
    if os.environ.get("CPLFAST_COMMIT"):
        return os.environ["CPLFAST_COMMIT"]
    where = Path(start) if start else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


# ---------------------------------------------------------------------------------------------- ratios
def _medians(results: Iterable[dict]) -> dict[tuple, dict[str, float]]:
    table: dict[tuple, dict[str, float]] = {}
    for r in results:
        group = table.setdefault((r["op"], r["mode"], r["shape"]), {})
        if r.get("median_ms") is not None and r.get("correct") is not False:
            group[r["provider"]] = r["median_ms"]
    return table


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def compute_ratios(results: Iterable[dict]) -> list[dict]:
    """One row per (op, mode, shape): speedups of ``cplfast`` over ``eager`` and ``compile``."""
    rows = []
    for (op, mode, shape), medians in _medians(results).items():
        fused = medians.get("cplfast")
        rows.append({
            "op": op, "mode": mode, "shape": shape,
            "speedup_vs_eager": _ratio(medians.get("eager"), fused),
            "speedup_vs_compile": _ratio(medians.get("compile"), fused),
        })
    return rows


# ---------------------------------------------------------------------------------------------- targets
# SPEC §8, forward+backward at the training shapes: (op, metric, comparison, bar).
SPEED_TARGETS = {
    "sparse_prompt": {"speedup_vs_eager": 3.0, "speedup_vs_compile": 1.5},
    "topm_channel_attention": {"speedup_vs_eager": 3.0, "speedup_vs_compile": 1.5},
    "prompt_token_attention": {"speedup_vs_eager": 2.0, "speedup_vs_compile": 1.2, "speedup_vs_sdpa": 1.0},
    "infonce": {"speedup_vs_eager": 4.0, "speedup_vs_compile": 1.5},
    "supcon": {"speedup_vs_eager": 2.0},
    "promptir_cpl_train_step": {"speedup_vs_eager": 1.3, "speedup_vs_compile": 1.0},
}
BANDWIDTH_TARGETS = {"sparse_prompt": 60.0}  # % of measured HBM bandwidth (cplfast, forward+backward)
MEMORY_TARGETS = {"infonce": 0.25}  # peak_mb(cplfast) / peak_mb(eager), at most
SUPCON_LARGE_N = 131072
SUPCON_SMALL_N = 16384


def _target(op, mode, shape, metric, comparison, bar, value) -> dict:
    if value is None:
        met = None
    elif comparison == ">=":
        met = value >= bar
    elif comparison == "<=":
        met = value <= bar
    else:  # "true": a yes/no condition
        met = bool(value)
    return {"op": op, "mode": mode, "shape": shape, "metric": metric, "target": f"{comparison} {bar}",
            "value": value, "met": met}


def _shape_n(shape: str) -> int | None:
    for part in shape.split():
        if part.startswith("N="):
            return int(part[2:])
    return None


def compute_targets(results: list[dict], cases: list[dict], details: list[dict]) -> list[dict]:
    """Check SPEC §8's bars on the ``train`` cases in forward+backward mode; ``met`` is None if unmeasured."""
    medians = _medians(results)
    peaks = {(r["op"], r["mode"], r["shape"], r["provider"]): r.get("peak_mb") for r in results}
    pct = {(d["op"], d["mode"], d["shape"], d["provider"]): d.get("pct_of_bandwidth") for d in details}
    targets: list[dict] = []
    for case in cases:
        op, shape = case["op"], case["shape"]
        if case.get("group") != "train" or op not in SPEED_TARGETS:
            continue
        m = medians.get((op, FULL, shape), {})
        fused = m.get("cplfast")
        if op == "supcon" and _shape_n(shape) == SUPCON_LARGE_N:
            attempted = any(r["op"] == op and r["shape"] == shape and r["mode"] == FULL and r["provider"] == "cplfast"
                            for r in results)
            targets.append(_target(op, FULL, shape, "cplfast runs (eager's N x N matrix does not fit)", "true", True,
                                   (fused is not None) if attempted else None))
            small = next((c["shape"] for c in cases if c["op"] == op and _shape_n(c["shape"]) == SUPCON_SMALL_N
                          and c.get("group") == "train"), None)
            growth = None
            if small is not None:
                big_peak, small_peak = peaks.get((op, FULL, shape, "cplfast")), peaks.get((op, FULL, small, "cplfast"))
                growth = _ratio(big_peak, small_peak)
            targets.append(_target(op, FULL, shape, "peak_mb growth 16k->131k (O(N): 8, O(N^2): 64)", "<=", 16.0,
                                   growth))
            continue
        for metric, bar in SPEED_TARGETS[op].items():
            other = metric.removeprefix("speedup_vs_")
            targets.append(_target(op, FULL, shape, metric, ">=", bar, _ratio(m.get(other), fused)))
        if op in BANDWIDTH_TARGETS:
            targets.append(_target(op, FULL, shape, "pct_of_bandwidth", ">=", BANDWIDTH_TARGETS[op],
                                   pct.get((op, FULL, shape, "cplfast"))))
        if op in MEMORY_TARGETS:
            memory_metrics = ((FULL, "peak_mb vs eager"), ("forward", "peak_mb vs eager (forward: kept for backward)"))
            for mode, metric in memory_metrics:
                ratio = _ratio(peaks.get((op, mode, shape, "cplfast")), peaks.get((op, mode, shape, "eager")))
                targets.append(_target(op, mode, shape, metric, "<=", MEMORY_TARGETS[op], ratio))
    return targets


# ---------------------------------------------------------------------------------------------- documents
def finalize(doc: dict) -> dict:
    """Recompute the derived lists (ratios, failures, targets) from results, cases and details."""
    doc["ratios"] = compute_ratios(doc["results"])
    doc["failures"] = [failure_of(d) for d in doc.get("details", []) if d.get("error") or d.get("correct") is False]
    doc["targets"] = compute_targets(doc["results"], doc.get("cases", []), doc.get("details", []))
    ordered = {key: doc[key] for key in TOP_KEYS}
    ordered.update({k: v for k, v in doc.items() if k not in ordered})
    return ordered


def failure_of(detail: dict) -> dict:
    """A ``failures`` entry: the error, or for a wrong result the comparison with the reference."""
    error = detail.get("error") or f"wrong result ({detail.get('check')})"
    return {"op": detail["op"], "mode": detail["mode"], "shape": detail["shape"], "provider": detail["provider"],
            "error": error}


def _union(items: Iterable[dict], key: tuple[str, ...]) -> list[dict]:
    table: dict[tuple, dict] = {}
    for item in items:
        table[tuple(item[k] for k in key)] = item
    return list(table.values())


def merge(documents: list[dict]) -> dict:
    """Combine runs (e.g. one per op on a GPU) into one document; later rows win on the same key."""
    if not documents:
        raise ValueError("merge needs at least one results document")
    devices = {d["device"] for d in documents}
    if len(devices) > 1:
        raise ValueError(f"cannot merge results from different devices: {sorted(devices)}")
    base = dict(documents[-1])
    row_key = ("op", "mode", "shape", "provider")
    base["results"] = _union((r for d in documents for r in d["results"]), row_key)
    base["details"] = _union((r for d in documents for r in d.get("details", [])), row_key)
    base["cases"] = _union((c for d in documents for c in d.get("cases", [])), ("op", "shape"))
    base["orders"] = _union((o for d in documents for o in d.get("orders", [])), ("op", "mode", "shape"))
    measured_ops = {r["op"] for r in base["results"]}
    base["skipped"] = _union((s for d in documents for s in d.get("skipped", []) if s["op"] not in measured_ops),
                             ("op",))
    conditions = dict(documents[0].get("conditions", {}))
    conditions["merged_from"] = [{"date": d["date"], "commit": d["commit"],
                                  "quick": d.get("conditions", {}).get("quick"),
                                  "ops": sorted({r["op"] for r in d["results"]})} for d in documents]
    conditions["quick"] = any(d.get("conditions", {}).get("quick") for d in documents)
    base["conditions"] = conditions
    base["date"] = max(d["date"] for d in documents)
    return finalize(base)


def validate(doc: dict) -> None:
    """Raise ValueError if ``doc`` does not follow the required schema."""
    for key in TOP_KEYS:
        if key not in doc:
            raise ValueError(f"results document lacks the key {key!r}")
    for row in doc["results"]:
        if set(RESULT_KEYS) - set(row):
            raise ValueError(f"results row lacks {sorted(set(RESULT_KEYS) - set(row))}: {row}")
    for row in doc["ratios"]:
        if set(RATIO_KEYS) - set(row):
            raise ValueError(f"ratios row lacks {sorted(set(RATIO_KEYS) - set(row))}: {row}")


def write_json(doc: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    validate(doc)
    return doc
