"""Benchmark definition of ``infonce`` (SPEC §3.4): CPR's contrastive term on feature maps.

SPEC §8 shape: ``K=4`` negatives, ``C=64`` channels, 128x128, ``B=8``; anchor and negatives need
gradients, the positive (ground-truth features) does not. Sweep over the feature side.
"""

from __future__ import annotations

import torch

from .. import shapes
from ..cases import QUICK_CPU_SKIP, Case, OpBenchmark, OpInputs, Traffic, make_case, per_mode, numel

OP = "infonce"


class InfoNCEBenchmark(OpBenchmark):
    name = OP
    memory_bound = True
    sweep_label = "feature side H=W"

    def cases(self, quick: bool, device_type: str) -> list[Case]:
        if quick and device_type == "cpu":
            train = make_case(OP, "CPR (reduced)", "train", B=2, K=4, C=16, H=16, W=16)
            return [train] + [make_case(OP, "sweep", "sweep", sweep_value=side, skip_providers=QUICK_CPU_SKIP,
                                        B=2, K=4, C=16, H=side, W=side) for side in (16, 32)]
        b, k, c, size = shapes.TRAIN_BATCH, shapes.INFONCE_NEGATIVES, shapes.INFONCE_CHANNELS, shapes.TRAIN_SIZE
        train = [make_case(OP, "CPR", "train", B=b, K=k, C=c, H=size, W=size)]
        if quick:
            return train
        return train + [make_case(OP, "sweep", "sweep", sweep_value=side, B=b, K=k, C=c, H=side, W=side)
                        for side in (32, 64, 128, 256)]

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> OpInputs:
        b, k, c, h, w = (case[key] for key in ("B", "K", "C", "H", "W"))
        anchor = torch.randn(b, c, h, w, device=device, dtype=dtype).requires_grad_()
        positive = torch.randn(b, c, h, w, device=device, dtype=dtype)
        negatives = torch.randn(k, b, c, h, w, device=device, dtype=dtype).requires_grad_()
        return OpInputs(args=(anchor, positive, negatives), kwargs=dict(temperature=0.1, dim=1, reduction="mean"),
                        leaves=(anchor, negatives))

    def traffic(self, case: Case, itemsize: int) -> dict[str, Traffic]:
        b, k, c, h, w = (case[key] for key in ("B", "K", "C", "H", "W"))
        x = numel(b, c, h, w)
        fwd = Traffic(itemsize * (k + 2) * x, (4 * k + 6) * x)  # norms and dots; read a, p, n_1..K once
        bwd = Traffic(itemsize * (2 * k + 3) * x, (8 * k + 12) * x)  # reread a, p, n; write da, dn
        return per_mode(fwd, bwd)


BENCHMARK = InfoNCEBenchmark()
