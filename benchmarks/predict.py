"""Predictions before the GPU (SPEC §8): per op at the SPEC training shapes, what an H100 should measure.

For every benchmark case of ``cplfast bench --quick`` on CUDA (the SPEC training shapes), without a GPU:

* **fused**: the Triton launches of the forward and of the backward, counted by running the op's
  launchers on fake CUDA tensors under the compile audit's recorder (``cplfast.kernels.audit.fake_gpu``,
  the op's first quick ``audit_cases`` entry); bytes and flops
  are the op's floor (``traffic()`` in ``cplfast/bench/ops/<op>.py``: every input read once, every output
  written once), which the fused kernels are designed to reach.
* **eager**: the reference (``cplfast.reference``) forward + backward on meta tensors under a
  ``TorchDispatchMode`` that counts every ATen op that is not a view, the bytes each reads and writes,
  and the flops of its matrix products.

Model (H100 SXM; constants below): a chain of ``n`` dependent launches whose GPU work is ``t_gpu`` takes
``max(n * host_launch, t_gpu + launch_latency)``; ``t_gpu = max(bytes / bandwidth, flops / peak) +
n * per_kernel_ramp``. Eager pays its host overhead per ATen op and its bytes per op. The ratio
``t_eager / t_fused`` is the prediction the first GPU run checks.

    python benchmarks/predict.py [--dtype float32|bfloat16] [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HBM_BYTES_PER_S = 3.35e12 * 0.9  # H100 SXM datasheet x the ~90 % a device-to-device copy reaches
PEAK_FLOPS = {"ieee": 67e12, "tf32": 495e12 * 0.7, "bf16": 989e12 * 0.7}  # FMA fp32; dense tensor cores x 0.7
TRITON_HOST_LAUNCH_S = 4e-6  # Python-side cost of one Triton launch (binder + driver call)
EAGER_HOST_OP_S = 7e-6  # one ATen op in eager autograd: dispatch + allocator + launch
LAUNCH_LATENCY_S = 3e-6  # first launch to first instruction
PER_KERNEL_RAMP_S = 1.5e-6  # fill/drain of one kernel in a dependent chain

@dataclasses.dataclass
class EagerCount:
    ops: int = 0
    bytes: int = 0
    flops: int = 0
    names: dict = dataclasses.field(default_factory=dict)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _flat(x) -> Iterator:
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    else:
        yield x


class _CountEager(TorchDispatchMode):
    def __init__(self, count: EagerCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in {"empty", "empty_like", "empty_strided", "new_empty", "detach", "alias",
                                    "lift_fresh", "_local_scalar_dense", "set_", "sym_size", "sym_stride"}:
            return out
        tensors_in = [a for a in _flat(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in _flat(out) if isinstance(o, torch.Tensor)]
        self.count.ops += 1
        self.count.bytes += sum(_nbytes(t) for t in tensors_in) + sum(_nbytes(t) for t in tensors_out)
        self.count.names[name] = self.count.names.get(name, 0) + 1
        if name in {"mm", "bmm", "matmul"} and len(tensors_in) >= 2:
            a, b = tensors_in[0], tensors_in[1]
            self.count.flops += 2 * a.numel() * b.shape[-1]
        elif name in {"addmm", "baddbmm"} and len(tensors_in) >= 3:
            a, b = tensors_in[1], tensors_in[2]
            self.count.flops += 2 * a.numel() * b.shape[-1]
        return out


def _bench(op: str):
    return importlib.import_module(f"cplfast.bench.ops.{op}").BENCHMARK


def eager_count(bench, case, dtype) -> tuple[EagerCount, EagerCount]:
    """(forward, backward) op counts of the reference on meta tensors."""
    inputs = bench.inputs(case, torch.device("meta"), dtype)
    fwd, bwd = EagerCount(), EagerCount()
    with _CountEager(fwd):
        out = bench.output(bench.eager()(*inputs.args, **inputs.kwargs))
    if case.needs_grad and inputs.leaves:
        grad = torch.empty_like(out)
        with _CountEager(bwd):
            torch.autograd.grad(out, list(inputs.leaves), grad, allow_unused=True)
    return fwd, bwd


BACKWARD_LAUNCHERS = {"sparse_prompt": "backward", "channel_attention": "channel_attention_backward",
                      "token_attention": "token_attention_backward", "infonce": "infonce_backward",
                      "supcon": "supcon_backward"}
KERNEL_MODULES = {"sparse_prompt": "sparse_prompt", "topm_channel_attention": "channel_attention",
                  "prompt_token_attention": "token_attention", "infonce": "infonce", "supcon": "supcon"}


def fused_launches(op: str) -> tuple[list[str], list[str], int]:
    """Names of the Triton kernels one forward and one backward launch, from the op's first quick audit case
    (``audit_cases`` in ``kernels/<op>.py``) run on fake CUDA tensors. Autograd cannot run on fake CUDA
    tensors here, so the backward launcher is wrapped to mark where the backward starts. The third value
    counts the ATen kernels the launchers run besides Triton (norms, partial sums, casts)."""
    from cplfast.kernels.audit import ARCHS, fake_gpu

    name = KERNEL_MODULES[op]
    module = importlib.import_module(f"cplfast.kernels.{name}")
    case = next(c for c in module.audit_cases(torch.float32) if c.quick)
    original = getattr(module, BACKWARD_LAUNCHERS[name])
    aten = EagerCount()
    with fake_gpu(ARCHS["sm_90"]) as records, _CountEager(aten):
        def marked(*args, **kwargs):
            records.append(None)
            return original(*args, **kwargs)

        setattr(module, BACKWARD_LAUNCHERS[name], marked)
        try:
            case.run()
        finally:
            setattr(module, BACKWARD_LAUNCHERS[name], original)
    split = records.index(None) if None in records else len(records)
    names = [r[0].__name__ if r is not None else None for r in records]
    return names[:split], names[split + 1:], aten.ops


def chain_time(launches: int, bytes_: float, flops: float, peak: float, host_s: float) -> float:
    gpu = max(bytes_ / HBM_BYTES_PER_S, flops / peak) + launches * PER_KERNEL_RAMP_S
    return max(launches * host_s, gpu + LAUNCH_LATENCY_S)


def predict(ops, dtype: torch.dtype) -> list[dict]:
    from cplfast.bench.cases import FULL

    itemsize = torch.empty((), dtype=dtype).element_size()
    precision = "ieee" if dtype == torch.float32 else "bf16"
    rows = []
    for op in ops:
        bench = _bench(op)
        try:
            fwd_names, bwd_names, aten_ops = fused_launches(bench.name)
            error = None
        except Exception as exc:  # noqa: BLE001 - reported in the table
            fwd_names, bwd_names, aten_ops, error = [], [], 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        for case in bench.cases(quick=True, device_type="cuda"):
            mode = FULL if case.needs_grad else "forward"
            floor = bench.traffic(case, itemsize)[mode]
            fwd, bwd = eager_count(bench, case, dtype)
            f_names, b_names = fwd_names, (bwd_names if case.needs_grad else [])
            n_fused = len(f_names) + len(b_names) + aten_ops
            eager_ops = fwd.ops + bwd.ops
            eager_bytes = fwd.bytes + bwd.bytes
            eager_flops = fwd.flops + bwd.flops
            peak = PEAK_FLOPS[precision]
            t_fused = chain_time(n_fused, floor.bytes, floor.flops, peak, TRITON_HOST_LAUNCH_S)
            t_eager = chain_time(eager_ops, eager_bytes, max(eager_flops, floor.flops), peak, EAGER_HOST_OP_S)
            rows.append(dict(
                op=op, case=case.name, shape=case.shape, mode=mode, dtype=str(dtype).replace("torch.", ""),
                floor_mb=floor.bytes / 1e6, gflop=floor.flops / 1e9,
                roofline_us=max(floor.bytes / HBM_BYTES_PER_S, floor.flops / peak) * 1e6,
                fused_launches=[len(f_names), len(b_names)], fused_kernels=f_names + b_names,
                launcher_aten_ops=aten_ops,
                eager_ops=[fwd.ops, bwd.ops], eager_mb=eager_bytes / 1e6,
                eager_op_names=sorted(set(fwd.names) | set(bwd.names)),
                t_fused_us=t_fused * 1e6, t_eager_us=t_eager * 1e6, ratio=t_eager / t_fused,
                bound="launch" if n_fused * TRITON_HOST_LAUNCH_S > t_fused * 0.99 - LAUNCH_LATENCY_S else (
                    "memory" if floor.bytes / HBM_BYTES_PER_S >= floor.flops / peak else "compute"),
                error=error,
            ))
    return rows


def markdown(rows) -> str:
    lines = [
        "| op | case | mode | floor MB | GFLOP | roofline µs | Triton launches fwd/bwd (+ATen) | eager ops fwd/bwd | eager MB | "
        "predicted fused µs | predicted eager µs | predicted × eager | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        launches = "error: " + r["error"] if r["error"] else "/".join(map(str, r["fused_launches"])) + (
            f" (+{r['launcher_aten_ops']})" if r["launcher_aten_ops"] else "")
        lines.append(
            f"| {r['op']} | {r['case']} | {r['mode']} | {r['floor_mb']:.1f} | {r['gflop']:.2f} | "
            f"{r['roofline_us']:.1f} | {launches} | {'/'.join(map(str, r['eager_ops']))} | {r['eager_mb']:.1f} | "
            f"{r['t_fused_us']:.1f} | {r['t_eager_us']:.1f} | {r['ratio']:.1f}× | {r['bound']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=["sparse_prompt", "channel_attention", "token_attention",
                                                     "infonce", "supcon"])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = predict(args.ops, getattr(torch, args.dtype))
    text = markdown(rows)
    print(text)
    if args.markdown:
        open(args.markdown, "w").write(text)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    return 0 if not any(r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
