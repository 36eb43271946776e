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

Timing (:mod:`.timing`): for each case and mode, every provider's closure is prepared, then timed in
rounds; in each round every provider is timed once, in an order shuffled afresh from a seeded generator
(``seed`` + op + shape + mode, recorded in the document). Medians, 20th / 80th percentiles, minimum and
maximum are over rounds.

Correctness: before timing, every provider's output (and, when the case is timed in a backward mode, its
gradients with respect to the inputs for a fixed output gradient) is compared once per case with the
PyTorch reference run in float64 on the same inputs: ``max|got - want| / max|want|`` must not exceed the
dtype's tolerance (:data:`TOLERANCES`). A provider that disagrees is still timed, but its rows are marked
``correct: false``, listed among the failures and left out of the speedups.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .cases import BACKWARD, FORWARD, FULL, Case, OpBenchmark, OpInputs
from .memory import peak_mb
from .timing import (CpuSampler, DoBenchSampler, GraphSampler, Sampler, Timing, interleave, round_rng,
                     summarize)

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
    rep_ms: int = 100  # GPU: timing window per provider and mode, spread over the rounds
    cpu_budget_s: float = 1.0  # CPU: time per provider and mode (rounds go on until all have had it)
    rounds: int | None = None  # rounds per mode (GPU: exactly; CPU: at least); default 5 quick, 10 otherwise
    max_rounds: int = 200  # CPU: at most this many rounds
    cpu_sample_ms: float = 2.0  # CPU: one round's sample is about this long (back-to-back calls averaged)
    seed: int = 0  # seeds the per-round provider orders
    check: bool = True  # compare every provider with the float64 reference once per case
    log: Callable[[str], None] = field(default=lambda message: None)

    def round_limits(self, providers: int) -> tuple[int, int, float]:
        """``(min_rounds, max_rounds, budget_s)`` for one mode of one case with ``providers`` providers."""
        rounds = self.rounds or (5 if self.quick else 10)
        if self.device.type == "cuda":
            return rounds, rounds, 0.0
        return rounds, max(rounds, self.max_rounds), self.cpu_budget_s * providers


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
    min_ms: float | None = None
    max_ms: float | None = None
    rounds: int | None = None
    correct: bool | None = None  # None: not checked (see ``check``)
    check: str | None = None  # how the output compared with the reference
    max_err: float | None = None
    tolerance: float | None = None
    order_seed: str | None = None

    def set_timing(self, timing: Timing) -> None:
        self.median_ms, self.p20_ms, self.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
        self.min_ms, self.max_ms, self.rounds = timing.min_ms, timing.max_ms, timing.rounds
        self.timer, self.samples = timing.timer, timing.samples

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.op, self.mode, self.shape, self.provider)


def describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(err).__name__}: {first}"[:400]


def free_memory(device: torch.device, full: bool = False) -> None:
    """Collect garbage and return cached CUDA blocks; on the CPU only when ``full`` (end of a case):
    a collection there costs up to half a second with torch.compile loaded and frees nothing that
    reference counting has not freed already, except reference cycles."""
    if device.type != "cuda" and not full:
        return
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


# ---------------------------------------------------------------------------------------------- timing
def _round_rep_ms(config: BenchConfig, rounds: int) -> int:
    """do_bench window of one round: the mode's window spread over the rounds (at least 5 ms)."""
    return max(5, 2 * config.rep_ms // max(1, rounds))


def make_sampler(prepare: Callable[[], Callable], config: BenchConfig, use_graph: bool, rounds: int) -> Sampler:
    if config.device.type != "cuda":
        return CpuSampler(prepare, target_ms=config.cpu_sample_ms)
    if use_graph:
        try:
            return GraphSampler(prepare, rep_ms=config.rep_ms, rounds=rounds)
        except Exception as err:  # noqa: BLE001 - capture is an optimisation: fall back to do_bench
            free_memory(config.device)
            sampler = DoBenchSampler(prepare, rep_ms=_round_rep_ms(config, rounds))
            sampler.timer = f"do_bench (graph capture failed: {describe_error(err)[:120]})"
            return sampler
    return DoBenchSampler(prepare, rep_ms=_round_rep_ms(config, rounds))


@dataclass
class Interleaved:
    """Per provider: its timing or its error; the provider order of every round and the seed label."""

    timings: dict[str, Timing]
    errors: dict[str, str]
    orders: list[list[str]]
    seed: str


def time_interleaved(prepares: dict[str, Callable[[], Callable]], config: BenchConfig, use_graph: bool,
                     key: tuple[str, ...]) -> Interleaved:
    """Prepare every provider, then time them in rounds, each round in a freshly shuffled order.

    ``key`` (op, shape, mode) and ``config.seed`` seed the order generator. A provider whose setup or
    timing fails gets an error string; the others are still timed.
    """
    min_rounds, max_rounds, budget = config.round_limits(len(prepares))
    samplers: dict[str, Sampler] = {}
    errors: dict[str, str] = {}
    for name, prepare in prepares.items():
        try:
            samplers[name] = make_sampler(prepare, config, use_graph, min_rounds)
        except Exception as err:  # noqa: BLE001 - every failure is a result, never a crash
            errors[name] = describe_error(err)
            free_memory(config.device)
    label = ":".join((str(config.seed),) + tuple(key))
    rounds = interleave(samplers, round_rng(config.seed, *key), min_rounds=min_rounds, max_rounds=max_rounds,
                        budget_s=budget)
    timings: dict[str, Timing] = {}
    for name, sampler in samplers.items():
        if name in rounds.errors:
            errors[name] = describe_error(rounds.errors[name])
        elif rounds.samples[name]:
            timings[name] = summarize(rounds.samples[name], sampler.timer, sampler.calls)
        sampler.close()
    samplers.clear()
    free_memory(config.device)
    return Interleaved(timings, errors, rounds.orders, label)


def time_prepared(prepare: Callable[[], Callable], config: BenchConfig, use_graph: bool) -> Timing:
    """One closure timed by itself in rounds (no other provider to interleave with)."""
    result = time_interleaved({"only": prepare}, config, use_graph, ("single",))
    if "only" in result.errors:
        raise RuntimeError(result.errors["only"])
    return result.timings["only"]


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


def memory_guard(op: OpBenchmark, case: Case, config: BenchConfig, providers: int = 1) -> str | None:
    """On the CPU, refuse cases whose eager reference would exhaust host memory (no clean OOM there).

    All providers of a mode are prepared before the rounds start, so their memory counts together.
    """
    if config.device.type != "cpu":
        return None
    need = op.eager_bytes(case, torch.empty((), dtype=config.dtype).element_size()) * max(1, providers)
    available = _available_host_bytes()
    if available is not None and need > available // 2:
        return (f"skipped: the providers prepared together (and the float64 check) need ~{need / 2**30:.1f} GiB, "
                f"host has {available / 2**30:.1f} GiB free")
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


# ---------------------------------------------------------------------------------------------- correctness
# max|got - want| / max|want| allowed against the float64 reference, by input dtype.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class Check:
    correct: bool | None
    message: str
    max_err: float | None = None
    tolerance: float | None = None


@dataclass
class Reference:
    output: torch.Tensor
    grad_output: torch.Tensor | None
    grads: tuple


def _as_float64(inputs: OpInputs) -> OpInputs:
    """Float64 copies of the floating inputs (same strides, same requires_grad); leaves mapped alike."""
    copies: dict[int, torch.Tensor] = {}

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if id(value) not in copies:
                copies[id(value)] = value.detach().to(torch.float64).requires_grad_(value.requires_grad)
            return copies[id(value)]
        return value

    args = tuple(convert(a) for a in inputs.args)
    kwargs = {k: convert(v) for k, v in inputs.kwargs.items()}
    leaves = tuple(convert(t) for t in inputs.leaves)
    return OpInputs(args=args, kwargs=kwargs, leaves=leaves)


def _outputs(op: OpBenchmark, fn: Callable, inputs: OpInputs, case: Case, with_grads: bool,
             grad_output: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    if not case.needs_grad:
        with torch.no_grad():
            return op.output(fn(*inputs.args, **inputs.kwargs)).detach(), None, ()
    out = op.output(fn(*inputs.args, **inputs.kwargs))
    if not with_grads or not inputs.leaves:
        return out.detach(), None, ()
    if grad_output is None:
        grad_output = _grad_output(out.detach())
    # retain_graph=True as the backward-only timing does: torch.compile fixes buffer donation at the first
    # backward, and a backward compiled with donated buffers refuses retain_graph=True later
    grads = torch.autograd.grad(out, tuple(inputs.leaves), grad_output.to(out.dtype), retain_graph=True,
                                allow_unused=True)
    return out.detach(), grad_output, grads


def reference_result(op: OpBenchmark, inputs: OpInputs, case: Case, with_grads: bool) -> Reference:
    """The float64 reference's output (and gradients for a random output gradient) on ``inputs``."""
    out, grad_output, grads = _outputs(op, op.eager(), _as_float64(inputs), case, with_grads, None)
    return Reference(out, grad_output, grads)


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """``max|got - want| / max|want|`` (inf on a shape mismatch or a non-finite value where want is finite)."""
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        other = want if got is None else got
        got, want = (torch.zeros_like(other), other) if got is None else (other, torch.zeros_like(other))
    if tuple(got.shape) != tuple(want.shape):
        return float("inf")
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return float("inf")
    if not finite.any():
        return 0.0
    got, want = got[finite], want[finite]
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale)


def check_provider(op: OpBenchmark, fn: Callable, inputs: OpInputs, case: Case, reference: Reference,
                   dtype: torch.dtype, with_grads: bool) -> Check:
    """Compare one provider's output (and gradients) with the reference; raises if the provider fails."""
    tolerance = TOLERANCES.get(dtype, 1e-4)
    out, _, grads = _outputs(op, fn, inputs, case, with_grads, reference.grad_output)
    errors = {"output": relative_error(out, reference.output)}
    names = [f"grad[{i}]" for i in range(len(reference.grads))]
    for name, got, want in zip(names, grads, reference.grads):
        errors[name] = relative_error(got, want)
    if with_grads and len(grads) != len(reference.grads):
        errors["grads"] = float("inf")
    worst = max(errors, key=lambda k: errors[k])
    err = errors[worst]
    what = "output and gradients" if len(errors) > 1 else "output"
    if err <= tolerance:
        return Check(True, f"ok: {what} within {tolerance:.0e} of the float64 reference (max rel err {err:.1e})",
                     err, tolerance)
    bad = ", ".join(f"{name} {value:.2e}" for name, value in errors.items() if value > tolerance)
    return Check(False, f"WRONG: differs from the float64 reference, max|got-want|/max|want| = {bad} "
                        f"> {tolerance:.0e}", err, tolerance)


# ---------------------------------------------------------------------------------------------- cases
def record_interleaved(result, prepares: dict, mode_rows: dict, config: BenchConfig, orders: list | None,
                       key: tuple[str, str, str]) -> list[str]:
    """Store one interleaved timing of ``prepares`` (``key`` = op, shape, mode): the rounds' orders, each
    provider's timing or error, and its peak memory. Returns the providers whose timing failed."""
    op_name, shape, mode = key
    if orders is not None:
        orders.append({"op": op_name, "mode": mode, "shape": shape, "seed": result.seed, "orders": result.orders})
    failed = []
    for p, prepare in prepares.items():
        row = mode_rows[p]
        if row.error:
            continue
        if p in result.errors:
            row.error = result.errors[p]
            failed.append(p)
            continue
        row.set_timing(result.timings[p])
        row.order_seed = result.seed
        try:
            row.peak_mb = peak_mb(prepare, config.device)
        except Exception as err:  # noqa: BLE001 - the timing stands; the memory probe failed
            row.peak_mb = None
            config.log(f"  peak memory of {p} {mode} failed: {describe_error(err)}")
        finally:
            free_memory(config.device)
    return failed


def run_case(op: OpBenchmark, case: Case, config: BenchConfig, done: set,
             orders: list[dict] | None = None) -> list[Measurement]:
    """All providers and modes of one case, interleaved; keys already in ``done`` are not measured again.

    ``orders`` (if given) receives one ``{"op", "mode", "shape", "seed", "orders"}`` entry per mode.
    """
    modes = [m for m in case.modes if m in config.modes]
    rows: list[Measurement] = []
    providers = {name: f for name, f in provider_functions(op, config).items() if name not in case.skip_providers}
    todo = [(p, m) for p in providers for m in modes if (op.name, m, case.shape, p) not in done]
    if not todo:
        return rows
    # the float64 reference of the check needs about twice an fp32 eager provider
    skip = memory_guard(op, case, config, len(providers) + (2 if config.check else 0))
    if skip:
        for provider, mode in todo:
            rows.append(Measurement(op.name, mode, case.shape, provider, error=skip))
        config.log(f"  {case.shape}: {skip}")
        return rows
    inputs = op.inputs(case, config.device, config.dtype)
    use_graph = wants_graph(op, case, config)
    wanted = {p for p, _ in todo}
    fns: dict[str, Callable] = {}
    failed: dict[str, str] = {}
    for provider, factory in providers.items():
        if provider not in wanted:
            continue
        try:
            fns[provider] = factory()
        except Exception as err:  # noqa: BLE001
            failed[provider] = describe_error(err)

    with_grads = case.needs_grad and any(m in (BACKWARD, FULL) for m in modes)
    checks: dict[str, Check] = {}
    reference: Reference | None = None
    if config.check and fns:
        try:
            reference = reference_result(op, inputs, case, with_grads)
        except Exception as err:  # noqa: BLE001 - e.g. the float64 reference does not fit
            unchecked = Check(None, f"unchecked: the float64 reference failed ({describe_error(err)[:200]})")
            checks = {p: unchecked for p in fns}
        free_memory(config.device)
    for provider, fn in list(fns.items()):
        if reference is None:
            checks.setdefault(provider, Check(None, "not checked (--no-check)"))
            continue
        try:
            checks[provider] = check_provider(op, fn, inputs, case, reference, config.dtype, with_grads)
        except Exception as err:  # noqa: BLE001
            failed[provider] = f"forward failed: {describe_error(err)}"
            del fns[provider]
        free_memory(config.device)
    reference = None

    for mode in modes:
        names = [p for p in providers if (op.name, mode, case.shape, p) not in done and p in wanted]
        mode_rows = {p: Measurement(op.name, mode, case.shape, p) for p in names}
        prepares = {}
        for p in names:
            row = mode_rows[p]
            if p in failed:
                row.error = failed[p]
                continue
            check = checks[p]
            row.correct, row.check, row.max_err, row.tolerance = check.correct, check.message, check.max_err, \
                check.tolerance
            try:
                prepares[p] = prepare_mode(op, fns[p], inputs, mode, case)
            except Exception as err:  # noqa: BLE001
                row.error = describe_error(err)
        result = time_interleaved(prepares, config, use_graph, (op.name, case.shape, mode))
        for p in record_interleaved(result, prepares, mode_rows, config, orders, (op.name, case.shape, mode)):
            if mode == FORWARD:
                failed[p] = f"forward failed: {mode_rows[p].error}"
        prepares.clear()
        for p in names:
            rows.append(mode_rows[p])
            config.log(_format_row(mode_rows[p]))
    fns.clear()
    del inputs
    free_memory(config.device, full=True)
    return rows


def _format_row(row: Measurement) -> str:
    label = f"  {row.shape} | {row.mode:<16} | {row.provider:<8}"
    if row.error:
        return f"{label}: FAILED {row.error}"
    peak = "n/a" if row.peak_mb is None else f"{row.peak_mb:.1f} MB"
    wrong = f" {row.check}" if row.correct is False else ""
    return (f"{label}: {row.median_ms:.4f} ms [p20 {row.p20_ms:.4f}, p80 {row.p80_ms:.4f}; min {row.min_ms:.4f}, "
            f"max {row.max_ms:.4f}; {row.rounds} rounds] peak {peak} ({row.timer}){wrong}")


def select_cases(op: OpBenchmark, config: BenchConfig) -> list[Case]:
    cases = op.cases(config.quick, config.device.type)
    if not config.sweep:
        cases = [c for c in cases if c.group != "sweep"]
    return cases


@contextlib.contextmanager
def no_donated_buffers():
    """Switch off torch.compile's buffer donation for the block.

    A compiled backward that donates (reuses) its saved buffers refuses ``retain_graph=True``, which the
    backward-only timing needs (whether it donates depends on the first backward and on warm caches), so
    the ``compile`` provider runs without donation in every mode.
    """
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    if not hasattr(functorch_config, "donated_buffer"):
        yield
        return
    with functorch_config.patch(donated_buffer=False):
        yield


def run_op(op: OpBenchmark, config: BenchConfig, done: set | None = None,
           orders: list[dict] | None = None) -> list[Measurement]:
    done = set() if done is None else done
    rows: list[Measurement] = []
    for case in select_cases(op, config):
        config.log(f"[{op.name}] {case.group} {case.name}: {case.shape}")
        with no_donated_buffers():
            case_rows = run_case(op, case, config, done, orders)
        for row in case_rows:
            rows.append(row)
            done.add(row.key)
    return rows


def run_ops(ops: Iterable[OpBenchmark], config: BenchConfig, done: set | None = None,
            orders: list[dict] | None = None) -> list[Measurement]:
    done = set() if done is None else done
    rows: list[Measurement] = []
    for op in ops:
        rows.extend(run_op(op, config, done, orders))
    return rows
