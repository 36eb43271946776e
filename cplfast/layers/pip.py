"""PIP — Prompt-In-Prompt learning (arXiv 2312.05038), SPEC §4.3 and §4.4.

* :class:`PromptInPrompt` builds a *universal prompt* from a degradation-aware prompt (one vector per
  degradation, mixed by a blind router or by labels) and a basic restoration prompt, fused by a
  prompt-to-prompt channel cross-attention (Restormer's MDTA form).
* :class:`SelectivePromptFeatureInteraction` lets a feature map select from that prompt through
  top-m sparse channel attention (PIP's selective prompt-to-feature interaction).

Both call :func:`cplfast.functional.topm_channel_attention`, so they run the Triton kernel on CUDA.
Submodule and parameter names follow the official PIP code (``detask_prompt_param``,
``low_prompt_param``, ``LGM``, ``outconv``; ``norm11``, ``norm12``, ``attn``, ``norm2``, ``ffn``,
``reduce_channel``), so its checkpoints map onto these layers
(:func:`cplfast.models.pip_official.official_pip_to_cplfast` renames the rest). The router of the blind
mode is cplfast's: the official code takes the degradation class from the data or from a separately
trained classifier, at test time too (``router=False`` reproduces that).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from . import _checks
from .blocks import DualGateFFN, GatedDconvFFN, LayerNorm2d

DEFAULT_FRACTIONS = (1 / 2, 2 / 3, 3 / 4, 4 / 5)


def _check_heads(dim_name: str, dim: int, heads: int) -> None:
    _checks.positive_int("heads", heads)
    if dim % heads:
        raise ValueError(f"{dim_name}={dim} must be divisible by heads={heads}")


class ChannelCrossAttention(nn.Module):
    """Channel ("transposed") cross-attention: queries from ``x_q``, keys/values from ``x_kv``.

    ``q = dwconv3x3(conv1x1(x_q))``, ``(k, v) = dwconv3x3(conv1x1(x_kv))``, split into ``heads`` groups
    of ``c = dim / heads`` channels over ``L = H*W``; then
    ``out = project_out(topm_channel_attention(q, k, v, temperature, fractions, mix))``.
    ``fractions=None`` is plain MDTA; otherwise ``mix`` (one learnable weight per fraction, each initialised
    to ``mix_init``, 0.2 as in the official PIP code, so the weights start summing to 0.8 for four
    fractions) combines the top-m softmaxes. ``x_q`` may have batch 1 (a shared prompt): it is computed once and
    broadcast over the batch of ``x_kv``.
    """

    def __init__(self, dim: int, heads: int, bias: bool = False, fractions: Sequence[float] | None = None,
                 mix_init: float = 0.2):
        super().__init__()
        self.num_heads = heads
        self.fractions = None if fractions is None else tuple(float(f) for f in fractions)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.q_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=bias)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.kv_dwconv = nn.Conv2d(dim * 2, dim * 2, kernel_size=3, padding=1, groups=dim * 2, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        if self.fractions is None:
            self.register_parameter("mix", None)
        else:
            self.mix = nn.Parameter(torch.full((len(self.fractions),), float(mix_init)))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = t.shape
        return t.reshape(b, self.num_heads, c // self.num_heads, h * w)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_kv.shape
        q = self._heads(self.q_dwconv(self.q(x_q)))
        k, v = self.kv_dwconv(self.kv(x_kv)).chunk(2, dim=1)
        q = q.expand(b, -1, -1, -1)
        out = functional.topm_channel_attention(
            q, self._heads(k), self._heads(v), self.temperature.view(-1), fractions=self.fractions, mix=self.mix
        )
        return self.project_out(out.reshape(b, c, h, w))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The official top-m attention stores its four mixing weights as attn1..attn4 of shape (1,).
        official = [f"{prefix}attn{j + 1}" for j in range(4)]
        if self.fractions is not None and len(self.fractions) == 4 and all(key in state_dict for key in official):
            state_dict[f"{prefix}mix"] = torch.cat([state_dict.pop(key).reshape(1) for key in official])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PromptCrossBlock(nn.Module):
    """Prompt-to-prompt transformer block (PIP's ``LGM``): the basic prompt queries the semantic prompt.

    ``y = x_q + attn(norm11(x_q), norm12(x_kv))``; ``out = y + ffn(norm2(y))`` (MDTA + gated-Dconv FFN).
    """

    def __init__(self, dim: int, heads: int, ffn_expansion_factor: float = 2.66, bias: bool = False):
        super().__init__()
        self.norm11 = LayerNorm2d(dim)
        self.norm12 = LayerNorm2d(dim)
        self.attn = ChannelCrossAttention(dim, heads, bias, fractions=None)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GatedDconvFFN(dim, ffn_expansion_factor, bias)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        y = x_q + self.attn(self.norm11(x_q), self.norm12(x_kv))
        return y + self.ffn(self.norm2(y))


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, or zero-pad up to ``channels``."""
    c = x.shape[1]
    if c >= channels:
        return x[:, :channels]
    return F.pad(x, (0, 0, 0, 0, 0, channels - c))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PromptInPrompt(nn.Module):
    """Universal prompt from degradation-aware and basic restoration prompts (PIP, SPEC §4.3).

    For x ``(B, in_dim, H, W)``, T degradations, prompt_dim D and prompt_size S::

        r        = softmax(router(mean_HW x))                    (B,T)  blind routing
        w        = one_hot(labels) if teacher forcing else r     (B,T)
        p_deg    = (w @ P_deg) / T                               (B,D)  P_deg = detask_prompt_param (T,D)
        semantic = resize(x, S×S)[:, :D] (zero-padded if C < D) * p_deg
        u        = LGM(basic, semantic)                          (B,D,S,S)  basic = low_prompt_param
        out      = outconv(resize(u, H×W))                       (B,D,H,W)

    ``p_deg`` is the MEAN over the T terms ``w_t P_t``, as in the official code (which averages the
    ``(B, T, D, 1, 1)`` product over T): with one-hot labels it is ``P_label / T``, not ``P_label``.

    Labels (class indices ``(B,)`` or float weights ``(B,T)`` for composites) teacher-force the mix
    only in training (``teacher_forcing=True``); in eval the router always decides (blind). The router
    is cplfast's replacement for the official code's external degradation classifier: the official
    network has no router and takes the class from the data (training) or from a separately trained
    classifier (testing). ``router=False`` builds the official layer: no router, labels required in
    training and eval alike (or forced weights through :class:`cplfast.models.PromptIR`'s ``routing=``).
    Labels, whenever given and a router exists, also give the router a cross-entropy.

    Auxiliary terms, set by every forward in ``last_aux`` (add them to the training loss yourself):

    * ``last_aux["router_ce"]``: cross-entropy of the router against the labels (only when labels given);
    * ``last_aux["orthogonality"]``: :meth:`orthogonality_loss`, ``sum_{i<j} relu(cos(P_i, P_j))``.

    ``last_routing`` holds the router probabilities ``(B,T)`` and ``last_logits`` its logits (without a
    router: the label weights and None).
    """

    def __init__(
        self,
        in_dim: int,
        prompt_dim: int,
        prompt_size: int,
        num_degradations: int = 5,
        heads: int = 2,
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        teacher_forcing: bool = True,
        router: bool = True,
    ):
        super().__init__()
        if not isinstance(router, bool):
            raise TypeError(f"router must be a bool, got {type(router).__name__}")
        for name, value in (("in_dim", in_dim), ("prompt_dim", prompt_dim), ("prompt_size", prompt_size),
                            ("num_degradations", num_degradations)):
            _checks.positive_int(name, value)
        _check_heads("prompt_dim", prompt_dim, heads)
        self.in_dim = in_dim
        self.prompt_size = prompt_size
        self.num_degradations = num_degradations
        self.teacher_forcing = bool(teacher_forcing)
        self.detask_prompt_param = nn.Parameter(torch.randn(1, num_degradations, prompt_dim, 1, 1))
        self.low_prompt_param = nn.Parameter(torch.randn(1, prompt_dim, prompt_size, prompt_size))
        if router:
            self.router = nn.Linear(in_dim, num_degradations)
        else:
            self.register_module("router", None)
        self.LGM = PromptCrossBlock(prompt_dim, heads, ffn_expansion_factor, bias)
        self.outconv = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)
        self.last_routing: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self.last_aux: dict[str, torch.Tensor] = {}

    @property
    def prompt_dim(self) -> int:
        return self.low_prompt_param.shape[1]

    @property
    def degradation_prompts(self) -> torch.Tensor:
        """The degradation-aware prompts as ``(T, D)`` (a view of ``detask_prompt_param``)."""
        return self.detask_prompt_param.view(self.num_degradations, self.prompt_dim)

    def orthogonality_loss(self) -> torch.Tensor:
        """``sum_{i<j} relu(cos(P_i, P_j))`` over the degradation prompts (0 when pairwise orthogonal or opposed)."""
        p = F.normalize(self.degradation_prompts, dim=1, eps=1e-12)
        return torch.relu(p @ p.T).triu(diagonal=1).sum()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _checks.feature_map("x", x, self.in_dim, f"(B, in_dim, H, W) with in_dim = {self.in_dim}")
        b, _, h, w = x.shape
        aux: dict[str, torch.Tensor] = {}
        if self.router is None:
            if labels is None:
                raise ValueError(
                    "labels are required: this PromptInPrompt has no router (router=False, the official "
                    "network); pass the degradation labels, or forced routing weights to the model"
                )
            weights = _checks.label_weights(labels, b, self.num_degradations, x.device, x.dtype)
            self.last_logits, self.last_routing = None, weights
        else:
            logits = self.router(x.mean(dim=(2, 3)))
            routing = torch.softmax(logits, dim=1)
            self.last_logits, self.last_routing = logits, routing
            weights = routing
            if labels is not None:
                target = _checks.label_weights(labels, b, self.num_degradations, x.device, logits.dtype)
                aux["router_ce"] = _checks.soft_cross_entropy(torch.log_softmax(logits, dim=1), target)
                if self.training and self.teacher_forcing:
                    weights = target
        aux["orthogonality"] = self.orthogonality_loss()
        self.last_aux = aux

        degradation_prompt = (weights @ self.degradation_prompts) / self.num_degradations
        feature = _resize(_match_channels(x, self.prompt_dim), (self.prompt_size, self.prompt_size))
        semantic = feature * degradation_prompt[:, :, None, None]
        universal = self.LGM(self.low_prompt_param, semantic)
        return self.outconv(_resize(universal, (h, w)))

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, prompt_dim={self.prompt_dim}, prompt_size={self.prompt_size}, "
                f"num_degradations={self.num_degradations}, teacher_forcing={self.teacher_forcing}, "
                f"router={self.router is not None}")


class SelectivePromptFeatureInteraction(nn.Module):
    """PIP's selective prompt-to-feature interaction (SPEC §4.4).

    x ``(B, dim, H, W)``, prompt ``(B, prompt_dim, H, W)``; with ``xn = norm11(x)``, ``pn = norm12(prompt)``
    and D = prompt_dim::

        q_in = xn[:, :D]                 if dim >= D   (the other dim - D channels pass through)
               zero-pad(xn, D channels)  if dim <  D
        y    = q_in + attn(q_in, pn)     attn = top-m channel cross-attention, q from the feature,
                                         k/v from the prompt (topm_channel_attention with learnable mix)
        y    = cat(y, xn[:, D:])         if dim > D
               reduce_channel(y)         if dim < D   (1x1 conv D -> dim)
        out  = y + ffn(norm2(y))         dual-gate FFN

    As in the official code the residual is the normalised feature. Returns ``(B, dim, H, W)``.
    """

    def __init__(
        self,
        dim: int,
        prompt_dim: int,
        heads: int,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        mix_init: float = 0.2,
    ):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("prompt_dim", prompt_dim)
        _check_heads("prompt_dim", prompt_dim, heads)
        fractions = functional._fractions(fractions, prompt_dim // heads)
        if fractions is None:
            raise ValueError("fractions must be a non-empty sequence of numbers in (0, 1], got None")
        self.dim = dim
        self.prompt_dim = prompt_dim
        self.norm11 = LayerNorm2d(dim)
        self.norm12 = LayerNorm2d(prompt_dim)
        self.attn = ChannelCrossAttention(prompt_dim, heads, bias, fractions=fractions, mix_init=mix_init)
        if dim < prompt_dim:
            self.reduce_channel = nn.Conv2d(prompt_dim, dim, kernel_size=1, bias=False)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = DualGateFFN(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        _checks.feature_map("x", x, self.dim, f"(B, dim, H, W) with dim = {self.dim}")
        _checks.feature_map("prompt", prompt, self.prompt_dim, f"(B, prompt_dim, H, W) with prompt_dim = {self.prompt_dim}")
        if prompt.shape[0] != x.shape[0] or prompt.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"prompt must have the batch and spatial size of x: expected "
                             f"({x.shape[0]}, {self.prompt_dim}, {x.shape[2]}, {x.shape[3]}), got {tuple(prompt.shape)}")
        xn, pn = self.norm11(x), self.norm12(prompt)
        d = self.prompt_dim
        query = _match_channels(xn, d)
        y = query + self.attn(query, pn)
        if self.dim > d:
            y = torch.cat([y, xn[:, d:]], dim=1)
        elif self.dim < d:
            y = self.reduce_channel(y)
        return y + self.ffn(self.norm2(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, prompt_dim={self.prompt_dim}, fractions={self.attn.fractions}"


__all__ = ["ChannelCrossAttention", "PromptCrossBlock", "PromptInPrompt", "SelectivePromptFeatureInteraction"]
