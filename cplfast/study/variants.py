"""The variants an equal-budget study trains, and the recipe they share.

Every variant is a :class:`cplfast.train.TrainConfig` made of three layers: :data:`RECIPE` (the same
optimiser, schedule, data stream, patch and batch for all), the variant's own fields in
:data:`VARIANTS` (paper-faithful defaults otherwise: TrainConfig's CPR weight 0.1, temperature 0.1,
two negatives), and the study's overrides (steps, seed, data, device).

=============  ===========================================================================================
variant        what it trains
=============  ===========================================================================================
promptir       PromptIR: dense prompt generation (softmax mix of the prompts), L1
cpl-spm        CPL's ablation "SPM only": sparse top-1 prompt module, L1, no CPR
cpl-cpr        CPL's ablation "CPR only": PromptIR's dense prompts + CPR; each negative borrows another
               image's prompt weights (``cpr_negatives="batch"``; the paper does not say how it makes
               negatives without SPM — this is cplfast's reading)
cpl            CPL: sparse prompt module + CPR with random unselected prompts (the paper's method)
cpl-balanced   CPL + the opt-in anti-collapse options (not in CPL): Switch load balancing 0.01, gate noise 1
pip            PIP (official pip_universal network; SmoothL1 + orthogonality, cplfast's blind router)
dppd           DPPD (prototype assignment + prompt distributions; cplfast's reading, docs/fidelity.md)
=============  ===========================================================================================
"""

from __future__ import annotations

from typing import Any

# Shared by every variant: the demo's small-scale CPU recipe (patch 32, batch 8, peak lr 3e-3, EMA,
# the output convolution zeroed so every model starts as the identity).
RECIPE: dict[str, Any] = dict(
    preset="tiny", patch=32, batch=8, lr=3e-3, min_lr=1e-5, warmup=0.03, weight_decay=1e-4,
    grad_clip=1.0, ema=0.995, zero_init_output=True, save_every=0, log_every=50,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "promptir": dict(prompt="promptir", num_negatives=0),
    "cpl-spm": dict(prompt="cpl", num_negatives=0),
    "cpl-cpr": dict(prompt="promptir", num_negatives=2, cpr_negatives="batch"),
    "cpl": dict(prompt="cpl", num_negatives=2),
    "cpl-balanced": dict(prompt="cpl", num_negatives=2, load_balance=0.01, gate_noise=1.0),
    "pip": dict(prompt="pip", num_negatives=0),
    "dppd": dict(prompt="dppd", num_negatives=0),
}

BASELINE = "promptir"

DESCRIPTIONS = {
    "promptir": "PromptIR (dense prompts)",
    "cpl-spm": "CPL, SPM only",
    "cpl-cpr": "CPL, CPR only (dense prompts)",
    "cpl": "CPL (SPM + CPR)",
    "cpl-balanced": "CPL + load balance + gate noise",
    "pip": "PIP",
    "dppd": "DPPD",
}


def variant_config(name: str, **overrides: Any):
    """The :class:`cplfast.train.TrainConfig` of variant ``name`` with ``overrides`` (steps, seed, ...)."""
    from ..train import TrainConfig

    if name not in VARIANTS:
        raise ValueError(f"unknown study variant {name!r}; choose from {sorted(VARIANTS)}")
    return TrainConfig(**{**RECIPE, **VARIANTS[name], **overrides}).validate()


__all__ = ["BASELINE", "DESCRIPTIONS", "RECIPE", "VARIANTS", "variant_config"]
