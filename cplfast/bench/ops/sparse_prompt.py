"""Benchmark definition of ``sparse_prompt`` (SPEC §3.1) at PromptIR's three prompt slots.

Training: ``B=8`` 128x128 patches, so every slot's feature is as large as its prompt (no resize), top-1
routing (CPL's SPM) at each slot plus the dense PromptIR mix (``k=N``) at ``prompt1``. Inference: one
512x512 image, so prompts are upsampled 4x. Sweep: ``prompt1`` at feature sides 32..256.
"""

from __future__ import annotations

import torch

from .. import shapes
from ..cases import QUICK_CPU_SKIP, Case, OpBenchmark, OpInputs, Traffic, make_case, per_mode, numel

OP = "sparse_prompt"


def _slot_case(slot: shapes.PromptSlot, group: str, batch: int, image: int, k: int, name: str | None = None,
               sweep_value: int | None = None) -> Case:
    side = image // slot.downscale
    return make_case(OP, name or slot.name, group, sweep_value=sweep_value, B=batch, C=slot.lin_dim, H=side, W=side,
                     N=slot.prompt_len, D=slot.prompt_dim, S=slot.prompt_size, k=k)


class SparsePromptBenchmark(OpBenchmark):
    name = OP
    memory_bound = True
    sweep_label = "feature side H=W (prompt1 slot)"

    def cases(self, quick: bool, device_type: str) -> list[Case]:
        if quick and device_type == "cpu":
            def reduced(group, batch, side, name="prompt1 (reduced)", sweep_value=None):
                skip = () if group == "train" else QUICK_CPU_SKIP
                return make_case(OP, name, group, sweep_value=sweep_value, skip_providers=skip, B=batch, C=48,
                                 H=side, W=side, N=5, D=32, S=16, k=1)

            return [reduced("train", 2, 16), reduced("infer", 1, 32),
                    reduced("sweep", 2, 16, "sweep", 16), reduced("sweep", 2, 32, "sweep", 32)]
        train = [_slot_case(slot, "train", shapes.TRAIN_BATCH, shapes.TRAIN_SIZE, 1) for slot in shapes.PROMPT_SLOTS]
        first = shapes.PROMPT_SLOTS[0]
        train.append(_slot_case(first, "train", shapes.TRAIN_BATCH, shapes.TRAIN_SIZE, first.prompt_len,
                                name=f"{first.name} dense (PromptIR)"))
        infer = [_slot_case(slot, "infer", shapes.INFER_BATCH, shapes.INFER_SIZE, 1) for slot in shapes.PROMPT_SLOTS]
        if quick:
            return train  # quick on a GPU: the SPEC training shapes only
        sweep = [_slot_case(first, "sweep", shapes.TRAIN_BATCH, 2 * side, 1, name="sweep", sweep_value=side)
                 for side in (32, 64, 128, 256)]
        return train + infer + sweep

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> OpInputs:
        b, c, h, w, n, d, s = (case[key] for key in ("B", "C", "H", "W", "N", "D", "S"))
        grad = case.needs_grad
        x = torch.randn(b, c, h, w, device=device, dtype=dtype)
        weight = torch.randn(n, c, device=device, dtype=dtype) * c ** -0.5
        bias = torch.randn(n, device=device, dtype=dtype) * 0.1
        prompts = torch.rand(n, d, s, s, device=device, dtype=dtype)  # PromptIR's uniform init
        leaves = [t.requires_grad_(grad) for t in (x, weight, bias, prompts)]
        return OpInputs(args=tuple(leaves), kwargs=dict(k=case["k"], temperature=1.0, renorm=False),
                        leaves=leaves if grad else ())

    def output(self, result):
        return result[0]

    def traffic(self, case: Case, itemsize: int) -> dict[str, Traffic]:
        b, c, h, w, n, d, s, k = (case[key] for key in ("B", "C", "H", "W", "N", "D", "S", "k"))
        x = numel(b, c, h, w)
        pool = numel(n, d, s, s)
        used = min(n, b * k) * d * s * s  # only selected prompt components must be read
        out = numel(b, d, h, w)
        router = n * c + n + b * n
        resize = 8 * out if (h, w) != (s, s) else 0  # 4 taps, 2 flops each
        fwd = Traffic(itemsize * (x + router + used + out), x + 2 * b * c * n + 2 * b * k * d * s * s + resize)
        bwd = Traffic(itemsize * (out + used + x + pool + router),
                      resize + 4 * b * k * d * s * s + x + 4 * b * c * n)
        return per_mode(fwd, bwd)


BENCHMARK = SparsePromptBenchmark()
