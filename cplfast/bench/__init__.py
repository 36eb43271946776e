"""Benchmark harness behind ``cplfast bench`` (SPEC §8): fused ops and end-to-end runs against eager
PyTorch and ``torch.compile``.

* :mod:`.shapes` — the PromptIR shapes (SPEC §8); :mod:`.cases` — what a benchmark case is;
  :mod:`.ops` — one definition per fused op (cases, inputs, byte/flop floors); :mod:`.e2e` — the
  PromptIR+CPL training step and inference.
* :mod:`.timing` / :mod:`.memory` — timers (``triton.testing.do_bench``, CUDA graphs, a CPU repeat
  timer) and peak-memory probes; :mod:`.runner` — runs providers x modes and records failures.
* :mod:`.suite` — runs a selection and builds the document; :mod:`.results` — its schema, ratios,
  targets and merging; :mod:`.report` / :mod:`.plot` — ``results.md`` and one PNG per op.

``write_outputs(doc, out_dir)`` writes ``results.json``, ``results.md`` and the plots.
"""

from __future__ import annotations

from pathlib import Path

from .results import compute_ratios, merge, read_json, validate, write_json
from .runner import BenchConfig
from .suite import ALL_OPS, resolve_ops, run_suite


def write_outputs(doc: dict, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (``plots``) ``<op>.png`` under ``out_dir``."""
    from .plot import plot_document
    from .report import render

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate(doc)
    write_json(doc, out / "results.json")
    (out / "results.md").write_text(render(doc))
    written = [out / "results.json", out / "results.md"]
    if plots:
        written += plot_document(doc, out)
    return written


__all__ = [
    "ALL_OPS", "BenchConfig", "compute_ratios", "merge", "read_json", "resolve_ops", "run_suite", "validate",
    "write_json", "write_outputs",
]
