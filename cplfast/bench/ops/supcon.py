"""Benchmark definition of ``supcon`` (SPEC §3.5): supervised contrastive loss over N embeddings.

SPEC §8: ``N=16384, D=256`` in every mode, and ``N=131072`` (forward+backward only), where the eager
reference's N x N similarity matrix (64 GiB in fp32) cannot fit. Labels are 5 degradation classes.
Compute-bound (``2 N² D`` flops against ``N D`` bytes): reported in TFLOP/s rather than GB/s.
"""

from __future__ import annotations

import torch

from .. import shapes
from ..cases import FULL, QUICK_CPU_SKIP, Case, OpBenchmark, OpInputs, Traffic, make_case, per_mode

OP = "supcon"


class SupConBenchmark(OpBenchmark):
    name = OP
    memory_bound = False
    sweep_label = "N (number of embeddings)"

    def cases(self, quick: bool, device_type: str) -> list[Case]:
        classes = shapes.SUPCON_CLASSES
        if quick and device_type == "cpu":
            return [
                make_case(OP, "prompts (reduced)", "train", N=256, D=32, classes=classes),
                make_case(OP, "sweep", "sweep", sweep_value=256, skip_providers=QUICK_CPU_SKIP, N=256, D=32,
                          classes=classes),
                make_case(OP, "sweep", "sweep", sweep_value=512, skip_providers=QUICK_CPU_SKIP, N=512, D=32,
                          classes=classes),
            ]
        d = shapes.SUPCON_DIM
        train = [
            make_case(OP, "N=16k", "train", N=shapes.SUPCON_N, D=d, classes=classes),
            make_case(OP, "N=131k", "train", only_modes=(FULL,), N=shapes.SUPCON_N_LARGE, D=d, classes=classes),
        ]
        if quick:
            return train
        return train + [make_case(OP, "sweep", "sweep", sweep_value=n, N=n, D=d, classes=classes)
                        for n in (2048, 4096, 8192, 16384, 32768)]

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> OpInputs:
        n, d = case["N"], case["D"]
        z = torch.randn(n, d, device=device, dtype=dtype).requires_grad_()
        labels = torch.randint(0, case["classes"], (n,), device=device)
        return OpInputs(args=(z, labels), kwargs=dict(temperature=0.1, reduction="mean"), leaves=(z,))

    def traffic(self, case: Case, itemsize: int) -> dict[str, Traffic]:
        n, d = case["N"], case["D"]
        labels = 8 * n
        fwd = Traffic(itemsize * n * d + labels, 2 * n * n * d)  # S = z z^T, one tile at a time
        bwd = Traffic(2 * itemsize * n * d + labels, 4 * n * n * d)  # dz = dS z + dS^T z (S recomputed: +2N²D)
        return per_mode(fwd, bwd)

    def eager_bytes(self, case: Case, itemsize: int) -> int:
        n = case["N"]
        return n * n * (4 * itemsize + 4)  # S, its masked copy, products, and bool masks


BENCHMARK = SupConBenchmark()
