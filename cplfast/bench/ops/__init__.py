"""One benchmark definition per fused op (see :class:`cplfast.bench.cases.OpBenchmark`)."""

from __future__ import annotations

from ..cases import OpBenchmark
from .channel_attention import BENCHMARK as _channel_attention
from .infonce import BENCHMARK as _infonce
from .sparse_prompt import BENCHMARK as _sparse_prompt
from .supcon import BENCHMARK as _supcon
from .token_attention import BENCHMARK as _token_attention

OP_BENCHMARKS: dict[str, OpBenchmark] = {
    b.name: b for b in (_sparse_prompt, _channel_attention, _token_attention, _infonce, _supcon)
}

__all__ = ["OP_BENCHMARKS"]
