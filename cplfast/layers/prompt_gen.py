"""PromptIR's ``PromptGenBlock`` and CPL's ``SparsePromptModule`` (SPEC §4.1, §4.2).

Both hold the official PromptIR parameters — ``prompt_param (1,N,D,S,S)``, ``linear_layer`` (C->N),
``conv3x3`` (D->D, no bias) — so their state_dicts are interchangeable and official checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from . import _checks


class PromptGenBlock(nn.Module):
    """Dense prompt generation (PromptIR): ``conv3x3(resize(sum_n softmax(W gap(x) + b)_n P_n))``.

    x ``(B, lin_dim, H, W)`` -> prompt map ``(B, prompt_dim, H, W)``.
    """

    top_k: int | None = None

    def __init__(self, prompt_dim: int = 128, prompt_len: int = 5, prompt_size: int = 96, lin_dim: int = 192):
        super().__init__()
        for name, value in (("prompt_dim", prompt_dim), ("prompt_len", prompt_len), ("prompt_size", prompt_size),
                            ("lin_dim", lin_dim)):
            _checks.positive_int(name, value)
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.temperature = 1.0
        self.renorm = False

    @property
    def prompts(self) -> torch.Tensor:
        """The prompt pool as ``(N, D, S, S)`` (a view of ``prompt_param``)."""
        return self.prompt_param[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixed prompt resized to x (B,D,H,W), routing (B,N))``, before ``conv3x3``."""
        lin_dim = self.linear_layer.in_features
        _checks.feature_map("x", x, lin_dim, f"(B, lin_dim, H, W) with lin_dim = {lin_dim}")
        return functional.sparse_prompt(
            x, self.linear_layer.weight, self.linear_layer.bias, self.prompts,
            k=self.top_k, temperature=self.temperature, renorm=self.renorm,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompt, _ = self.route(x)
        return self.conv3x3(prompt)

    def prompt_from_routing(self, routing: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The prompt map for given routing weights ``(B,N)``: ``conv3x3(resize(sum_n w_n P_n))``."""
        if routing.dim() != 2 or routing.shape[1] != self.prompt_param.shape[1]:
            raise ValueError(
                f"routing must have shape (B, {self.prompt_param.shape[1]}), got {tuple(routing.shape)}"
            )
        mixed = routing.to(self.prompts.dtype) @ self.prompts.flatten(1)
        mixed = mixed.view(routing.shape[0], *self.prompts.shape[1:])
        if tuple(size) != tuple(mixed.shape[-2:]):
            mixed = F.interpolate(mixed, size=tuple(size), mode="bilinear", align_corners=False)
        return self.conv3x3(mixed)

    def extra_repr(self) -> str:
        _, n, d, s, _ = self.prompt_param.shape
        return f"prompt_len={n}, prompt_dim={d}, prompt_size={s}, lin_dim={self.linear_layer.in_features}"


NEGATIVE_MODES = ("random", "ordered")


def _kept_order(routing: torch.Tensor) -> torch.Tensor:
    """Prompt indices ``(B,N)`` by routing weight, largest first, lower index first on ties (stable)."""
    return torch.sort(routing, dim=1, descending=True, stable=True).indices


class SparsePromptModule(PromptGenBlock):
    """CPL's Sparse Prompt Module: top-k routing over the prompt pool (SPEC §4.2).

    Same parameters as :class:`PromptGenBlock`. ``forward(x)`` returns the prompt map and keeps the
    routing weights in ``last_routing`` (B,N). :meth:`negative_routing` moves the kept mass onto
    components the router did not select, for CPR's negatives.

    Two extensions against routing collapse, **not part of CPL** (off by default; the official CPL code
    has neither, and its top-1 routing collapses onto one prompt in training as cplfast's does):

    * ``gate_noise = s > 0``: noisy top-k gating (after Shazeer et al., 2017, with a constant noise
      scale instead of a learned one): in training the router's logits get ``s * eps``,
      ``eps ~ N(0, 1)`` per image and prompt (from torch's default generator), before the softmax and
      the top-k. The routing is then computed in PyTorch (not the fused op). Eval is unchanged.
    * ``load_balance=True``: in training, ``last_aux["load_balance"]`` holds the Switch-Transformer
      balancing loss (Fedus et al., 2021) ``N * sum_n f_n * P_n``, with ``f_n`` the share of the
      batch's kept slots (B*k) routed to prompt n and ``P_n`` the batch mean of the dense softmax
      probability of prompt n; 1 when the load is uniform, N when every image picks one prompt with
      probability 1. Gradients flow through ``P``.
    """

    def __init__(
        self,
        prompt_dim: int = 128,
        prompt_len: int = 5,
        prompt_size: int = 96,
        lin_dim: int = 192,
        top_k: int = 1,
        renorm: bool = False,
        temperature: float = 1.0,
        *,
        gate_noise: float = 0.0,
        load_balance: bool = False,
    ):
        super().__init__(prompt_dim, prompt_len, prompt_size, lin_dim)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= prompt_len:
            raise ValueError(f"top_k must be an int in [1, prompt_len={prompt_len}], got {top_k!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(gate_noise, bool) or not isinstance(gate_noise, (int, float)) or not gate_noise >= 0:
            raise ValueError(f"gate_noise must be a number >= 0, got {gate_noise!r}")
        if not isinstance(load_balance, bool):
            raise TypeError(f"load_balance must be a bool, got {type(load_balance).__name__}")
        self.top_k = top_k
        self.renorm = bool(renorm)
        self.temperature = float(temperature)
        self.gate_noise = float(gate_noise)
        self.load_balance = load_balance
        self.last_routing: torch.Tensor | None = None
        self.last_aux: dict[str, torch.Tensor] = {}

    def _noisy_route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mixed prompt (B,D,H,W), top-k routing (B,N), dense probabilities (B,N))`` with gate noise."""
        logits = self.linear_layer(x.mean(dim=(2, 3)))
        if self.training and self.gate_noise > 0:
            logits = logits + self.gate_noise * torch.randn_like(logits)
        probs = torch.softmax(logits / self.temperature, dim=1)
        kept = _kept_order(probs.detach())[:, : self.top_k]
        routing = torch.zeros_like(probs).scatter(1, kept, probs.gather(1, kept))
        if self.renorm:
            routing = routing / routing.sum(dim=1, keepdim=True)
        mixed = (routing.to(self.prompts.dtype) @ self.prompts.flatten(1)).view(x.shape[0], *self.prompts.shape[1:])
        mixed = F.interpolate(mixed, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return mixed.to(x.dtype), routing, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux: dict[str, torch.Tensor] = {}
        if self.training and (self.gate_noise > 0 or self.load_balance):
            lin_dim = self.linear_layer.in_features
            _checks.feature_map("x", x, lin_dim, f"(B, lin_dim, H, W) with lin_dim = {lin_dim}")
            if self.gate_noise > 0:
                prompt, routing, probs = self._noisy_route(x)
            else:
                prompt, routing = self.route(x)
                probs = torch.softmax(self.linear_layer(x.mean(dim=(2, 3))) / self.temperature, dim=1)
            if self.load_balance:
                aux["load_balance"] = load_balance_loss(probs, routing, self.top_k)
        else:
            prompt, routing = self.route(x)
        self.last_routing = routing
        self.last_aux = aux
        return self.conv3x3(prompt)

    def max_negatives(self) -> int:
        return (self.prompt_param.shape[1] - self.top_k) // self.top_k

    def negative_routing(self, routing: torch.Tensor, num_negatives: int, *, mode: str = "random",
                         generator: torch.Generator | torch.Tensor | None = None) -> torch.Tensor:
        """Mismatched routing ``(K,B,N)`` from the router's ``routing (B,N)``, for CPR's negatives.

        Per image: the *kept* components are the k largest weights of ``routing`` (lower index first on
        ties), with weights ``w_1 >= ... >= w_k`` in that order; the other ``N - k`` components are the
        *unselected* ones. Negative j (``j = 0 .. K-1``) carries ``w_1 .. w_k`` on the unselected
        components ``u[j*k], ..., u[j*k + k - 1]`` (``w_i`` on ``u[j*k + i - 1]``) and 0 elsewhere, where
        ``u`` is a sequence of the unselected components:

        * ``mode="random"`` (default; the CPL paper's choice): ``u`` is a uniformly random permutation
          of the unselected components, drawn independently per image (and per call) from
          ``generator`` (default: torch's default generator of ``routing``'s device — the training
          generator, which the trainer seeds and stores in its checkpoints). ``generator`` may instead
          be an int64 tensor ``(B,)`` of per-image seeds: image b's permutation is then drawn from a
          generator seeded with ``seeds[b]``, so it does not depend on how a batch is split across
          processes or micro-batches (the trainer derives the seeds from the run seed and each image's
          index in the data stream). The K negatives of one image use distinct prompts (drawn without
          replacement).
        * ``mode="ordered"``: ``u`` lists the unselected components in index order.

        ``1 <= K <= (N-k)//k``. The result carries no gradient (``routing`` is detached).
        """
        k = self.top_k
        if mode not in NEGATIVE_MODES:
            raise ValueError(f"mode must be one of {NEGATIVE_MODES}, got {mode!r}")
        if not 1 <= num_negatives <= self.max_negatives():
            raise ValueError(
                f"num_negatives must be in [1, {self.max_negatives()}] for prompt_len="
                f"{self.prompt_param.shape[1]} and top_k={k}, got {num_negatives}"
            )
        n = self.prompt_param.shape[1]
        if not isinstance(routing, torch.Tensor) or routing.dim() != 2 or routing.shape[1] != n:
            shape = tuple(routing.shape) if isinstance(routing, torch.Tensor) else type(routing).__name__
            raise ValueError(f"routing must have shape (B, {n}), got {shape}")
        routing = routing.detach()
        order = _kept_order(routing)
        kept_values = torch.gather(routing, 1, order[:, :k])
        unselected = order[:, k:].sort(dim=1).values  # index order (also for a dense routing row)
        if mode == "random" and isinstance(generator, torch.Tensor):
            if generator.shape != (routing.shape[0],):
                raise ValueError(f"per-image seeds must have shape ({routing.shape[0]},), got {tuple(generator.shape)}")
            keys = torch.stack([torch.rand(unselected.shape[1], generator=torch.Generator().manual_seed(int(seed)))
                                for seed in generator.tolist()]).to(routing.device)
            unselected = torch.gather(unselected, 1, keys.argsort(dim=1))
        elif mode == "random":
            keys = torch.rand(unselected.shape, device=routing.device, generator=generator)
            unselected = torch.gather(unselected, 1, keys.argsort(dim=1))
        negatives = []
        for j in range(num_negatives):
            targets = unselected[:, j * k: (j + 1) * k]
            negatives.append(torch.zeros_like(routing).scatter_(1, targets, kept_values))
        return torch.stack(negatives)


def load_balance_loss(probs: torch.Tensor, routing: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing ``N * sum_n f_n * P_n`` (see :class:`SparsePromptModule`).

    ``probs`` ``(B,N)`` dense softmax probabilities (gradients flow through them), ``routing`` ``(B,N)``
    the top-k routing whose k kept components per image define ``f``.
    """
    n = probs.shape[1]
    kept = _kept_order(routing.detach())[:, :top_k]
    counts = torch.zeros_like(probs).scatter_(1, kept, 1.0)
    f = counts.mean(dim=0) / top_k
    return n * (f * probs.mean(dim=0)).sum()


__all__ = ["NEGATIVE_MODES", "PromptGenBlock", "SparsePromptModule", "load_balance_loss"]
