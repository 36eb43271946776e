"""Compile audit: every Triton launch the launchers make, compiled for Hopper (sm_90) and Ampere (sm_80),
checked against what the GPU enforces — without a GPU.

    python -m cplfast.kernels.audit [--quick] [--arch sm_90 sm_80] [--ops OP ...] [--json F] [--markdown F]

How it works. Each ``kernels/<op>.py`` lists the shapes users reach in ``audit_cases(dtype)`` (cases flagged ``quick`` form the CI subset).
A case calls the op's real launchers (forward and backward) on fake CUDA tensors (``FakeTensorMode``:
shapes, strides and dtypes, no storage) while ``triton``'s ``JITFunction.run`` is replaced by a recorder,
and ``torch.cuda`` answers as the target GPU would (its SM count drives the launchers' split choices).
Every recorded launch is specialised with Triton's own binder for the target (integer, alignment and
constexpr specialisation as a real launch), compiled with ``triton.compile`` and its PTX run through
Triton's bundled ``ptxas -v``. A launch fails on:

* shared memory above the per-block limit (232,448 B on sm_90, 166,912 B on sm_80),
* grid axis 0 above 2^31 - 1 or axis 1 / 2 above 65,535,
* any register spill (spill stores or loads > 0),
* a compile error.

It also reports registers, warps, stages and resident warps per SM (occupancy from registers, shared
memory and warps). fp32 cases run once per ``torch.get_float32_matmul_precision`` setting that changes
the generated code ("highest" → ieee dots, "high" → tf32x3).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable, Iterable, Iterator, Sequence

import torch

OPS = ("sparse_prompt", "channel_attention", "token_attention", "infonce", "supcon")
# (label, tensor dtype, float32 matmul precision)
PRECISIONS = {
    "fp32": (torch.float32, "highest"),
    "fp32-tf32x3": (torch.float32, "high"),
    "fp16": (torch.float16, "highest"),
    "bf16": (torch.bfloat16, "highest"),
}
GRID_AXIS_LIMITS = (2**31 - 1, 65_535, 65_535)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    sm_count: int  # H100 SXM / A100 SXM
    smem_per_block: int  # opt-in maximum dynamic shared memory per block
    smem_per_sm: int
    regs_per_sm: int = 65_536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHS = {
    "sm_90": Arch("sm_90", 90, sm_count=132, smem_per_block=232_448, smem_per_sm=233_472),
    "sm_80": Arch("sm_80", 80, sm_count=108, smem_per_block=166_912, smem_per_sm=167_936),
}


@dataclasses.dataclass
class AuditCase:
    """One user-reachable call: ``run()`` calls the op's launchers on fake CUDA tensors."""

    name: str
    run: Callable[[], None]
    quick: bool = False  # part of the fast subset that CI runs


@dataclasses.dataclass
class Launch:
    op: str
    case: str
    precision: str
    kernel: str
    grid: tuple[int, int, int]
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    fn: object = dataclasses.field(repr=False, default=None)

    def key(self) -> str:
        return repr((self.fn.__module__, self.kernel, self.signature, sorted(self.constexprs.items(), key=str),
                     sorted(self.attrs.items(), key=str), sorted(self.options.items(), key=str)))


@dataclasses.dataclass
class Row:
    """One launch's audit result on one architecture."""

    arch: str
    op: str
    case: str
    precision: str
    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    shared: int | None
    resident_warps: int | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------------------------------
# fake CUDA tensors for the cases
# ----------------------------------------------------------------------------------------------------


def fake(shape: Sequence[int], dtype: torch.dtype = torch.float32, order: Sequence[int] | None = None) -> torch.Tensor:
    """A fake CUDA tensor of ``shape``; ``order`` lists the dims from outermost to innermost in memory
    (``None``: contiguous; ``(0, 2, 3, 1)``: channels-last for NCHW). Call inside a case's ``run``."""
    shape = tuple(int(s) for s in shape)
    if order is None:
        return torch.empty(shape, dtype=dtype, device="cuda")
    base = torch.empty(tuple(shape[d] for d in order), dtype=dtype, device="cuda")
    inverse = [list(order).index(d) for d in range(len(shape))]
    return base.permute(*inverse)


def fake_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


# ----------------------------------------------------------------------------------------------------
# capturing launches
# ----------------------------------------------------------------------------------------------------


class _CurrentDevice:
    def __init__(self, device=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _kernel_modules() -> list[types.ModuleType]:
    return [importlib.import_module(f"cplfast.kernels.{op}") for op in OPS]


def _clear_caches() -> None:
    """Forget every cached device fact or device tensor (the audit's are fake)."""
    from . import _device

    _device.cache_clear()
    for module in _kernel_modules():
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == module.__name__:
                value.cache_clear()
        for name, value in vars(module).items():  # plain dict caches keyed by device index
            if name.isupper() and name.startswith("_") and isinstance(value, dict):
                value.clear()


@contextlib.contextmanager
def fake_gpu(arch: Arch) -> Iterator[list]:
    """Fake CUDA tensors and a recorder in place of Triton's launch; yields the list of recorded launches."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    records: list = []

    def record(self, *args, grid, warmup, **kwargs):
        records.append((self, args, kwargs, grid))
        return None

    props = types.SimpleNamespace(multi_processor_count=arch.sm_count, name=f"fake {arch.name}",
                                  major=arch.capability // 10, minor=arch.capability % 10)
    patches = [
        (JITFunction, "run", record),
        (torch.cuda, "device", _CurrentDevice),
        (torch.cuda, "get_device_properties", lambda *a, **k: props),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    _clear_caches()
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        with FakeTensorMode(allow_non_fake_inputs=False):
            yield records
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        _clear_caches()


class _PointerStub:
    """What Triton's binder reads of a tensor argument: dtype and address (for 16-byte alignment)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 1024 + t.storage_offset() * t.element_size()  # allocations are 512-byte aligned

    def data_ptr(self) -> int:
        return self._ptr


def _specialise(fn, args, kwargs, grid, arch: Arch):
    """Triton's own binder for the target: (grid, signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch.capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    stub = lambda a: _PointerStub(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    args = [stub(a) for a in args]
    kwargs = {k: stub(v) for k, v in kwargs.items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = JITFunction._pack_args(fn, backend, kwargs, bound, specialization, options)
    if callable(grid):
        grid = grid(bound)
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    return grid, signature, constexprs, attrs, options


def capture(op: str, precision: str, cases: Iterable[AuditCase], arch: Arch) -> tuple[list[Launch], list[Row]]:
    """Run ``cases`` under :func:`fake_gpu`; returns the launches and a failed row per case that raised."""
    dtype_label = precision
    launches, failures = [], []
    _, matmul_precision = PRECISIONS[precision]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        for case in cases:
            with fake_gpu(arch) as records:
                try:
                    case.run()
                except Exception as exc:  # noqa: BLE001 - a launcher that cannot plan is a failed launch
                    failures.append(Row(arch.name, op, case.name, dtype_label, "(launcher)", (0, 0, 0), 0, 0,
                                        None, None, None, None, None, [f"launcher raised {type(exc).__name__}: {exc}"]))
                    continue
            for fn, args, kwargs, grid in records:
                grid, signature, constexprs, attrs, options = _specialise(fn, args, kwargs, grid, arch)
                launches.append(Launch(op, case.name, dtype_label, fn.__name__, grid, signature, constexprs, attrs,
                                       dict(options.__dict__), fn))
    finally:
        torch.set_float32_matmul_precision(previous)
    return launches, failures


# ----------------------------------------------------------------------------------------------------
# compiling
# ----------------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, arch: Arch) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from Triton's bundled ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = "sm_90a" if arch.capability == 90 else f"sm_{arch.capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(arch.capability).path, "-v",
                               f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    regs = max(int(m) for m in _PTXAS_REGS.findall(log))
    spills = [(int(s), int(l)) for s, l in _PTXAS_SPILLS.findall(log)]
    return regs, max((s for s, _ in spills), default=0), max((l for _, l in spills), default=0)


def _compile_one(launch: Launch, arch: Arch) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        kernel = triton.compile(ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs),
                                target=GPUTarget("cuda", arch.capability, 32), options=launch.options)
        regs, spill_stores, spill_loads = _ptxas_usage(kernel.asm["ptx"], arch)
        return dict(shared=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps),
                    num_stages=int(kernel.metadata.num_stages), registers=regs,
                    spill_stores=spill_stores, spill_loads=spill_loads, error=None)
    except Exception as exc:  # noqa: BLE001 - reported as a failed launch
        message = str(exc).strip().splitlines()
        return dict(error=f"{type(exc).__name__}: {message[-1] if message else ''}"[:300])


_POOL_LAUNCHES: list[tuple[Launch, Arch]] = []


def _compile_index(i: int) -> dict:
    launch, arch = _POOL_LAUNCHES[i]
    return _compile_one(launch, arch)


def resident_warps(arch: Arch, registers: int, shared: int, num_warps: int) -> int:
    """Warps per SM that fit by registers (256-register allocation units per warp), shared memory
    (1 KiB reserved per block) and the warp/block limits."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = arch.regs_per_sm // max(regs_per_warp, 1) // num_warps
    by_smem = arch.smem_per_sm // (shared + 1024) if shared else arch.max_blocks_per_sm
    by_warps = arch.max_warps_per_sm // num_warps
    return min(arch.max_blocks_per_sm, by_regs, by_smem, by_warps) * num_warps


def _judge(launch: Launch, arch: Arch, res: dict) -> Row:
    problems = []
    for axis, (size, limit) in enumerate(zip(launch.grid, GRID_AXIS_LIMITS)):
        if size > limit:
            problems.append(f"grid axis {axis} = {size:,} > {limit:,}")
    num_warps = res.get("num_warps", launch.options.get("num_warps", 4))
    if res.get("error"):
        problems.append(f"compile: {res['error']}")
        return Row(arch.name, launch.op, launch.case, launch.precision, launch.kernel, launch.grid, num_warps,
                   launch.options.get("num_stages", 0), None, None, None, None, None, problems)
    if res["shared"] > arch.smem_per_block:
        problems.append(f"shared memory {res['shared']:,} B > {arch.smem_per_block:,} B")
    if res["spill_stores"] or res["spill_loads"]:
        problems.append(f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads per thread")
    warps = resident_warps(arch, res["registers"], res["shared"], num_warps)
    if warps == 0:
        problems.append("no block fits on an SM")
    return Row(arch.name, launch.op, launch.case, launch.precision, launch.kernel, launch.grid, num_warps,
               res["num_stages"], res["registers"], res["spill_stores"], res["spill_loads"], res["shared"], warps,
               problems)


def check_cases(
    cases_by_op: dict[str, Callable[[torch.dtype], Iterable[AuditCase]]],
    archs: Sequence[str] = ("sm_90", "sm_80"),
    precisions: Sequence[str] = tuple(PRECISIONS),
    *,
    quick: bool = False,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Capture every launch of the cases (``{op: audit_cases}``) and compile each distinct launch once per
    arch; one Row per launch and arch, plus a failed Row per case whose launcher raised."""
    rows: list[Row] = []
    todo: list[tuple[Launch, Arch]] = []
    for arch_name in archs:
        arch = ARCHS[arch_name]
        for op, audit_cases in cases_by_op.items():
            for precision in precisions:
                dtype, _ = PRECISIONS[precision]
                cases = [c for c in audit_cases(dtype) if c.quick or not quick]
                launches, failures = capture(op, precision, cases, arch)
                rows.extend(failures)
                todo.extend((launch, arch) for launch in launches)
    distinct: dict[str, int] = {}
    for launch, arch in todo:
        distinct.setdefault(arch.name + launch.key(), len(distinct))
    unique = [None] * len(distinct)
    for launch, arch in todo:
        unique[distinct[arch.name + launch.key()]] = (launch, arch)
    if progress:
        progress(f"{len(todo)} launches, {len(unique)} distinct compilations")
    results = _compile_all(unique, jobs, progress)
    for launch, arch in todo:
        rows.append(_judge(launch, arch, results[distinct[arch.name + launch.key()]]))
    return rows


def audit(
    ops: Sequence[str] = OPS,
    archs: Sequence[str] = ("sm_90", "sm_80"),
    precisions: Sequence[str] = tuple(PRECISIONS),
    *,
    quick: bool = False,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """:func:`check_cases` over the ``audit_cases`` of the named kernel modules."""
    cases = {op: importlib.import_module(f"cplfast.kernels.{op}").audit_cases for op in ops}
    return check_cases(cases, archs, precisions, quick=quick, jobs=jobs, progress=progress)


def _compile_all(unique: list, jobs: int | None, progress) -> list[dict]:
    global _POOL_LAUNCHES
    jobs = jobs or min(len(unique), os.cpu_count() or 1) or 1
    start = time.perf_counter()
    if jobs <= 1:
        out = []
        for i, (launch, arch) in enumerate(unique):
            out.append(_compile_one(launch, arch))
            if progress and (i + 1) % 20 == 0:
                progress(f"  compiled {i + 1}/{len(unique)} ({time.perf_counter() - start:.0f} s)")
        return out
    _POOL_LAUNCHES = unique
    try:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            out = list(pool.map(_compile_index, range(len(unique)), chunksize=1))
    finally:
        _POOL_LAUNCHES = []
    if progress:
        progress(f"  compiled {len(unique)} in {time.perf_counter() - start:.0f} s")
    return out


# ----------------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------------


def summary_rows(rows: Sequence[Row]) -> list[dict]:
    """Worst case per (arch, op, kernel, precision): launches, max grid, registers, spills, shared memory,
    min resident warps, failures."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.arch, r.op, r.kernel, r.precision), []).append(r)
    out = []
    for (arch, op, kernel, precision), rs in groups.items():
        ok = [r for r in rs if r.registers is not None]
        out.append(dict(
            arch=arch, op=op, kernel=kernel, precision=precision, launches=len(rs),
            failed=sum(not r.ok for r in rs),
            max_grid=[max(r.grid[i] for r in rs) for i in range(3)],
            warps=sorted({r.num_warps for r in rs}),
            max_registers=max((r.registers for r in ok), default=None),
            max_spill=max((max(r.spill_stores, r.spill_loads) for r in ok), default=None),
            max_shared=max((r.shared for r in ok), default=None),
            min_resident_warps=min((r.resident_warps for r in ok), default=None),
        ))
    return out


def markdown(rows: Sequence[Row], title: str = "") -> str:
    lines = [title] if title else []
    lines += [
        "| arch | op | kernel | precision | launches | failed | max grid | warps | max regs | max spill B | "
        "max smem B | min resident warps/SM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary_rows(rows):
        grid = "×".join(f"{g:,}" for g in s["max_grid"])
        lines.append(
            f"| {s['arch']} | {s['op']} | `{s['kernel']}` | {s['precision']} | {s['launches']} | {s['failed']} | "
            f"{grid} | {'/'.join(map(str, s['warps']))} | {s['max_registers']} | {s['max_spill']} | "
            f"{s['max_shared'] if s['max_shared'] is None else format(s['max_shared'], ',')} | "
            f"{s['min_resident_warps']} |"
        )
    failed = [r for r in rows if not r.ok]
    if failed:
        lines += ["", f"Failing launches ({len(failed)}):", ""]
        lines += [f"- {r.arch} {r.op} `{r.kernel}` {r.precision} [{r.case}] grid {r.grid}: {'; '.join(r.problems)}"
                  for r in failed]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import triton

    parser = argparse.ArgumentParser(prog="python -m cplfast.kernels.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the fast subset of cases (what CI runs)")
    parser.add_argument("--arch", nargs="+", choices=tuple(ARCHS), default=["sm_90", "sm_80"])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--precision", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: CPU count)")
    parser.add_argument("--json", help="write every launch's row as JSON here")
    parser.add_argument("--markdown", help="write the summary table here")
    parser.add_argument("--show", action="store_true", help="print every launch, not only the summary")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the audit compiles for the GPU")

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"triton {triton.__version__}, torch {torch.__version__}: auditing {', '.join(args.ops)} "
        f"for {', '.join(args.arch)}{' (quick)' if args.quick else ''}")
    rows = audit(args.ops, args.arch, args.precision, quick=args.quick, jobs=args.jobs, progress=log)
    title = (f"Compile audit, triton {triton.__version__}{' (quick subset)' if args.quick else ''}: "
             f"{len(rows)} launches, {sum(not r.ok for r in rows)} failing\n")
    text = markdown(rows, title)
    if args.show:
        for r in rows:
            print(f"{r.arch} {r.op} {r.kernel} {r.precision} [{r.case}] grid={r.grid} warps={r.num_warps} "
                  f"regs={r.registers} spill={r.spill_stores}/{r.spill_loads} smem={r.shared} "
                  f"resident={r.resident_warps} {'OK' if r.ok else 'FAIL: ' + '; '.join(r.problems)}")
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__,
                           rows=[dataclasses.asdict(r) for r in rows]), f, indent=1)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
