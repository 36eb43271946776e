"""Timers: ``triton.testing.do_bench`` and CUDA-graph replay on a GPU, a repeat timer on the CPU.

Every timer takes ``prepare``, a function that does the untimed setup (e.g. the forward pass whose graph
a backward-only measurement walks) and returns the closure to time. All return :class:`Timing` in
milliseconds: the median and the 20th / 80th percentiles.

* ``do_bench``: Triton's timer (L2 flushed before every call, CUDA events around each call).
* ``cuda_graph``: for launch-bound cases. Like ``triton.testing.do_bench_cudagraph`` — capture ``n``
  back-to-back calls in one CUDA graph and time replays — except that ``prepare`` runs on the capture
  stream, so a backward pass whose forward ran in ``prepare`` is captured too (autograd runs each
  backward kernel on the stream of its forward op). Percentiles are over replays, each the mean of
  ``n`` calls, so they are narrower than ``do_bench``'s.
* ``cpu_repeat``: ``time.perf_counter`` around each call after warm-up calls, until a time budget is
  spent (at least ``min_reps`` calls).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    samples: int


def quantiles(samples: list[float], qs=QUANTILES) -> list[float]:
    """Linear-interpolated quantiles (numpy's default method) of a non-empty list."""
    data = sorted(samples)
    out = []
    for q in qs:
        point = q * (len(data) - 1)
        lo, hi = math.floor(point), math.ceil(point)
        out.append(data[lo] + (data[hi] - data[lo]) * (point - lo))
    return out


def cpu_repeat(prepare: Callable[[], Callable], *, budget_s: float = 1.0, warmup: int = 2, min_reps: int = 5,
               max_reps: int = 10_000) -> Timing:
    fn = prepare()
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = quantiles(samples)
    return Timing(med, p20, p80, "cpu_repeat", len(samples))


def gpu_do_bench(prepare: Callable[[], Callable], *, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    from triton.testing import do_bench

    fn = prepare()
    fn()
    torch.cuda.synchronize()
    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(med, p20, p80, "do_bench", max(1, int(rep_ms / max(med, 1e-3))))


def gpu_cuda_graph(prepare: Callable[[], Callable], *, rep_ms: int = 100, replays: int = 20) -> Timing:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = prepare()
        for _ in range(3):  # compile, autotune and allocate outside the capture
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(5):
            fn()
        end.record(stream)
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        calls = max(1, min(1000, int(rep_ms / replays / estimate)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
        torch.cuda.synchronize()
        graph.replay()  # first replay uploads the graph
        torch.cuda.synchronize()
        samples = []
        for _ in range(replays):
            start.record(stream)
            graph.replay()
            end.record(stream)
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / calls)
    del graph
    med, p20, p80 = quantiles(samples)
    return Timing(med, p20, p80, "cuda_graph", replays * calls)


def device_bandwidth_gbps(device: torch.device, *, megabytes: int = 1024, budget_s: float = 0.5) -> float:
    """Achievable memory bandwidth, from a large device-to-device copy (read + write counted)."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    def prepare():
        return lambda: dst.copy_(src)

    if device.type == "cuda":
        timing = gpu_do_bench(prepare, rep_ms=200)
    else:
        timing = cpu_repeat(prepare, budget_s=budget_s, min_reps=3)
    return 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9
