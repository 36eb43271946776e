"""Parity and speed of exported artifacts against the PyTorch model they came from.

For each artifact (a callable ``x -> y``: ONNX Runtime session, TensorRT engine, AOTInductor package)
and each input shape: ``max |artifact(x) - model(x)|`` on a fresh random input, and the median latency
of the artifact and of eager PyTorch on the same input.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

class OnnxRunner:
    """An ONNX Runtime session as a ``torch.Tensor -> torch.Tensor`` callable (CPU by default).

    ``providers``: ONNX Runtime execution providers, e.g. ``["CUDAExecutionProvider",
    "CPUExecutionProvider"]``; default: CPU. ``threads``: intra-op threads (0 = ONNX Runtime's choice).
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ModuleNotFoundError as err:
            raise RuntimeError("running ONNX models needs onnxruntime: pip install onnxruntime") from err
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no ONNX file at {path!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                path, sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as err:
            raise RuntimeError(f"path: ONNX Runtime cannot load {path!r} ({err})") from err
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected|`` in float64 on the CPU; ``inf`` when shapes differ or values are not finite."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    diff = (actual.detach().to("cpu", torch.float64) - expected.detach().to("cpu", torch.float64)).abs()
    return float(diff.max()) if torch.isfinite(diff).all() else math.inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_latency_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall-clock milliseconds of ``fn()`` (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class ParityRow:
    artifact: str
    shape: tuple[int, ...]
    max_abs_error: float
    latency_ms: float
    eager_ms: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.latency_ms if self.latency_ms > 0 else math.inf


def parity_report(
    model: nn.Module,
    artifacts: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    shapes: Sequence[Sequence[int]] = ((1, 3, 64, 64), (2, 3, 72, 96)),
    *,
    device: torch.device | str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> list[ParityRow]:
    """One :class:`ParityRow` per (artifact, shape): error against eager ``model`` and both latencies.

    Inputs are uniform in [0, 1) (an image) drawn from ``seed``; the model runs in eval mode on
    ``device`` (default: its parameters' device) with the backend in force (``auto``: Triton kernels on
    CUDA). Artifacts receive the same tensor on that device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    first = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for shape in shapes:
                x = torch.rand(tuple(shape), generator=generator).to(device)
                expected = _first(model(x))
                eager_ms = median_latency_ms(lambda: model(x), device, warmup=warmup, repeats=repeats)
                for name, run in artifacts.items():
                    actual = _first(run(x))
                    error = max_abs_error(actual, expected)
                    latency = median_latency_ms(lambda: run(x), device, warmup=warmup, repeats=repeats)
                    rows.append(ParityRow(name, tuple(shape), error, latency, eager_ms))
    finally:
        model.train(was_training)
    return rows


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def format_report(rows: Sequence[ParityRow], *, device: str = "") -> str:
    """A markdown table of :func:`parity_report` rows."""
    header = f"Parity and latency against eager PyTorch{' on ' + device if device else ''}\n\n"
    table = [
        "| artifact | input shape | max abs error | latency (ms) | eager PyTorch (ms) | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        shape = "x".join(str(v) for v in row.shape)
        table.append(
            f"| {row.artifact} | {shape} | {row.max_abs_error:.2e} | {row.latency_ms:.2f} | "
            f"{row.eager_ms:.2f} | {row.speedup:.2f}x |"
        )
    return header + "\n".join(table) + "\n"


__all__ = ["OnnxRunner", "ParityRow", "format_report", "max_abs_error", "median_latency_ms", "parity_report"]
