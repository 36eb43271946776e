"""PromptIR: a Restormer U-net with pluggable prompts (PromptIR, CPL, PIP, DPPD or none).

Data flow (``d = config.dim``; widths per level ``d, 2d, 4d, 8d`` at ``H, H/2, H/4, H/8``)::

    x (B,3,H,W) -> patch_embed -> encoder_level1 ─────────────────────────────── skip1 (d)
                 -> down1_2 -> encoder_level2 ────────────────────────────────── skip2 (2d)
                 -> down2_3 -> encoder_level3 ────────────────────────────────── skip3 (4d)
                 -> down3_4 -> latent (8d)
    slot 3 (H/8):  [prompt3] -> noise_level3 -> reduce_noise_level3 (-> 4d) -> up4_3 (-> 2d)
                   cat skip3 -> reduce_chan_level3 (-> 4d) -> decoder_level3
    slot 2 (H/4):  [prompt2] -> noise_level2 -> reduce_noise_level2 (-> 4d) -> up3_2 (-> 2d)
                   cat skip2 -> reduce_chan_level2 (-> 2d) -> decoder_level2
    slot 1 (H/2):  [prompt1] -> noise_level1 -> reduce_noise_level1 (-> 2d) -> up2_1 (-> d)
                   cat skip1 (-> 2d) -> decoder_level1 -> refinement -> output (-> 3) + x

What the slots and skips do per ``prompt`` variant:

* ``"promptir"`` — slot i concatenates ``prompt{i}(feature)`` (:class:`cplfast.PromptGenBlock`, a dense
  softmax mix of ``prompt_len`` learned maps) to the feature; ``noise_level{i}`` is a Restormer block
  over the wider map. ``preset="base"`` is the official model, parameter for parameter. With
  ``num_negatives=K`` (CPR without SPM, the CPL paper's "CPR only" ablation) negative j restores each
  image with the prompt weights of the image j places before it in the batch (``negative_mode="batch"``,
  the only mode for dense prompts; K < B), detached.
* ``"cpl"`` — the same with :class:`cplfast.SparsePromptModule` (top-k routing, same keys). With
  ``num_negatives=K`` it also restores K negatives with mismatched routing for CPR: the encoder runs
  once and only the decoder, from slot 3 on, re-runs, batched over the K negatives.
* ``"pip"`` — the official PIP network (pip_universal's ``PIPNet_Restormer_onskip_inter``): no
  ``noise_level`` blocks; slot 3 is a 1x1 ``chnl_reduce3`` (8d -> 4d), slots 2 and 1 pass the feature
  through; each encoder skip i passes through ``prompt{i}`` (:class:`cplfast.layers.PromptInPrompt`,
  universal prompt, degradation prompt = mean over T, prompt-to-prompt heads ``pip_heads`` = 2) and
  ``interaction{i}`` (:class:`cplfast.layers.SelectivePromptFeatureInteraction`, ``heads[2]`` heads, mix
  init 0.2). ``preset="base"`` uses prompt widths (64, 128, 256) as officially (27,429,510 parameters
  with ``official_unused_layers=True, pip_router=False``). cplfast adds a blind router per prompt
  (``pip_router=True``, default) in place of the official external degradation classifier, so the model
  runs without labels at test time; ``pip_router=False`` needs labels (or ``routing=``) always.
* ``"dppd"`` — ``assignment`` (:class:`cplfast.layers.DegradationPrototypeAssignment`) on the latent
  gives a degradation assignment ``(B,T)``; slot i draws prompt tokens from ``prompt{i}``
  (:class:`cplfast.layers.PromptDistribution`) and fuses them with ``fusion{i}``
  (:class:`cplfast.layers.PromptCrossFusion`) before ``noise_level{i}``.
* ``"none"`` — plain Restormer-style U-net with the same slot blocks and no prompt.

Return convention (the same for every variant)::

    out = model(x)                                  # (B,3,H,W), train and eval alike
    out, aux = model(x, return_aux=True)            # aux: dict
    aux["routing"]  : dict[str, Tensor]  the routing of each prompt module, e.g. {"prompt3": (B,N), ...}
                      ("assignment": (B,T) for dppd; {} for none); feed it back as ``routing=`` to force it
    aux["losses"]   : dict[str, Tensor]  the variant's auxiliary losses, already multiplied by
                      ``model.loss_weights``; ``sum(aux["losses"].values())`` is the regulariser to add
                      (empty for promptir / cpl / none)
    aux["prompt_maps"]: dict[str, Tensor]  the prompt map of each slot (promptir, cpl) or skip (pip),
                      ``(B,D,h,w)``; feed it back as ``prompt_maps=`` to force it
    aux["negatives"]: (K,B,3,H,W), only with ``num_negatives=K`` (cpl, promptir)
    aux["negative_routing"]: dict[str, (K,B,N)], the forced routing that restored each negative
                      (:meth:`cplfast.SparsePromptModule.negative_routing`, drawn independently per slot;
                      ``negative_mode="random"`` by default — the paper's — or ``"ordered"``)

``labels`` (B,) int degradation labels are used by pip (teacher-forced router + cross-entropy) and dppd
(cross-entropy on the assignment), and ignored by the other variants. Inputs need sides that are
multiples of 8; :meth:`PromptIR.restore` handles any size and tiling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..layers import PromptGenBlock, SparsePromptModule
from .presets import make_config
from .restormer import Downsample, OverlapPatchEmbed, TransformerBlock, Upsample, transformer_stage

PROMPT_VARIANTS = ("promptir", "cpl", "pip", "dppd", "none")
PIP_BASE_PROMPT_DIMS = (64, 128, 256)  # official PIP's low_prompt_dims (PromptIR's third is 320)

# cpl's "load_balance" and dppd's terms are off (0) by default: none is in the papers' losses (see
# docs/fidelity.md); a positive weight turns the term on.
# pip: the official trainer adds 0.002 x (0.01 x sum_{i<j} relu(cos)) per prompt, an effective 2e-5 on
# cplfast's orthogonality term; router_ce trains cplfast's blind router (no official counterpart).
DEFAULT_LOSS_WEIGHTS = {
    "cpl": {"load_balance": 0.0},
    "pip": {"orthogonality": 2e-5, "router_ce": 0.1},
    "dppd": {"assignment_ce": 0.0, "kl": 0.0},
}


def _dense_routing(generator: PromptGenBlock, feature: torch.Tensor) -> torch.Tensor:
    """PromptGenBlock's routing ``softmax((gap(x) @ W.T + b) / temperature)`` ``(B,N)``."""
    logits = generator.linear_layer(feature.mean(dim=(2, 3)))
    return torch.softmax(logits / getattr(generator, "temperature", 1.0), dim=1)


def _forced_map(key: str, prompt: torch.Tensor, feature: torch.Tensor, channels: int) -> torch.Tensor:
    want = (feature.shape[0], channels, *feature.shape[-2:])
    if tuple(prompt.shape) != want:
        raise ValueError(f"prompt_maps[{key!r}] must have shape {want} here, got {tuple(prompt.shape)}")
    return prompt.to(feature.dtype)


@dataclass
class _Pass:
    """Per-forward bookkeeping: forced routing in, observed routing and auxiliary losses out."""

    forced: Mapping[str, torch.Tensor]
    labels: torch.Tensor | None
    forced_maps: Mapping[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, torch.Tensor] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    assignment: torch.Tensor | None = None


class PromptIR(nn.Module):
    """PromptIR with pluggable prompts. See the module docstring for the data flow and return values.

    Args:
        prompt: ``"promptir"`` | ``"cpl"`` | ``"pip"`` | ``"dppd"`` | ``"none"``.
        preset: ``"base"`` (official PromptIR) | ``"small"`` | ``"tiny"``; see :mod:`cplfast.models.presets`.
        top_k: prompts kept per image by CPL's sparse prompt module (``cpl`` only).
        **overrides: fields of :class:`~cplfast.models.presets.PromptIRConfig` replacing the preset's.
    """

    def __init__(self, prompt: str = "promptir", preset: str = "base", *, top_k: int = 1, **overrides):
        super().__init__()
        if prompt not in PROMPT_VARIANTS:
            raise ValueError(f"prompt must be one of {PROMPT_VARIANTS}, got {prompt!r}")
        if "official_unused_layers" not in overrides and prompt not in ("promptir", "cpl"):
            overrides["official_unused_layers"] = False
        if prompt == "pip" and preset == "base" and "prompt_dims" not in overrides:
            overrides["prompt_dims"] = PIP_BASE_PROMPT_DIMS
        self._init_args = {"prompt": prompt, "preset": preset, "top_k": top_k, **overrides}
        config = make_config(preset, **overrides)
        self.prompt_type = prompt
        self.preset = preset
        self.config = config
        self.top_k = top_k if prompt == "cpl" else None
        weights = dict(DEFAULT_LOSS_WEIGHTS.get(prompt, {}))
        unknown = sorted(set(config.loss_weights) - set(weights))
        if unknown:
            raise ValueError(f"loss_weights for prompt={prompt!r} take keys {sorted(weights)}, got {unknown}")
        weights.update(config.loss_weights)
        self.loss_weights = weights

        c = config
        d1, d2, d3, d4 = c.level_widths()
        block = dict(ffn_expansion_factor=c.ffn_expansion_factor, bias=c.bias, layernorm_type=c.layernorm_type)
        slot_prompt_dims = c.prompt_dims if prompt in ("promptir", "cpl") else (0, 0, 0)

        self.patch_embed = OverlapPatchEmbed(c.in_channels, d1)
        if prompt in ("promptir", "cpl"):
            self._build_prompt_gen(top_k)
        if c.official_unused_layers:
            self._build_official_unused_layers()

        self.encoder_level1 = transformer_stage(c.num_blocks[0], d1, c.heads[0], **block)
        self.down1_2 = Downsample(d1)
        self.encoder_level2 = transformer_stage(c.num_blocks[1], d2, c.heads[1], **block)
        self.down2_3 = Downsample(d2)
        self.encoder_level3 = transformer_stage(c.num_blocks[2], d3, c.heads[2], **block)
        self.down3_4 = Downsample(d3)
        self.latent = transformer_stage(c.num_blocks[3], d4, c.heads[3], **block)

        p1, p2, p3 = slot_prompt_dims
        self.up4_3 = Upsample(d3)
        self.reduce_chan_level3 = nn.Conv2d(d2 + d3, d3, kernel_size=1, bias=c.bias)
        if prompt == "pip":  # official PIP: a 1x1 conv on the latent instead of the noise_level slots
            self.chnl_reduce3 = nn.Conv2d(d4, d3, kernel_size=1, bias=c.bias)
        else:
            self.noise_level3 = TransformerBlock(d4 + p3, c.heads[2], **block)
            self.reduce_noise_level3 = nn.Conv2d(d4 + p3, d3, kernel_size=1, bias=c.bias)
        self.decoder_level3 = transformer_stage(c.num_blocks[2], d3, c.heads[2], **block)

        self.up3_2 = Upsample(d3)
        self.reduce_chan_level2 = nn.Conv2d(d3, d2, kernel_size=1, bias=c.bias)
        if prompt != "pip":
            self.noise_level2 = TransformerBlock(d3 + p2, c.heads[2], **block)
            self.reduce_noise_level2 = nn.Conv2d(d3 + p2, d3, kernel_size=1, bias=c.bias)
        self.decoder_level2 = transformer_stage(c.num_blocks[1], d2, c.heads[1], **block)

        self.up2_1 = Upsample(d2)
        if prompt != "pip":
            self.noise_level1 = TransformerBlock(d2 + p1, c.heads[2], **block)
            self.reduce_noise_level1 = nn.Conv2d(d2 + p1, d2, kernel_size=1, bias=c.bias)
        self.decoder_level1 = transformer_stage(c.num_blocks[0], d2, c.heads[0], **block)

        self.refinement = transformer_stage(c.num_refinement_blocks, d2, c.heads[0], **block)
        self.output = nn.Conv2d(d2, c.out_channels, kernel_size=3, padding=1, bias=c.bias)

        if prompt == "pip":
            self._build_pip()
        elif prompt == "dppd":
            self._build_dppd()

    # ------------------------------------------------------------------ construction
    def _build_prompt_gen(self, top_k: int) -> None:
        c = self.config
        _, d2, d3, d4 = c.level_widths()
        for level, lin_dim in zip((1, 2, 3), (d2, d3, d4)):
            args = dict(
                prompt_dim=c.prompt_dims[level - 1], prompt_len=c.prompt_len,
                prompt_size=c.prompt_sizes[level - 1], lin_dim=lin_dim,
            )
            if self.prompt_type == "cpl":
                module = SparsePromptModule(**args, top_k=top_k, gate_noise=c.gate_noise,
                                            load_balance=self.loss_weights["load_balance"] > 0)
            else:
                module = PromptGenBlock(**args)
            setattr(self, f"prompt{level}", module)

    def _build_official_unused_layers(self) -> None:
        # Built by the official __init__ and never called in its forward; kept frozen (requires_grad=False)
        # so distributed training needs no find_unused_parameters, and only so official checkpoints load.
        d = self.config.dim
        shapes = {
            "chnl_reduce1": (64, 64), "chnl_reduce2": (128, 128), "chnl_reduce3": (320, 256),
            "reduce_noise_channel_1": (d + 64, d), "reduce_noise_channel_2": (2 * d + 128, 2 * d),
            "reduce_noise_channel_3": (4 * d + 256, 4 * d),
        }
        if self.prompt_type == "pip":  # official PIP: only the reduce_noise_channel_* (chnl_reduce3 is used)
            shapes = {k: v for k, v in shapes.items() if k.startswith("reduce_noise_channel")}
        for name, (cin, cout) in shapes.items():
            conv = nn.Conv2d(cin, cout, kernel_size=1, bias=self.config.bias)
            conv.requires_grad_(False)
            setattr(self, name, conv)

    def _build_pip(self) -> None:
        from ..layers.pip import PromptInPrompt, SelectivePromptFeatureInteraction

        c = self.config
        for level, width in zip((1, 2, 3), c.level_widths()[:3]):
            prompt_dim = c.prompt_dims[level - 1]
            if prompt_dim < width:
                raise ValueError(
                    f"pip: prompt_dims[{level - 1}]={prompt_dim} must be >= the level-{level} width {width} "
                    "(the feature is zero-padded to the prompt width)"
                )
            setattr(self, f"prompt{level}", PromptInPrompt(
                width, prompt_dim, c.prompt_sizes[level - 1], num_degradations=c.num_degradations, heads=c.pip_heads,
                ffn_expansion_factor=c.ffn_expansion_factor, bias=c.bias, router=c.pip_router,
            ))
            setattr(self, f"interaction{level}", SelectivePromptFeatureInteraction(
                width, prompt_dim, c.heads[2], ffn_expansion_factor=c.ffn_expansion_factor, bias=c.bias,
            ))

    def _build_dppd(self) -> None:
        from ..layers.dppd import DegradationPrototypeAssignment, PromptCrossFusion, PromptDistribution

        c = self.config
        _, d2, d3, d4 = c.level_widths()
        self.assignment = DegradationPrototypeAssignment(d4, embed_dim=c.embed_dim, num_degradations=c.num_degradations,
                                                         prototypes=c.dppd_prototypes)
        for level, width in zip((1, 2, 3), (d2, d3, d4)):
            setattr(self, f"prompt{level}", PromptDistribution(c.num_degradations, c.prompt_tokens, width,
                                                               sampling=c.dppd_sampling))
            setattr(self, f"fusion{level}", PromptCrossFusion(width, c.heads[2]))

    # ------------------------------------------------------------------ public helpers
    @property
    def routing_keys(self) -> tuple[str, ...]:
        """Names accepted in ``routing=`` and returned in ``aux["routing"]``."""
        if self.prompt_type in ("promptir", "cpl", "pip"):
            return ("prompt1", "prompt2", "prompt3")
        if self.prompt_type == "dppd":
            return ("assignment",)
        return ()

    def prompt_module_names(self) -> tuple[str, ...]:
        """Top-level children that make up the prompt path (prompt generation + prompt interaction)."""
        if self.prompt_type in ("promptir", "cpl"):
            return tuple(f"{n}{i}" for i in (1, 2, 3) for n in ("prompt", "noise_level", "reduce_noise_level"))
        if self.prompt_type == "pip":
            return tuple(f"{n}{i}" for i in (1, 2, 3) for n in ("prompt", "interaction"))
        if self.prompt_type == "dppd":
            return ("assignment",) + tuple(f"{n}{i}" for i in (1, 2, 3) for n in ("prompt", "fusion"))
        return ()

    def config_dict(self) -> dict:
        """The constructor arguments as a JSON-friendly dict; ``PromptIR.from_config_dict`` rebuilds the model."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._init_args.items()}

    @classmethod
    def from_config_dict(cls, config: Mapping) -> "PromptIR":
        """The inverse of :meth:`config_dict` (weights are not included: load a state_dict after)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        args = dict(config)
        return cls(args.pop("prompt", "promptir"), args.pop("preset", "base"), **args)

    @classmethod
    def from_official(cls, source, *, prompt: str | None = None, top_k: int = 1, key: str | None = None,
                      map_location: str | torch.device = "cpu") -> "PromptIR":
        """The ``base`` model with an official checkpoint loaded strictly; the format is recognised by its keys.

        ``source``: a state_dict, or a path to ``.ckpt`` (Lightning, keys ``net.*``), ``.pth`` / ``.pt`` or
        ``.safetensors``. Files are read with ``torch.load(weights_only=True)`` or safetensors only.

        Recognised formats (:func:`cplfast.models.checkpoint.detect_official_format`):

        * ``"promptir"`` — official PromptIR (va1shn9v/PromptIR), 548 keys including the six 1x1
          convolutions it builds and never calls; ``prompt`` ``"promptir"`` (default) or ``"cpl"``.
        * ``"cplir"`` — the CPL authors' CPLIR (Aitical/CPLIR): the same network without those six
          convolutions, 542 keys; ``prompt`` ``"cpl"`` (default) or ``"promptir"``. The model is built
          with ``official_unused_layers=False``.
        * ``"pip"`` — official PIP (longzilicart/pip_universal, ``PIPNet_Restormer_onskip_inter``), 612
          keys, renamed by :func:`cplfast.models.pip_official.official_pip_to_cplfast` (603 cplfast keys,
          none dropped); ``prompt`` ``"pip"``. Built with ``official_unused_layers=True,
          pip_router=False``: the file has no router, so pass ``labels=`` or ``routing=`` as the
          official code does.

        ``key``: which entry of a BasicSR-style file to load (``"params"`` or ``"params_ema"``); by
        default ``params_ema`` when the file holds it, else ``params``, else the file's only state_dict.
        ``top_k`` applies to ``prompt="cpl"``.

        The recognised format is logged (logger ``cplfast.models``, INFO) and kept on the model as
        ``model.official_source = {"format": ..., "keys": ..., "entry": ...}`` (``entry``: the file entry
        that was loaded, e.g. ``"params_ema"``, or None).
        """
        from .checkpoint import OFFICIAL_FORMATS, detect_official_format, official_state_dict

        state, entry = official_state_dict(source, map_location=map_location, key=key, return_entry=True)
        fmt = detect_official_format(state)
        if fmt is None:
            raise ValueError(
                f"source is not an official checkpoint: {len(state)} keys match none of the formats "
                f"{tuple(OFFICIAL_FORMATS)} (e.g. official PromptIR has 548 keys, CPLIR 542, PIP 612)"
            )
        spec = OFFICIAL_FORMATS[fmt]
        file_keys = len(state)  # the file's count (a PIP file's 612 become 603 when renamed)
        if "convert" in spec:
            state = spec["convert"](state)
        prompt = spec["prompt"] if prompt is None else prompt
        if prompt not in spec["prompts"]:
            raise ValueError(f"prompt must be one of {spec['prompts']} for a {fmt} checkpoint, got {prompt!r}")
        model = cls(prompt=prompt, preset="base", top_k=top_k, **spec["overrides"])
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"source is not an official {fmt} state_dict: "
                f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}"
            )
        for name, value in state.items():
            want = own[name].shape
            if tuple(value.shape) != tuple(want):
                raise ValueError(f"source[{name!r}] has shape {tuple(value.shape)}, expected {tuple(want)}")
        model.load_state_dict(state, strict=True)
        model.official_source = {"format": fmt, "keys": file_keys, "entry": entry}
        logging.getLogger("cplfast.models").info(
            "loaded an official %s checkpoint (%d keys%s) as PromptIR(prompt=%r)", fmt, file_keys,
            f", entry {entry!r}" if entry else "", prompt)
        return model

    def restore(self, image: torch.Tensor, *, tile: int | None = None, overlap: int | None = None,
                routing: Mapping[str, torch.Tensor] | None = None, routing_size: int = 512, **options):
        """Restore an image of any size; see :func:`cplfast.models.inference.restore` (``options``:
        ``max_memory="4GB"``, ``tile_mode="exact"|"blend"``, ``progress``, ``stats``)."""
        from .inference import restore

        return restore(self, image, tile=tile, overlap=overlap, routing=routing, routing_size=routing_size, **options)

    def forward_with_negatives(self, x: torch.Tensor, num_negatives: int, *, labels: torch.Tensor | None = None,
                               negative_mode: str = "random", generator: torch.Generator | None = None,
                               negative_grad: bool = True):
        """``(output (B,3,H,W), negatives (K,B,3,H,W))`` for CPR; ``cpl`` and ``promptir`` (see :meth:`forward`)."""
        out, aux = self(x, labels=labels, num_negatives=num_negatives, negative_mode=negative_mode,
                        generator=generator, negative_grad=negative_grad, return_aux=True)
        return out, aux["negatives"]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, labels: torch.Tensor | None = None,
                routing: Mapping[str, torch.Tensor] | None = None,
                prompt_maps: Mapping[str, torch.Tensor] | None = None, num_negatives: int = 0,
                negative_mode: str = "random", generator: torch.Generator | None = None,
                negative_grad: bool = True, return_aux: bool = False):
        """Restore ``x`` ``(B, in_channels, H, W)`` with H, W multiples of 8.

        Args:
            labels: ``(B,)`` int degradation labels (pip, dppd; ignored otherwise).
            routing: forced routing, a mapping from names in :attr:`routing_keys` to ``(B,N)`` / ``(B,T)``
                weights used instead of the router's (e.g. the routing of the whole image for every tile).
            prompt_maps: forced prompt maps (promptir, cpl, pip), a mapping from ``"prompt1"``..``"prompt3"``
                to ``(B, D, h, w)`` maps of the size the slot expects, used instead of computing them
                (tiled inference passes each tile its crop of the whole image's maps).
            num_negatives: ``K > 0`` (cpl, promptir) also restores K negatives with mismatched routing.
            negative_mode: cpl: ``"random"`` (default, the CPL paper's: unselected prompts drawn at random
                per image, slot and call from ``generator``, default torch's default generator of x's
                device) or ``"ordered"`` (lowest-index unselected prompts first); see
                :meth:`cplfast.SparsePromptModule.negative_routing`. promptir: ignored, negatives always
                borrow other images' prompt weights (``"batch"``, module docstring).
            negative_grad: ``False`` restores the negatives without autograd (no graph, no backward
                through them: what CPL's official code does, and the trainer's default); ``True`` lets
                CPR's gradient reach the prompts that restored them.
            return_aux: return ``(output, aux)`` (see the module docstring) instead of the output.
        """
        self._check_input(x)
        forced = self._check_routing(routing, x.shape[0])
        if labels is not None:
            labels = self._check_labels(labels, x)
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
            raise ValueError(f"num_negatives must be an int >= 0, got {num_negatives!r}")
        if num_negatives and self.prompt_type not in ("cpl", "promptir"):
            raise ValueError(f"num_negatives needs prompt='cpl' or 'promptir', this model has prompt={self.prompt_type!r}")
        if negative_mode not in ("random", "ordered", "batch"):
            raise ValueError(f"negative_mode must be 'random', 'ordered' or 'batch', got {negative_mode!r}")
        if num_negatives and self.prompt_type == "promptir" and num_negatives >= x.shape[0]:
            raise ValueError(f"num_negatives must be < the batch size ({x.shape[0]}) for dense prompts (negative j "
                             f"borrows the prompt weights of the image j places before), got {num_negatives}")
        if num_negatives and prompt_maps:
            raise ValueError("num_negatives cannot be combined with prompt_maps (negatives re-route the prompts)")

        state = _Pass(forced=forced, labels=labels, forced_maps=self._check_prompt_maps(prompt_maps, x.shape[0]))
        skips, latent = self._encode(x, state)
        out = self.output(self._decode(latent, skips, state)) + x
        if not return_aux and not num_negatives:
            return out
        aux = {"routing": state.routing, "losses": state.losses, "prompt_maps": state.maps}
        if num_negatives:
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(negative_grad)):
                negatives, negative_routing = self._negatives(x, latent, skips, state, num_negatives,
                                                              negative_mode, generator)
            aux["negatives"], aux["negative_routing"] = negatives, negative_routing
        return (out, aux) if return_aux else (out, aux["negatives"])

    def _encode(self, x: torch.Tensor, state: _Pass):
        enc1 = self.encoder_level1(self.patch_embed(x))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        skips = [enc1, enc2, enc3]
        if self.prompt_type == "pip":
            skips = [self._pip_skip(level, skip, state) for level, skip in zip((1, 2, 3), skips)]
        elif self.prompt_type == "dppd":
            self._dppd_assign(latent, state)
        return skips, latent

    def _decode(self, latent: torch.Tensor, skips, state: _Pass) -> torch.Tensor:
        """Everything from the deepest prompt slot to the last feature map (before ``output``)."""
        enc1, enc2, enc3 = skips
        feature = self._slot(3, latent, state)
        feature = self.reduce_chan_level3(torch.cat([self.up4_3(feature), enc3], dim=1))
        feature = self._slot(2, self.decoder_level3(feature), state)
        feature = self.reduce_chan_level2(torch.cat([self.up3_2(feature), enc2], dim=1))
        feature = self._slot(1, self.decoder_level2(feature), state)
        feature = torch.cat([self.up2_1(feature), enc1], dim=1)
        return self.refinement(self.decoder_level1(feature))

    def _slot(self, level: int, feature: torch.Tensor, state: _Pass) -> torch.Tensor:
        if self.prompt_type == "pip":
            return self.chnl_reduce3(feature) if level == 3 else feature
        if self.prompt_type in ("promptir", "cpl"):
            feature = torch.cat([feature, self._prompt_map(level, feature, state)], dim=1)
        elif self.prompt_type == "dppd":
            tokens = getattr(self, f"prompt{level}")(state.assignment)
            feature = getattr(self, f"fusion{level}")(feature, tokens)
        feature = getattr(self, f"noise_level{level}")(feature)
        return getattr(self, f"reduce_noise_level{level}")(feature)

    def _prompt_map(self, level: int, feature: torch.Tensor, state: _Pass) -> torch.Tensor:
        key = f"prompt{level}"
        generator = getattr(self, key)
        if key in state.forced_maps:
            prompt = _forced_map(key, state.forced_maps[key], feature, generator.prompt_param.shape[2])
            routing = state.forced.get(key)
        elif key in state.forced:
            routing = state.forced[key]
            prompt = generator.prompt_from_routing(routing, tuple(feature.shape[-2:]))
            if isinstance(generator, SparsePromptModule):
                generator.last_routing = routing
        else:
            prompt = generator(feature)  # a module call, so hooks (summary, profilers) see it
            if isinstance(generator, SparsePromptModule):
                routing = generator.last_routing
                for term, value in generator.last_aux.items():
                    weight = self.loss_weights.get(term, 0.0)
                    if weight:
                        state.losses[f"{key}.{term}"] = weight * value
            else:  # the dense block keeps no routing: recompute it from the pooled feature (cheap)
                routing = _dense_routing(generator, feature)
        if routing is not None:
            state.routing[key] = routing
        state.maps[key] = prompt
        return prompt

    def _pip_skip(self, level: int, skip: torch.Tensor, state: _Pass) -> torch.Tensor:
        from .variants import pip_skip

        return pip_skip(self, level, skip, state)

    def _dppd_assign(self, latent: torch.Tensor, state: _Pass) -> None:
        from .variants import dppd_assign

        dppd_assign(self, latent, state)

    def _negatives(self, x, latent, skips, state: _Pass, count: int, mode: str = "random",
                   generator: torch.Generator | None = None):
        """K negatives: the decoder from slot 3 re-run once, batched, with mismatched routing at every slot."""
        batch = x.shape[0]
        if self.prompt_type == "promptir":  # dense prompts: image b takes image (b - j)'s weights
            negative_routing = {key: torch.stack([state.routing[key].detach().roll(j, 0) for j in range(1, count + 1)])
                                for key in self.routing_keys}
        else:
            negative_routing = self._sparse_negative_routing(state, count, mode, generator)

        def repeat(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(0).expand(count, *t.shape).reshape(count * t.shape[0], *t.shape[1:])

        negative_state = _Pass(forced={k: v.flatten(0, 1) for k, v in negative_routing.items()}, labels=None)
        sparse_modules = [getattr(self, key) for key in self.routing_keys if self.prompt_type == "cpl"]
        kept = [m.last_routing for m in sparse_modules]
        decoded = self._decode(repeat(latent), [repeat(s) for s in skips], negative_state)
        for module, routing in zip(sparse_modules, kept):
            module.last_routing = routing  # last_routing describes the positive pass
        negatives = self.output(decoded) + repeat(x)
        return negatives.view(count, batch, *negatives.shape[1:]), negative_routing

    def _sparse_negative_routing(self, state: _Pass, count: int, mode: str, generator) -> dict[str, torch.Tensor]:
        """cpl: per slot, :meth:`cplfast.SparsePromptModule.negative_routing` of the router's choice."""
        for level in (1, 2, 3):
            limit = getattr(self, f"prompt{level}").max_negatives()
            if count > limit:
                raise ValueError(
                    f"num_negatives must be <= {limit} (prompt_len={self.config.prompt_len}, top_k={self.top_k}), "
                    f"got {count}"
                )
        if mode == "batch":
            raise ValueError("negative_mode='batch' is for dense prompts (promptir); cpl takes 'random' or 'ordered'")

        def slot_generator(slot: int):  # per-image seeds: a distinct stream per slot
            return generator * 4 + slot if isinstance(generator, torch.Tensor) else generator

        return {
            key: getattr(self, key).negative_routing(state.routing[key], count, mode=mode,
                                                     generator=slot_generator(slot))
            for slot, key in enumerate(self.routing_keys)
        }

    # ------------------------------------------------------------------ validation
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or x.shape[2] % 8 or x.shape[3] % 8 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(
                f"x must have a non-empty batch and H, W positive multiples of 8, got {tuple(x.shape)}; "
                "use model.restore(image) for any size"
            )

    def _check_routing(self, routing, batch: int) -> dict[str, torch.Tensor]:
        if routing is None:
            return {}
        if not isinstance(routing, Mapping):
            raise TypeError(f"routing must be a mapping from {self.routing_keys} to tensors, got {type(routing).__name__}")
        unknown = sorted(set(routing) - set(self.routing_keys))
        if unknown:
            raise ValueError(f"routing keys must be among {self.routing_keys} for prompt={self.prompt_type!r}, got {unknown}")
        width = self.config.num_degradations if self.prompt_type in ("pip", "dppd") else self.config.prompt_len
        checked = {}
        for key, value in routing.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"routing[{key!r}] must be a floating-point tensor")
            if value.dim() == 1:
                value = value.unsqueeze(0)
            if value.dim() != 2 or value.shape[1] != width or value.shape[0] not in (1, batch):
                raise ValueError(
                    f"routing[{key!r}] must have shape ({batch}, {width}) or (1, {width}), got {tuple(value.shape)}"
                )
            checked[key] = value.expand(batch, width)
        return checked

    def _check_prompt_maps(self, prompt_maps, batch: int) -> dict[str, torch.Tensor]:
        if prompt_maps is None:
            return {}
        if self.prompt_type not in ("promptir", "cpl", "pip"):
            raise ValueError(f"prompt_maps needs prompt in ('promptir', 'cpl', 'pip'), this model has {self.prompt_type!r}")
        if not isinstance(prompt_maps, Mapping):
            raise TypeError(f"prompt_maps must be a mapping from prompt1..prompt3 to tensors, got {type(prompt_maps).__name__}")
        allowed = ("prompt1", "prompt2", "prompt3")
        unknown = sorted(set(prompt_maps) - set(allowed))
        if unknown:
            raise ValueError(f"prompt_maps keys must be among {allowed}, got {unknown}")
        checked = {}
        for key, value in prompt_maps.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 4:
                raise TypeError(f"prompt_maps[{key!r}] must be a floating-point (B, D, h, w) tensor")
            if value.shape[0] not in (1, batch):
                raise ValueError(f"prompt_maps[{key!r}] must have batch {batch} or 1, got {tuple(value.shape)}")
            checked[key] = value.expand(batch, *value.shape[1:])
        return checked

    def _check_labels(self, labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = self.config.num_degradations
        if not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must be a tensor of class indices (B,) or float weights (B, {t})")
        if labels.is_floating_point():
            if labels.shape != (x.shape[0], t):
                raise ValueError(f"float labels must have shape ({x.shape[0]}, {t}), got {tuple(labels.shape)}")
            return labels
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        if self.prompt_type in ("pip", "dppd") and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= t
        ):
            raise ValueError(f"labels must be class indices in [0, {t - 1}]")
        return labels

    def extra_repr(self) -> str:
        return f"prompt={self.prompt_type!r}, preset={self.preset!r}" + (
            f", top_k={self.top_k}" if self.top_k is not None else ""
        )


__all__ = ["PROMPT_VARIANTS", "PromptIR"]
