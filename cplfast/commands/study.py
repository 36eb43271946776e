"""``cplfast study``: train PromptIR, CPL (SPM only, CPR only, both), PIP and DPPD on the same data,
steps and seeds; score them on the same held-out set; write tables, intervals, verdicts and figures.

Rerunning the same command resumes: finished runs are kept, unfinished ones continue from their last
evaluation point. ``--report-only`` rewrites the report from the runs that have finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import positive_int, writable_folder


def _seeds(text: str) -> tuple[int, ...]:
    try:
        if "," in text:
            return tuple(int(s) for s in text.split(","))
        return tuple(range(positive_int(text)))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,1,2), got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..study import VARIANTS

    parser.add_argument("--out", default="study_out", help="study folder (default: study_out); rerun to resume")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated variants (default: all: {','.join(VARIANTS)})")
    parser.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="seed count or list (default: 3 → 0,1,2)")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps per run (default: 1000)")
    parser.add_argument("--eval-every", type=positive_int, default=200,
                        help="steps between validation points of the curves (default: 200)")
    parser.add_argument("--data", default=None,
                        help="training folder (a PromptIR/AirNet tree, input/+target/ pairs or clean images; default: "
                             "the embedded photographs)")
    parser.add_argument("--eval-data", default=None,
                        help="held-out folder scored by every run (default: crops of the embedded held-out photographs)")
    parser.add_argument("--preset", choices=("tiny", "small", "base"), default=None, help="model size (default: tiny)")
    parser.add_argument("--patch", type=positive_int, default=None, help="training patch side (default: 32)")
    parser.add_argument("--batch", type=positive_int, default=None, help="batch per step (default: 8)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs trained at once, one process each (default: 1)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per run (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..study import StudyConfig, run_dir, run_study, write_report

    out = writable_folder(args.out, "--out")
    overrides = {k: v for k, v in (("preset", args.preset), ("patch", args.patch), ("batch", args.batch),
                                   ("lr", args.lr)) if v is not None}
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    config = StudyConfig(variants=variants, seeds=args.seeds, steps=args.steps, eval_every=args.eval_every,
                         data=args.data, eval_data=args.eval_data, device=args.device, threads=args.threads,
                         overrides=overrides)
    if args.report_only:
        stored = out / "study.json"
        if stored.exists():
            config = StudyConfig.from_json(json.loads(stored.read_text()))
        finals = [json.loads((run_dir(out, v, s) / "final.json").read_text())
                  for s in config.seeds for v in config.variants if (run_dir(out, v, s) / "final.json").exists()]
        if not finals:
            raise ValueError(f"{out} holds no finished runs")
    else:
        runs = len(config.variants) * len(config.seeds)
        print(f"cplfast study: {runs} runs ({', '.join(config.variants)} x seeds {list(config.seeds)}), "
              f"{config.steps} steps each, {args.jobs} at a time -> {out}", flush=True)
        finals = run_study(config, out, jobs=args.jobs, progress=not args.quiet)
    written = write_report(out, finals, config=config.to_json())
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(Path(p)) for p in written))
    return 0
