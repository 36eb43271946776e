"""Run a benchmark suite and build its results document (see :mod:`cplfast.bench.results`)."""

from __future__ import annotations

import platform
import time
from typing import Callable

import torch

from .cases import Case
from .e2e import E2E_OPS, e2e_cases, e2e_traffic, run_e2e
from .ops import OP_BENCHMARKS
from .results import RESULT_KEYS, SPREAD_KEYS, environment, finalize
from .runner import TOLERANCES, BenchConfig, Measurement, cplfast_impl, floor_ms, run_ops, select_cases
from .timing import device_bandwidth_gbps

ALL_OPS = tuple(OP_BENCHMARKS) + E2E_OPS
GROUPS = {"ops": tuple(OP_BENCHMARKS), "e2e": E2E_OPS, "all": ALL_OPS}


def resolve_ops(names: list[str] | None) -> list[str]:
    """Expand group names (``ops``, ``e2e``, ``all``) and check every name; keeps the order given."""
    if not names:
        return list(ALL_OPS)
    out: list[str] = []
    for name in names:
        expanded = GROUPS.get(name, (name,))
        for op in expanded:
            if op not in ALL_OPS:
                raise ValueError(f"unknown op {op!r}; choose from {', '.join(ALL_OPS)} or a group {', '.join(GROUPS)}")
            if op not in out:
                out.append(op)
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def case_info(case: Case, traffic: dict, bandwidth: float | None, sweep_label: str) -> dict:
    return {
        "op": case.op, "shape": case.shape, "name": case.name, "group": case.group,
        "sweep_value": case.sweep_value, "sweep_label": sweep_label, "modes": list(case.modes),
        "bytes": {m: traffic[m].bytes for m in case.modes},
        "flops": {m: traffic[m].flops for m in case.modes},
        "floor_ms": {m: floor_ms(traffic[m].bytes, bandwidth) for m in case.modes},
    }


def detail(row: Measurement, traffic, memory_bound: bool, bandwidth: float | None) -> dict:
    gbps = pct = tflops = None
    if row.median_ms and traffic is not None and row.mode in traffic:
        seconds = row.median_ms * 1e-3
        if memory_bound:
            gbps = traffic[row.mode].bytes / seconds / 1e9
            pct = 100 * gbps / bandwidth if bandwidth else None
        if traffic[row.mode].flops:
            tflops = traffic[row.mode].flops / seconds / 1e12
    return {"op": row.op, "mode": row.mode, "shape": row.shape, "provider": row.provider, "timer": row.timer,
            "samples": row.samples, "rounds": row.rounds, "order_seed": row.order_seed, "gb_per_s": gbps,
            "pct_of_bandwidth": pct, "tflop_per_s": tflops, "correct": row.correct, "check": row.check,
            "max_rel_err": row.max_err, "tolerance": row.tolerance, "error": row.error}


def conditions(config: BenchConfig, ops: list[str], bandwidth: float | None, bandwidth_method: str) -> dict:
    reduced = config.quick and config.device.type == "cpu"
    gpu = config.device.type == "cuda"
    min_rounds, max_rounds, _ = config.round_limits(1)
    rounds = (f"{min_rounds} rounds per case and mode; in each round every provider is timed once, in an order "
              f"shuffled afresh (random.Random seeded with 'seed:op:shape:mode', seed {config.seed}; the orders "
              "are in orders[]); median, p20/p80, min and max over rounds")
    timer = (f"{rounds}. One round of a provider: triton.testing.do_bench median (L2 flushed; "
             f"{max(5, 2 * config.rep_ms // max(1, min_rounds))} ms window, 25 ms warm-up on the first round, "
             f"5 ms after), or for launch-bound cases (cudagraph={config.cudagraph}: memory-bound cases whose HBM "
             f"floor is below {config.launch_bound_ms} ms in every mode) 2 replays of a CUDA graph of n calls, "
             "mean per call — see details[].timer" if gpu else
             f"{rounds.replace(f'{min_rounds} rounds', f'at least {min_rounds} and at most {max_rounds} rounds')}, "
             f"going on until every provider had {config.cpu_budget_s} s. One round of a provider: "
             f"time.perf_counter around back-to-back calls (about {config.cpu_sample_ms} ms, after 2 warm-up "
             "calls), mean per call")
    memory = ("torch.cuda.max_memory_allocated during one call minus memory_allocated before it (inputs and, "
              "for backward, the saved forward excluded)" if gpu else
              "peak of live tensor bytes during one call from the PyTorch profiler's memory events (inputs "
              "excluded; allocations freed inside one aten op not seen)")
    return {
        "dtype": str(config.dtype).removeprefix("torch."),
        "quick": config.quick,
        "reduced_shapes": reduced,
        "shapes_note": ("CPU --quick: REDUCED shapes, not SPEC §8's (see cases[].name); timings only show that "
                        "every provider runs" if reduced else
                        "SPEC §8 shapes: PromptIR B=8 128x128 training patches, 512x512 inference (B=1)"),
        "cplfast_backend": config.backend,
        "cplfast_impl": {op: cplfast_impl(op, config.backend, config.device, config.dtype)
                         for op in ops if op in OP_BENCHMARKS},
        "providers": {
            "cplfast": f"cplfast.functional.<op> under backend {config.backend!r}",
            "eager": "cplfast.reference.<op> (plain PyTorch)",
            "compile": f"torch.compile(cplfast.reference.<op>, backend={config.compile_backend!r}, "
                       f"mode={config.compile_mode!r}, dynamic=False), dynamo reset per case",
            "sdpa": "torch.nn.functional.scaled_dot_product_attention (prompt_token_attention only)",
        },
        "modes": {
            "forward": "forward; inputs needing gradients keep the graph (infer cases: torch.no_grad)",
            "backward": "torch.autograd.grad of the forward's output (forward untimed, retain_graph)",
            "forward+backward": "forward then torch.autograd.grad (e2e train step: + AdamW step)",
        },
        "timer": timer,
        "peak_mb": memory,
        "seed": config.seed,
        "correctness": ("each provider's output (and, for cases timed in a backward mode, its gradients for a "
                        "fixed random output gradient) compared once per case with cplfast.reference.<op> run in "
                        "float64 on the same inputs: max|got-want|/max|want| <= tolerance "
                        f"(float32 {TOLERANCES[torch.float32]:g}, float16 {TOLERANCES[torch.float16]:g}, bfloat16 "
                        f"{TOLERANCES[torch.bfloat16]:g}); e2e inference: the restored image against the reference "
                        "backend in float32. A mismatch marks the rows correct=false (listed in failures, left "
                        "out of ratios)" if config.check else "not checked (--no-check)"),
        "bandwidth_gbps": bandwidth,
        "bandwidth_method": bandwidth_method,
        "cudagraph": config.cudagraph if gpu else "n/a",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def run_suite(config: BenchConfig, ops: list[str], on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run ``ops`` (fused op names and/or e2e workloads) and return the finalised results document.

    ``on_progress(doc)`` gets the document so far after every op, so an interrupted run keeps its results.
    """
    ops = resolve_ops(ops)
    started = time.perf_counter()
    env = environment(config.device)
    megabytes = 256 if config.quick else 1024
    if config.device.type == "cpu":
        megabytes = 64 if config.quick else 256
    bandwidth = device_bandwidth_gbps(config.device, megabytes=megabytes, budget_s=0.3 if config.quick else 1.0)
    method = (f"{'device-to-device' if config.device.type == 'cuda' else 'host'} copy of {megabytes} MiB, "
              "(read + write) / median time")
    config.bandwidth_gbps = bandwidth
    config.log(f"measured copy bandwidth: {bandwidth:.1f} GB/s")

    itemsize = _itemsize(config.dtype)
    rows: list[Measurement] = []
    cases: list[dict] = []
    details: list[dict] = []
    skipped: list[dict] = []
    orders: list[dict] = []
    done: set = set()

    def document() -> dict:
        doc = dict(env)
        doc["results"] = [{key: getattr(row, key) for key in RESULT_KEYS + SPREAD_KEYS} for row in rows]
        doc["conditions"] = conditions(config, ops, bandwidth, method)
        doc["conditions"]["wall_s"] = round(time.perf_counter() - started, 1)
        doc["cases"] = list(cases)
        doc["details"] = list(details)
        doc["skipped"] = list(skipped)
        doc["orders"] = list(orders)
        return finalize(doc)

    for name in ops:
        if name in OP_BENCHMARKS:
            op = OP_BENCHMARKS[name]
            op_rows = run_ops([op], config, done, orders)
            traffic_of = _add_op_cases(op, config, itemsize, bandwidth, cases)
            details.extend(detail(row, traffic_of.get(row.shape), op.memory_bound, bandwidth) for row in op_rows)
        else:
            op_rows, op_skipped = run_e2e(config, [name], done, orders)
            skipped.extend(op_skipped)
            for case in e2e_cases(config.quick, config.device.type):
                if case.op == name:
                    cases.append(case_info(case, e2e_traffic(case, 4), None, ""))
            details.extend(detail(row, None, False, bandwidth) for row in op_rows)
        rows.extend(op_rows)
        if on_progress is not None:
            on_progress(document())
    return document()


def _add_op_cases(op, config: BenchConfig, itemsize: int, bandwidth: float | None, cases: list[dict]) -> dict:
    """Append the op's case entries (a sweep point equal to a SPEC case shares its entry); shape -> traffic."""
    by_shape: dict[str, dict] = {}
    traffic_of: dict[str, dict] = {}
    for case in select_cases(op, config):
        if case.shape in by_shape:
            if by_shape[case.shape]["sweep_value"] is None:
                by_shape[case.shape]["sweep_value"] = case.sweep_value
            continue
        traffic_of[case.shape] = op.traffic(case, itemsize)
        by_shape[case.shape] = case_info(case, traffic_of[case.shape], bandwidth, op.sweep_label)
        cases.append(by_shape[case.shape])
    return traffic_of
