"""``cplfast bench``: time the fused ops and end-to-end runs against eager PyTorch and torch.compile.

Writes ``OUT/results.json`` (schema in :mod:`cplfast.bench.results`), ``OUT/results.md`` and one
``OUT/<op>.png`` per op. ``--merge DIR ...`` combines earlier runs instead of measuring; ``--list``
prints the cases with their byte / flop floors and measures nothing; ``--audit`` runs the kernels' compile
audit (``python -m cplfast.kernels.audit --quick``, or every case with ``--full``) and measures nothing.

Providers are timed interleaved: rounds in which each is timed once, in a freshly shuffled (seeded) order;
each provider's output is checked against the float64 reference once per case (``--no-check`` skips it).
"""

from __future__ import annotations

import sys
from pathlib import Path

MODES = ("forward", "backward", "forward+backward")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, help="output folder (created); required unless --list")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and shorter timings; on the CPU, reduced shapes (flagged in the JSON)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help="fused ops and/or e2e workloads, or the groups 'ops', 'e2e', 'all' (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE",
                        help=f"subset of {', '.join(MODES)}")
    parser.add_argument("--providers", nargs="+", choices=("cplfast", "eager", "compile"),
                        default=["cplfast", "eager", "compile"], metavar="PROVIDER",
                        help="subset of cplfast, eager, compile")
    parser.add_argument("--no-extras", action="store_true", help="skip op-specific extra providers (sdpa)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="input dtype (default float32)")
    parser.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                        help="backend of the cplfast provider (triton on CPU needs TRITON_INTERPRET=1)")
    parser.add_argument("--cudagraph", choices=("auto", "on", "off"), default="auto",
                        help="time with CUDA-graph replay: auto = launch-bound cases only")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the compile provider (default: torch's default)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for the compile provider (default inductor)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the size sweeps")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    parser.add_argument("--rep-ms", type=int, default=None, help="GPU timing window per measurement (ms)")
    parser.add_argument("--cpu-budget", type=float, default=None, help="CPU timing budget per measurement (s)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="PATH",
                        help="merge these results.json files (or folders holding one) into --out; measure nothing")
    parser.add_argument("--list", action="store_true", help="print the cases and their byte/flop floors, then exit")
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[3350.0, 4800.0], metavar="GBPS",
                        help="HBM bandwidths for --list floors (default: H100 SXM and H200 datasheet values)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 with --quick on the CPU, where a shared "
                             "machine would stall multi-threaded kernels)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timing rounds per case and mode (GPU: exactly, CPU: at least; default 5 with "
                             "--quick, else 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round provider orders (default 0)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not compare the providers' outputs with the float64 reference")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--audit", action="store_true",
                        help="run the kernels' compile audit (cplfast.kernels.audit, --quick subset) and exit")
    parser.add_argument("--full", action="store_true", help="with --audit: every audit case, not the quick subset")
    parser.add_argument("--arch", nargs="+", metavar="ARCH", help="with --audit: target architectures (sm_90 sm_80)")


def _log(quiet: bool):
    if quiet:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _device(args):
    import torch

    from ..cli import CommandError

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(name)


def _merge(args) -> int:
    from ..bench import merge, read_json, write_outputs
    from ..cli import CommandError

    documents = []
    for path in args.merge:
        file = path / "results.json" if path.is_dir() else path
        if not file.is_file():
            raise CommandError(f"--merge: {file} does not exist")
        documents.append(read_json(file))
    doc = merge(documents)
    written = write_outputs(doc, args.out, plots=not args.no_plots)
    _print_summary(doc)
    for path in written:
        print(path)
    return 0


def _list(args) -> int:
    import torch

    from ..bench.e2e import e2e_cases
    from ..bench.ops import OP_BENCHMARKS
    from ..bench.suite import resolve_ops

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    floors = " | ".join(f"floor µs @ {bw:g} GB/s" for bw in args.bandwidth)
    print(f"| op | case | shape | mode | MB moved | GFLOP | {floors} |")
    print("|---|---|---|---|---|---|" + "---|" * len(args.bandwidth))
    for name in resolve_ops(args.ops):
        op = OP_BENCHMARKS.get(name)
        if op is None:
            for case in e2e_cases(args.quick, device_type):
                if case.op == name:
                    print(f"| {name} | {case.name} | `{case.shape}` | {', '.join(case.modes)} | | |"
                          + " |" * len(args.bandwidth))
            continue
        for case in op.cases(args.quick, device_type):
            if args.no_sweep and case.group == "sweep":
                continue
            traffic = op.traffic(case, itemsize)
            for mode in case.modes:
                t = traffic[mode]
                cells = " | ".join(f"{t.bytes / (bw * 1e9) * 1e6:.1f}" for bw in args.bandwidth)
                print(f"| {name} | {case.name} ({case.group}) | `{case.shape}` | {mode} | {t.bytes / 1e6:.2f} | "
                      f"{t.flops / 1e9:.3f} | {cells} |")
    return 0


def _audit(args) -> int:
    """The compile audit of every kernel launch (needs Triton and ptxas; no GPU)."""
    from ..cli import CommandError

    try:
        from ..kernels import audit
    except ImportError as err:
        raise CommandError(f"--audit: cplfast.kernels.audit cannot be imported ({err})") from err
    argv = [] if args.full else ["--quick"]
    if args.arch:
        argv += ["--arch", *args.arch]
    return audit.main(argv)


def run(args) -> int:
    from ..cli import CommandError

    if args.full and not args.audit:
        raise CommandError("--full only applies to --audit")
    if args.arch and not args.audit:
        raise CommandError("--arch only applies to --audit")
    if args.audit:
        return _audit(args)
    if args.list:
        return _list(args)
    if args.out is None:
        raise CommandError("--out DIR is required (or use --list)")
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} exists and is not a folder")
    if args.merge:
        return _merge(args)

    import torch

    from ..bench import resolve_ops

    device = _device(args)
    ops = resolve_ops(args.ops)
    quick = args.quick
    if args.rep_ms is not None and args.rep_ms < 1:
        raise CommandError(f"--rep-ms must be >= 1, got {args.rep_ms}")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads must be >= 1, got {args.threads}")
    if args.rounds is not None and args.rounds < 1:
        raise CommandError(f"--rounds must be >= 1, got {args.rounds}")
    threads = args.threads if args.threads is not None else (1 if quick and device.type == "cpu" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(args, device, ops, quick)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(args, device, ops: list[str], quick: bool) -> int:
    import torch

    from ..bench import BenchConfig, run_suite, write_outputs

    config = BenchConfig(
        device=device,
        dtype=getattr(torch, args.dtype),
        quick=quick,
        providers=tuple(args.providers),
        modes=tuple(args.modes),
        backend=args.backend,
        cudagraph=args.cudagraph,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        sweep=not args.no_sweep,
        extras=not args.no_extras,
        rep_ms=args.rep_ms or (30 if quick else 100),
        cpu_budget_s=args.cpu_budget if args.cpu_budget is not None else (0.1 if quick else 1.0),
        rounds=args.rounds,
        seed=args.seed,
        check=not args.no_check,
        log=_log(args.quiet),
    )

    def checkpoint(partial: dict) -> None:  # keep what is measured if the run is interrupted
        write_outputs(partial, args.out, plots=False)

    doc = run_suite(config, ops, on_progress=checkpoint)
    written = write_outputs(doc, args.out, plots=not args.no_plots)
    _print_summary(doc)
    for path in written:
        print(path)
    if any(r.get("correct") is False for r in doc["results"]):
        print("error: some providers returned WRONG results (see failures in results.md)", file=sys.stderr)
        return 1
    return 0 if doc["results"] or doc.get("skipped") else 1


def _print_summary(doc: dict) -> None:
    print(f'{doc["device"]} | torch {doc["torch"]} | triton {doc["triton"]} | {doc["commit"]}')
    ok = sum(r["median_ms"] is not None for r in doc["results"])
    wrong = sum(r.get("correct") is False for r in doc["results"])
    failures = doc.get("failures", [])
    not_run = [f for f in failures if str(f.get("error", "")).startswith(("skipped", "not applicable"))]
    print(f'{ok}/{len(doc["results"])} measurements, {len(failures) - len(not_run)} failed '
          f'({wrong} with a WRONG result), {len(not_run)} skipped or not applicable, '
          f'{len(doc.get("skipped", []))} workloads skipped')
    for r in doc["ratios"]:
        e, c = r["speedup_vs_eager"], r["speedup_vs_compile"]
        print(f'  {r["op"]:<24} {r["mode"]:<17} {r["shape"]:<44} '
              f'x eager {"-" if e is None else f"{e:.2f}":>6}  x compile {"-" if c is None else f"{c:.2f}":>6}')
    targets = doc.get("targets", [])
    on_cpu = str(doc.get("device", "")).lower().startswith("cpu")
    if targets and (on_cpu or doc.get("conditions", {}).get("reduced_shapes")):
        # SPEC §8's targets are GPU ratios at full shapes: a CPU or reduced-shape run neither meets nor misses them
        print(f"SPEC §8 targets: not applicable ({len(targets)} GPU targets; this run is on "
              f"{'the CPU' if on_cpu else 'reduced shapes'})")
    elif targets:
        met = sum(t["met"] is True for t in targets)
        missed = sum(t["met"] is False for t in targets)
        print(f"SPEC §8 targets: {met} met, {missed} missed, {len(targets) - met - missed} unmeasured")
        for t in targets:
            value = t["value"]
            shown = "-" if value is None else (str(value) if isinstance(value, bool) else f"{value:.2f}")
            verdict = {True: "met", False: "MISSED", None: "unmeasured"}[t["met"]]
            print(f'  {t["op"]:<24} {t["shape"]:<44} {t["metric"]:<22} {t["target"]:>8} {shown:>8}  {verdict}')
    for f in failures:
        label = "skipped" if f in not_run else "failed"
        print(f'  {label}: {f["op"]} {f["mode"]} {f["shape"]} {f["provider"]}: {f["error"][:160]}')
