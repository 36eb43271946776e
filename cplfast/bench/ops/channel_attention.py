"""Benchmark definition of ``topm_channel_attention`` (SPEC §3.2).

Training (``B=8``, 128x128): PIP's selective prompt-feature interaction on skips 1-3 (the official
network's prompt widths 64/128/256, 4 heads, so ``c = 16/32/64`` over ``L = 128², 64², 32²``, four
top-m fractions with a learnable mix), and Restormer's MDTA (``fractions=None``) at level 1 (``c=48``) and in the refinement
blocks (``c=96``). Inference: the PIP shapes of one 512x512 image. Sweep: ``pip2`` over feature sides.
"""

from __future__ import annotations

import torch

from .. import shapes
from ..cases import QUICK_CPU_SKIP, Case, OpBenchmark, OpInputs, Traffic, make_case, per_mode, numel

OP = "topm_channel_attention"
FRACTIONS = (1 / 2, 2 / 3, 3 / 4, 4 / 5)


def _case(name: str, group: str, batch: int, side: int, width: int, heads: int, variant: str,
          sweep_value: int | None = None) -> Case:
    return make_case(OP, name, group, sweep_value=sweep_value, B=batch, h=heads, c=width // heads, L=side * side,
                     variant=variant)


class ChannelAttentionBenchmark(OpBenchmark):
    name = OP
    memory_bound = True
    sweep_label = "feature side H=W, L=H*W (pip2 shape)"

    def cases(self, quick: bool, device_type: str) -> list[Case]:
        if quick and device_type == "cpu":
            skip = dict(skip_providers=QUICK_CPU_SKIP)
            return [
                make_case(OP, "pip (reduced)", "train", B=2, h=2, c=16, L=16 * 16, variant="topm"),
                make_case(OP, "pip (reduced)", "infer", **skip, B=1, h=2, c=16, L=32 * 32, variant="topm"),
                make_case(OP, "sweep", "sweep", sweep_value=16, **skip, B=2, h=2, c=16, L=16 * 16, variant="topm"),
                make_case(OP, "sweep", "sweep", sweep_value=32, **skip, B=2, h=2, c=16, L=32 * 32, variant="topm"),
            ]
        b, size = shapes.TRAIN_BATCH, shapes.TRAIN_SIZE
        train = [_case(name, "train", b, size // ds, width, heads, "topm")
                 for name, ds, width, heads in shapes.PIP_INTERACTIONS]
        level1 = shapes.LEVELS[0]
        for name, ds, width, heads in (level1, shapes.REFINEMENT):
            train.append(_case(f"{name} MDTA", "train", b, size // ds, width, heads, "mdta"))
        infer = [_case(name, "infer", shapes.INFER_BATCH, shapes.INFER_SIZE // ds, width, heads, "topm")
                 for name, ds, width, heads in shapes.PIP_INTERACTIONS]
        if quick:
            return train  # quick on a GPU: the SPEC training shapes only
        _, _, width, heads = shapes.PIP_INTERACTIONS[1]
        sweep = [_case("sweep", "sweep", b, side, width, heads, "topm", sweep_value=side)
                 for side in (32, 64, 128, 256)]
        return train + infer + sweep

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> OpInputs:
        b, h, c, length = case["B"], case["h"], case["c"], case["L"]
        grad = case.needs_grad
        q, k, v = (torch.randn(b, h, c, length, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3))
        temperature = (1 + 0.1 * torch.randn(h, device=device, dtype=dtype)).requires_grad_(grad)
        leaves = [q, k, v, temperature]
        if case["variant"] == "mdta":
            kwargs = dict(fractions=None, mix=None)
        else:
            mix = torch.full((len(FRACTIONS),), 1 / len(FRACTIONS), device=device, dtype=dtype).requires_grad_(grad)
            leaves.append(mix)
            kwargs = dict(fractions=FRACTIONS, mix=mix)
        return OpInputs(args=(q, k, v, temperature), kwargs=kwargs, leaves=leaves if grad else ())

    def traffic(self, case: Case, itemsize: int) -> dict[str, Traffic]:
        b, h, c, length = case["B"], case["h"], case["c"], case["L"]
        e = numel(b, h, c, length)
        gram = 2 * b * h * c * c * length  # one (c x c) = (c x L) @ (L x c) product
        fwd = Traffic(itemsize * 4 * e, 2 * gram + 4 * e)  # read q, k, v; write out
        bwd = Traffic(itemsize * 7 * e, 4 * gram + 4 * e)  # read q, k, v, dout; write dq, dk, dv
        return per_mode(fwd, bwd)


BENCHMARK = ChannelAttentionBenchmark()
