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


class SparsePromptModule(PromptGenBlock):
    """CPL's Sparse Prompt Module: top-k routing over the prompt pool (SPEC §4.2).

    Same parameters as :class:`PromptGenBlock`. ``forward(x)`` returns the prompt map and keeps the
    routing weights in ``last_routing`` (B,N). :meth:`negative_routing` moves the kept mass onto
    components the router did not select, for CPR's negatives.
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
    ):
        super().__init__(prompt_dim, prompt_len, prompt_size, lin_dim)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= prompt_len:
            raise ValueError(f"top_k must be an int in [1, prompt_len={prompt_len}], got {top_k!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.top_k = top_k
        self.renorm = bool(renorm)
        self.temperature = float(temperature)
        self.last_routing: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompt, routing = self.route(x)
        self.last_routing = routing
        return self.conv3x3(prompt)

    def max_negatives(self) -> int:
        return (self.prompt_param.shape[1] - self.top_k) // self.top_k

    def negative_routing(self, routing: torch.Tensor, num_negatives: int) -> torch.Tensor:
        """Mismatched routing ``(K,B,N)`` from the router's ``routing (B,N)``.

        Negative j puts the kept weights (largest first) onto the unselected components number
        ``j*k .. j*k+k-1``, counted in index order (after top-k they all carry weight 0, so the
        stable sort keeps them in index order). ``K <= (N-k)//k``.
        """
        k = self.top_k
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
        order = torch.sort(routing, dim=1, descending=True, stable=True).indices
        kept_values = torch.gather(routing, 1, order[:, :k])
        negatives = []
        for j in range(num_negatives):
            targets = order[:, k + j * k : k + (j + 1) * k]
            negatives.append(torch.zeros_like(routing).scatter_(1, targets, kept_values))
        return torch.stack(negatives)


__all__ = ["PromptGenBlock", "SparsePromptModule"]
