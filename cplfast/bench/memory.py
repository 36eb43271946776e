"""Peak memory of one call: what the timed closure allocates on top of what was live before it.

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` just before the call. Inputs, and for a backward-only measurement the saved
  activations of the forward run beforehand, are not counted; outputs, saved tensors and workspace are.
* CPU: the PyTorch profiler's memory events (``profile_memory=True``): every tensor allocation and free
  during the call, summed in time order; the peak of that running sum. Python objects and allocations
  made and freed inside a single aten op (within one kernel) are not seen. ``tracemalloc`` cannot help
  here (it does not see tensor storage), and process RSS is polluted by the allocator's caches, so where
  the profiler is unavailable the value is ``None``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Callable, Iterator

import torch

MB = 2**20


def cuda_peak_mb(prepare: Callable[[], Callable]) -> float:
    fn = prepare()
    fn()  # warm: compilation, autotuning and first-call allocations (optimizer state) are not counted
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result, fn
    return peak / MB


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter) for the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_mb(prepare: Callable[[], Callable]) -> float | None:
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - the profiler ships with torch
        return None
    fn = prepare()
    fn()  # warm: compilation and first-call caches are not the op's memory
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
        events = prof.events()
    except Exception:  # noqa: BLE001 - the profiler is best effort; the timing still counts
        return None
    deltas = []
    for event in events:
        if event.name == "[memory]":
            amount, when = event.cpu_memory_usage, event.time_range.start
        else:
            amount, when = event.self_cpu_memory_usage, event.time_range.end
        if amount:
            deltas.append((when, amount))
    deltas.sort(key=lambda d: d[0])
    live = peak = 0
    for _, amount in deltas:
        live += amount
        peak = max(peak, live)
    return peak / MB


def peak_mb(prepare: Callable[[], Callable], device: torch.device) -> float | None:
    if device.type == "cuda":
        return cuda_peak_mb(prepare)
    return cpu_peak_mb(prepare)
