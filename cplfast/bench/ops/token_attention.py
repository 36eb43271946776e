"""Benchmark definition of ``prompt_token_attention`` (SPEC §3.3): DPPD's CrossFusion.

Training (``B=8``, 128x128): the three fusion slots (widths 96/192/384, 4 heads, so ``d = 24/48/96``,
over ``L = 64², 32², 16²`` pixels) attending to ``M = 4`` prompt tokens; q, k, v have the layer's
layout (``(B, L, h, d)`` transposed to ``(B, h, L, d)``, not contiguous). Inference: one 512x512 image.
An extra provider times ``F.scaled_dot_product_attention`` (SPEC §8: the kernel must match it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import shapes
from ..cases import QUICK_CPU_SKIP, Case, OpBenchmark, OpInputs, Traffic, make_case, per_mode, numel

OP = "prompt_token_attention"


def _case(name: str, group: str, batch: int, side: int, width: int, heads: int, tokens: int,
          sweep_value: int | None = None, skip_providers: tuple[str, ...] = ()) -> Case:
    return make_case(OP, name, group, sweep_value=sweep_value, skip_providers=skip_providers, B=batch, h=heads,
                     L=side * side, M=tokens, d=width // heads)


def _layer_layout(b: int, h: int, length: int, d: int, device, dtype, grad: bool) -> torch.Tensor:
    return torch.randn(b, length, h, d, device=device, dtype=dtype).transpose(1, 2).detach().requires_grad_(grad)


def sdpa(q, k, v, *, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class TokenAttentionBenchmark(OpBenchmark):
    name = OP
    memory_bound = True
    sweep_label = "feature side H=W, L=H*W (fusion1 shape)"

    def cases(self, quick: bool, device_type: str) -> list[Case]:
        if quick and device_type == "cpu":
            return [
                _case("fusion (reduced)", "train", 2, 16, 32, 2, 4),
                _case("fusion (reduced)", "infer", 1, 32, 32, 2, 4, skip_providers=QUICK_CPU_SKIP),
                _case("sweep", "sweep", 2, 16, 32, 2, 4, sweep_value=16, skip_providers=QUICK_CPU_SKIP),
                _case("sweep", "sweep", 2, 32, 32, 2, 4, sweep_value=32, skip_providers=QUICK_CPU_SKIP),
            ]
        m = shapes.DPPD_TOKENS
        train = [_case(name, "train", shapes.TRAIN_BATCH, shapes.TRAIN_SIZE // ds, width, heads, m)
                 for name, ds, width, heads in shapes.DPPD_FUSIONS]
        infer = [_case(name, "infer", shapes.INFER_BATCH, shapes.INFER_SIZE // ds, width, heads, m)
                 for name, ds, width, heads in shapes.DPPD_FUSIONS]
        if quick:
            return train  # quick on a GPU: the SPEC training shapes only
        _, _, width, heads = shapes.DPPD_FUSIONS[0]
        sweep = [_case("sweep", "sweep", shapes.TRAIN_BATCH, side, width, heads, m, sweep_value=side)
                 for side in (32, 64, 128, 256)]
        return train + infer + sweep

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> OpInputs:
        b, h, length, m, d = (case[key] for key in ("B", "h", "L", "M", "d"))
        grad = case.needs_grad
        q = _layer_layout(b, h, length, d, device, dtype, grad)
        k = _layer_layout(b, h, m, d, device, dtype, grad)
        v = _layer_layout(b, h, m, d, device, dtype, grad)
        return OpInputs(args=(q, k, v), kwargs=dict(scale=None), leaves=(q, k, v) if grad else ())

    def extra_providers(self):
        return {"sdpa": sdpa}

    def traffic(self, case: Case, itemsize: int) -> dict[str, Traffic]:
        b, h, length, m, d = (case[key] for key in ("B", "h", "L", "M", "d"))
        q = numel(b, h, length, d)
        kv = numel(b, h, m, d)
        fwd = Traffic(itemsize * (2 * q + 2 * kv), 4 * b * h * length * m * d)  # read q, k, v; write out
        bwd = Traffic(itemsize * (3 * q + 4 * kv), 8 * b * h * length * m * d)  # read q, dout; write dq, dk, dv
        return per_mode(fwd, bwd)


BENCHMARK = TokenAttentionBenchmark()
