"""Architecture presets for :class:`cplfast.models.PromptIR`.

``base`` is exactly the official PromptIR (``net/model.py`` with ``decoder=True``): 35,592,263
parameters and 548 state_dict keys for ``prompt="promptir"``. ``small`` and ``tiny`` keep its shape
(four levels, three prompt slots) at lower widths; ``tiny`` trains in minutes on a CPU at 64x64 patches.

Prompt widths and sizes are listed from level 1 (H/2 decoder, next to the full-resolution level) to
level 3 (the latent, H/8): PromptIR's ``prompt1`` / ``prompt2`` / ``prompt3``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptIRConfig:
    """Every width of the network. Feature widths per level are ``dim * (1, 2, 4, 8)``."""

    dim: int = 48
    num_blocks: tuple[int, int, int, int] = (4, 6, 6, 8)
    num_refinement_blocks: int = 4
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.66
    bias: bool = False
    layernorm_type: str = "WithBias"
    in_channels: int = 3
    out_channels: int = 3
    prompt_dims: tuple[int, int, int] = (64, 128, 320)
    prompt_sizes: tuple[int, int, int] = (64, 32, 16)
    prompt_len: int = 5
    # The official model builds six 1x1 convs it never calls (chnl_reduce1-3, reduce_noise_channel_1-3);
    # they are needed only to load official checkpoints strictly.
    official_unused_layers: bool = False
    # PIP / DPPD
    num_degradations: int = 5
    prompt_tokens: int = 4
    embed_dim: int = 64
    # PIP: heads of the prompt-to-prompt block (the official LGM: 2); the selective prompt-to-feature
    # interaction uses heads[2], as officially. pip_router: cplfast's blind router (False = the official
    # network, which needs the degradation labels at test time too).
    pip_heads: int = 2
    pip_router: bool = True
    # DPPD's open choices (no public code; see cplfast.layers.dppd): the paper-closest readings by default
    dppd_prototypes: str = "predefined"  # or "learnable"
    dppd_sampling: str = "assigned"  # or "mixture"
    # CPL extension against routing collapse (not in CPL): noisy top-k gating scale, 0 = off
    gate_noise: float = 0.0
    loss_weights: dict[str, float] = field(default_factory=dict)

    def level_widths(self) -> tuple[int, int, int, int]:
        return (self.dim, 2 * self.dim, 4 * self.dim, 8 * self.dim)

    def validate(self) -> "PromptIRConfig":
        def positive_ints(name: str, values, count: int | None = None) -> None:
            values = (values,) if isinstance(values, int) else tuple(values)
            if count is not None and len(values) != count:
                raise ValueError(f"{name} must hold {count} values, got {values!r}")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise ValueError(f"{name} must be positive ints, got {values!r}")

        positive_ints("dim", self.dim)
        positive_ints("num_blocks", self.num_blocks, 4)
        positive_ints("num_refinement_blocks", self.num_refinement_blocks)
        positive_ints("heads", self.heads, 4)
        positive_ints("prompt_dims", self.prompt_dims, 3)
        positive_ints("prompt_sizes", self.prompt_sizes, 3)
        positive_ints("prompt_len", self.prompt_len)
        positive_ints("in_channels", self.in_channels)
        positive_ints("out_channels", self.out_channels)
        positive_ints("num_degradations", self.num_degradations)
        positive_ints("prompt_tokens", self.prompt_tokens)
        positive_ints("embed_dim", self.embed_dim)
        positive_ints("pip_heads", self.pip_heads)
        if not isinstance(self.pip_router, bool):
            raise ValueError(f"pip_router must be a bool, got {self.pip_router!r}")
        if self.dppd_prototypes not in ("predefined", "learnable"):
            raise ValueError(f"dppd_prototypes must be 'predefined' or 'learnable', got {self.dppd_prototypes!r}")
        if self.dppd_sampling not in ("assigned", "mixture"):
            raise ValueError(f"dppd_sampling must be 'assigned' or 'mixture', got {self.dppd_sampling!r}")
        if isinstance(self.gate_noise, bool) or not isinstance(self.gate_noise, (int, float)) or not self.gate_noise >= 0:
            raise ValueError(f"gate_noise must be a number >= 0, got {self.gate_noise!r}")
        if self.dim % 2:
            raise ValueError(f"dim must be even (Upsample halves 2*dim channels), got {self.dim}")
        if not self.ffn_expansion_factor > 0:
            raise ValueError(f"ffn_expansion_factor must be > 0, got {self.ffn_expansion_factor}")
        widths = self.level_widths()
        for level, (width, heads) in enumerate(zip(widths, self.heads), start=1):
            if width % heads:
                raise ValueError(f"level {level} width {width} must be divisible by heads[{level - 1}]={heads}")
        slot_widths = (widths[1], widths[2], widths[3])  # features entering prompt1, prompt2, prompt3
        for level, (width, prompt_dim) in enumerate(zip(slot_widths, self.prompt_dims), start=1):
            if (width + prompt_dim) % self.heads[2]:
                raise ValueError(
                    f"prompt slot {level}: width {width} + prompt_dims[{level - 1}]={prompt_dim} must be divisible "
                    f"by heads[2]={self.heads[2]} (PromptIR's noise_level{level} block)"
                )
        return self


PRESETS: dict[str, PromptIRConfig] = {
    "base": PromptIRConfig(official_unused_layers=True),
    "small": PromptIRConfig(
        dim=32,
        num_blocks=(2, 3, 3, 4),
        num_refinement_blocks=2,
        prompt_dims=(32, 64, 128),
        prompt_sizes=(32, 16, 8),
    ),
    "tiny": PromptIRConfig(
        dim=16,
        num_blocks=(1, 1, 1, 1),
        num_refinement_blocks=1,
        heads=(1, 1, 2, 2),
        prompt_dims=(16, 32, 64),
        prompt_sizes=(16, 8, 4),
        prompt_tokens=2,
        embed_dim=32,
    ),
}


def make_config(preset: str, **overrides) -> PromptIRConfig:
    """The preset's config with ``overrides`` (field names of :class:`PromptIRConfig`) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    names = {f.name for f in dataclasses.fields(PromptIRConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown PromptIR option(s) {unknown}; valid: {sorted(names)}")
    for key in ("num_blocks", "heads", "prompt_dims", "prompt_sizes"):
        if key in overrides and isinstance(overrides[key], list):
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(PRESETS[preset], **overrides).validate()


__all__ = ["PRESETS", "PromptIRConfig", "make_config"]
