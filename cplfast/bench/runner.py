"""Run op benchmarks: every case x provider x mode, timed and memory-measured, failures recorded.

Providers:

* ``cplfast``: the public functional op (:mod:`cplfast.functional`) under the chosen backend (``auto``
  by default: the Triton kernel on CUDA tensors, the reference on the CPU).
* ``eager``: the PyTorch reference (:mod:`cplfast.reference`).
* ``compile``: ``torch.compile`` of the reference, compiled afresh for every case (dynamo caches are
  reset so no case runs on a graph specialised for another).
* op-specific extras, e.g. ``sdpa`` for ``prompt_token_attention``.

Modes: ``forward`` (inputs that need gradients keep the autograd graph, as in training; ``infer`` cases
run under ``torch.no_grad``), ``backward`` (the forward runs untimed, then
``torch.autograd.grad(..., retain_graph=True)`` is timed) and ``forward+backward``.

A provider that fails (out of memory, compile error, missing kernel) gets a row with ``null`` timings
and the error string; the run goes on.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .cases import BACKWARD, FORWARD, FULL, Case, OpBenchmark, OpInputs
from .memory import peak_mb
from .timing import Timing, cpu_repeat, gpu_cuda_graph, gpu_do_bench

STANDARD_PROVIDERS = ("cplfast", "eager", "compile")


@dataclass
class BenchConfig:
    device: torch.device
    dtype: torch.dtype = torch.float32
    quick: bool = False
    providers: tuple[str, ...] = STANDARD_PROVIDERS
    modes: tuple[str, ...] = (FORWARD, BACKWARD, FULL)
    backend: str = "auto"  # backend of the cplfast provider
    cudagraph: str = "auto"  # "auto" (launch-bound cases only) | "on" | "off"
    launch_bound_ms: float = 0.05  # "auto": graph a mode whose HBM floor is below this
    bandwidth_gbps: float | None = None
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    sweep: bool = True
    extras: bool = True  # op-specific extra providers (sdpa)
    rep_ms: int = 100
    cpu_budget_s: float = 1.0
    log: Callable[[str], None] = field(default=lambda message: None)


@dataclass
class Measurement:
    op: str
    mode: str
    shape: str
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mb: float | None = None
    timer: str | None = None
    samples: int | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.op, self.mode, self.shape, self.provider)


def describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(err).__name__}: {first}"[:400]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def cplfast_impl(op_name: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation the cplfast provider runs on this device: ``triton`` or ``reference``."""
    from .._backend import resolve, use_backend

    probe = torch.empty(1, device=device, dtype=dtype)
    try:
        with use_backend(backend):
            chosen = resolve(op_name, probe)
    except (RuntimeError, TypeError) as err:
        return f"error ({describe_error(err)})"
    return chosen


def provider_functions(op: OpBenchmark, config: BenchConfig) -> dict[str, Callable[[], Callable]]:
    """Provider name -> factory of the callable to benchmark (factories run once per case)."""
    from .._backend import use_backend

    fused, eager = op.fused(), op.eager()

    def make_cplfast():
        def call(*args, **kwargs):
            with use_backend(config.backend):
                return fused(*args, **kwargs)

        return call

    def make_compiled():
        torch._dynamo.reset()
        return torch.compile(eager, backend=config.compile_backend, mode=config.compile_mode, dynamic=False)

    factories = {"cplfast": make_cplfast, "eager": lambda: eager, "compile": make_compiled}
    chosen = {name: factories[name] for name in config.providers if name in factories}
    if config.extras:
        for name, fn in op.extra_providers().items():
            chosen[name] = (lambda f=fn: f)
    return chosen


def _grad_output(out: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)


def prepare_mode(op: OpBenchmark, fn: Callable, inputs: OpInputs, mode: str, case: Case) -> Callable[[], Callable]:
    """``prepare()`` does the untimed setup for ``mode`` and returns the closure to time."""
    args, kwargs, leaves = inputs.args, inputs.kwargs, tuple(inputs.leaves)

    def call():
        return op.output(fn(*args, **kwargs))

    if mode == FORWARD:
        if case.needs_grad:
            return lambda: call

        def inference():
            with torch.no_grad():
                return call()

        return lambda: inference

    if not leaves:
        raise ValueError(f"{mode} needs inputs that require gradients; case {case.shape} has none")

    if mode == BACKWARD:
        def prepare_backward():
            out = call()
            grad = _grad_output(out)
            return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True, allow_unused=True)

        return prepare_backward

    def prepare_full():
        grad = _grad_output(call().detach())  # with grad on, as timed: no extra compile for no_grad

        def full():
            return torch.autograd.grad(call(), leaves, grad, allow_unused=True)

        return full

    return prepare_full


def floor_ms(bytes_moved: int, bandwidth_gbps: float | None) -> float | None:
    if not bandwidth_gbps:
        return None
    return bytes_moved / (bandwidth_gbps * 1e9) * 1e3


def time_prepared(prepare: Callable[[], Callable], config: BenchConfig, use_graph: bool) -> Timing:
    if config.device.type != "cuda":
        return cpu_repeat(prepare, budget_s=config.cpu_budget_s, min_reps=3 if config.quick else 5)
    if use_graph:
        try:
            return gpu_cuda_graph(prepare, rep_ms=config.rep_ms)
        except Exception as err:  # noqa: BLE001 - capture is an optimisation: fall back to do_bench
            free_memory(config.device)
            timing = gpu_do_bench(prepare, rep_ms=config.rep_ms)
            return Timing(timing.median_ms, timing.p20_ms, timing.p80_ms,
                          f"do_bench (graph capture failed: {describe_error(err)[:120]})", timing.samples)
    return gpu_do_bench(prepare, rep_ms=config.rep_ms)


def wants_graph(op: OpBenchmark, case: Case, config: BenchConfig) -> bool:
    """CUDA-graph timing for a whole case (all its modes alike) when it is launch-bound.

    ``auto``: a memory-bound op whose largest mode moves so few bytes that its HBM floor is below
    ``launch_bound_ms`` (compute-bound ops are never launch-bound at the SPEC shapes).
    """
    if config.device.type != "cuda" or config.cudagraph == "off":
        return False
    if config.cudagraph == "on":
        return True
    if not op.memory_bound:
        return False
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    traffic = op.traffic(case, itemsize)
    floor = floor_ms(max(traffic[m].bytes for m in case.modes), config.bandwidth_gbps)
    return floor is not None and floor < config.launch_bound_ms


def memory_guard(op: OpBenchmark, case: Case, config: BenchConfig) -> str | None:
    """On the CPU, refuse cases whose eager reference would exhaust host memory (no clean OOM there)."""
    if config.device.type != "cpu":
        return None
    need = op.eager_bytes(case, torch.empty((), dtype=config.dtype).element_size())
    available = _available_host_bytes()
    if available is not None and need > available // 2:
        return f"skipped: the eager reference needs ~{need / 2**30:.1f} GiB, host has {available / 2**30:.1f} GiB free"
    return None


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_case(op: OpBenchmark, case: Case, config: BenchConfig, done: set) -> list[Measurement]:
    """All providers and modes of one case; keys already in ``done`` are not measured again."""
    modes = [m for m in case.modes if m in config.modes]
    rows: list[Measurement] = []
    skip = memory_guard(op, case, config)
    providers = {name: f for name, f in provider_functions(op, config).items() if name not in case.skip_providers}
    todo = [(p, m) for p in providers for m in modes if (op.name, m, case.shape, p) not in done]
    if not todo:
        return rows
    if skip:
        for provider, mode in todo:
            rows.append(Measurement(op.name, mode, case.shape, provider, error=skip))
        config.log(f"  {case.shape}: {skip}")
        return rows
    inputs = op.inputs(case, config.device, config.dtype)
    use_graph = wants_graph(op, case, config)
    for provider, factory in providers.items():
        failed: str | None = None
        try:
            fn = factory()
        except Exception as err:  # noqa: BLE001
            fn, failed = None, describe_error(err)
        for mode in modes:
            if (op.name, mode, case.shape, provider) in done:
                continue
            row = Measurement(op.name, mode, case.shape, provider)
            if failed is not None:
                row.error = failed
            else:
                try:
                    prepare = prepare_mode(op, fn, inputs, mode, case)
                    timing = time_prepared(prepare, config, use_graph)
                    row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
                    row.timer, row.samples = timing.timer, timing.samples
                    row.peak_mb = peak_mb(prepare, config.device)
                except Exception as err:  # noqa: BLE001 - every failure is a result, never a crash
                    row.error = describe_error(err)
                    if mode == FORWARD:
                        failed = f"forward failed: {row.error}"
                finally:
                    free_memory(config.device)
            rows.append(row)
            config.log(_format_row(row))
        fn = None
        free_memory(config.device)
    del inputs
    free_memory(config.device)
    return rows


def _format_row(row: Measurement) -> str:
    label = f"  {row.shape} | {row.mode:<16} | {row.provider:<8}"
    if row.error:
        return f"{label}: FAILED {row.error}"
    peak = "n/a" if row.peak_mb is None else f"{row.peak_mb:.1f} MB"
    return f"{label}: {row.median_ms:.4f} ms [{row.p20_ms:.4f}, {row.p80_ms:.4f}] peak {peak} ({row.timer})"


def select_cases(op: OpBenchmark, config: BenchConfig) -> list[Case]:
    cases = op.cases(config.quick, config.device.type)
    if not config.sweep:
        cases = [c for c in cases if c.group != "sweep"]
    return cases


def run_op(op: OpBenchmark, config: BenchConfig, done: set | None = None) -> list[Measurement]:
    done = set() if done is None else done
    rows: list[Measurement] = []
    for case in select_cases(op, config):
        config.log(f"[{op.name}] {case.group} {case.name}: {case.shape}")
        for row in run_case(op, case, config, done):
            rows.append(row)
            done.add(row.key)
    return rows


def run_ops(ops: Iterable[OpBenchmark], config: BenchConfig, done: set | None = None) -> list[Measurement]:
    done = set() if done is None else done
    rows: list[Measurement] = []
    for op in ops:
        rows.extend(run_op(op, config, done))
    return rows
