"""Timers, and the interleaved rounds every comparison is timed in.

Every timer starts from ``prepare``, a function that does the untimed setup (e.g. the forward pass whose
graph a backward-only measurement walks) and returns the closure to time. A :class:`Sampler` wraps one
provider's closure; each call of ``sample()`` is one round's measurement of it, in milliseconds:

* :class:`CpuSampler`: ``time.perf_counter`` around ``inner`` back-to-back calls (``inner`` chosen from the
  warm-up calls so one sample lasts about ``target_ms``), divided by ``inner``.
* :class:`DoBenchSampler`: one ``triton.testing.do_bench`` (L2 flushed before every call, CUDA events around
  each call) per round; the round's value is its median.
* :class:`GraphSampler`: for launch-bound cases. Like ``triton.testing.do_bench_cudagraph`` — ``n``
  back-to-back calls captured in one CUDA graph — except that ``prepare`` runs on the capture stream, so a
  backward pass whose forward ran in ``prepare`` is captured too (autograd runs each backward kernel on the
  stream of its forward op). One round replays the graph ``replays`` times: the value is elapsed / (n·replays).

:func:`interleave` runs the rounds: in every round each provider is sampled once, in an order freshly
shuffled by a seeded ``random.Random``, so drift of the machine (clocks, other jobs, thermal state) hits every
provider alike instead of whichever was timed last. :func:`summarize` gives the median, 20th / 80th
percentiles, minimum and maximum over the rounds.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Summary over rounds (ms): median, 20th / 80th percentiles, min, max; ``samples`` = timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    samples: int
    min_ms: float | None = None
    max_ms: float | None = None
    rounds: int | None = None


def quantiles(samples: list[float], qs=QUANTILES) -> list[float]:
    """Linear-interpolated quantiles (numpy's default method) of a non-empty list."""
    data = sorted(samples)
    out = []
    for q in qs:
        point = q * (len(data) - 1)
        lo, hi = math.floor(point), math.ceil(point)
        out.append(data[lo] + (data[hi] - data[lo]) * (point - lo))
    return out


def summarize(samples: list[float], timer: str, calls: int) -> Timing:
    """Median, p20, p80, min and max of the per-round samples."""
    if not samples:
        raise ValueError("summarize needs at least one sample")
    med, p20, p80 = quantiles(samples)
    return Timing(med, p20, p80, timer, calls, min(samples), max(samples), len(samples))


# ---------------------------------------------------------------------------------------------- samplers
class Sampler:
    """One provider's timed closure; ``sample()`` returns one round's time in ms."""

    timer = "?"

    def __init__(self) -> None:
        self.calls = 0  # timed calls so far

    def sample(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the closure (and any graph) so its memory can be freed."""


class CpuSampler(Sampler):
    timer = "cpu_rounds"

    def __init__(self, prepare: Callable[[], Callable], *, warmup: int = 2, target_ms: float = 2.0,
                 max_inner: int = 1000, clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.clock = clock
        self.fn = prepare()
        estimate_ms = float("inf")
        for _ in range(max(1, warmup)):  # the fastest warm-up call: the first ones pay for caches
            start = clock()
            self.fn()
            estimate_ms = min(estimate_ms, (clock() - start) * 1e3)
        estimate_ms = max(estimate_ms, 1e-6)
        self.inner = max(1, min(max_inner, int(target_ms / estimate_ms)))

    def sample(self) -> float:
        fn, inner = self.fn, self.inner
        start = self.clock()
        for _ in range(inner):
            fn()
        elapsed = self.clock() - start
        self.calls += inner
        return elapsed * 1e3 / inner

    def close(self) -> None:
        self.fn = None


class DoBenchSampler(Sampler):
    timer = "do_bench"

    def __init__(self, prepare: Callable[[], Callable], *, rep_ms: int = 20, warmup_ms: int = 5,
                 first_warmup_ms: int = 25):
        super().__init__()
        self.fn = prepare()
        self.fn()
        torch.cuda.synchronize()
        self.rep_ms, self.warmup_ms, self.first_warmup_ms = rep_ms, warmup_ms, first_warmup_ms

    def sample(self) -> float:
        from triton.testing import do_bench

        warmup = self.first_warmup_ms if self.calls == 0 else self.warmup_ms
        med = do_bench(self.fn, warmup=warmup, rep=self.rep_ms, return_mode="median")
        self.calls += max(1, int(self.rep_ms / max(med, 1e-3)))
        return float(med)

    def close(self) -> None:
        self.fn = None


class GraphSampler(Sampler):
    timer = "cuda_graph"

    def __init__(self, prepare: Callable[[], Callable], *, rep_ms: int = 100, rounds: int = 10, replays: int = 2):
        super().__init__()
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        self.replays = replays
        with torch.cuda.stream(self.stream):
            fn = prepare()
            for _ in range(3):  # compile, autotune and allocate outside the capture
                fn()
            torch.cuda.synchronize()
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record(self.stream)
            for _ in range(5):
                fn()
            self.end.record(self.stream)
            torch.cuda.synchronize()
            estimate = max(self.start.elapsed_time(self.end) / 5, 1e-3)
            self.n = max(1, min(1000, int(rep_ms / max(1, rounds * replays) / estimate)))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                for _ in range(self.n):
                    fn()
            torch.cuda.synchronize()
            self.graph.replay()  # the first replay uploads the graph
            torch.cuda.synchronize()
        self.fn = fn

    def sample(self) -> float:
        with torch.cuda.stream(self.stream):
            self.start.record(self.stream)
            for _ in range(self.replays):
                self.graph.replay()
            self.end.record(self.stream)
        torch.cuda.synchronize()
        self.calls += self.n * self.replays
        return self.start.elapsed_time(self.end) / (self.n * self.replays)

    def close(self) -> None:
        self.graph = None
        self.fn = None


# ---------------------------------------------------------------------------------------------- rounds
@dataclass
class Rounds:
    """What :func:`interleave` measured: per-provider samples, the order of every round, failures."""

    samples: dict[str, list[float]]
    orders: list[list[str]]
    errors: dict[str, BaseException]


def interleave(samplers: Mapping[str, Sampler], rng: random.Random, *, min_rounds: int, max_rounds: int,
               budget_s: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> Rounds:
    """Sample every provider once per round, in an order shuffled afresh each round.

    Rounds go on until at least ``min_rounds`` are done and ``budget_s`` seconds have passed, or
    ``max_rounds`` are done. A provider whose ``sample()`` raises is dropped from later rounds (its error is
    kept); the others go on.
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    live = list(samplers)
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    errors: dict[str, BaseException] = {}
    orders: list[list[str]] = []
    start = clock()
    while live and len(orders) < max_rounds and (len(orders) < min_rounds or clock() - start < budget_s):
        order = list(live)
        rng.shuffle(order)
        orders.append(order)
        for name in order:
            try:
                samples[name].append(samplers[name].sample())
            except Exception as err:  # noqa: BLE001 - one provider failing must not stop the others
                errors[name] = err
                live.remove(name)
    return Rounds(samples, orders, errors)


def round_rng(seed: int, *key: str) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and a case key (deterministic across runs and processes)."""
    return random.Random(":".join((str(seed),) + tuple(key)))


def time_alone(prepare: Callable[[], Callable], *, budget_s: float = 0.5, cuda: bool = False) -> Timing:
    """One closure by itself (no comparison, e.g. the bandwidth probe): a single-provider interleave."""
    sampler = DoBenchSampler(prepare, rep_ms=40) if cuda else CpuSampler(prepare)
    rounds = interleave({"x": sampler}, random.Random(0), min_rounds=5, max_rounds=200 if not cuda else 5,
                        budget_s=0.0 if cuda else budget_s)
    sampler.close()
    if "x" in rounds.errors:
        raise rounds.errors["x"]
    return summarize(rounds.samples["x"], sampler.timer, sampler.calls)


def device_bandwidth_gbps(device: torch.device, *, megabytes: int = 1024, budget_s: float = 0.5) -> float:
    """Achievable memory bandwidth, from a large device-to-device copy (read + write counted)."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    def prepare():
        return lambda: dst.copy_(src)

    timing = time_alone(prepare, budget_s=budget_s, cuda=device.type == "cuda")
    return 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9
