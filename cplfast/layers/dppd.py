"""DPPD — dynamic prompts (IEEE TIP 2025), SPEC §4.5–§4.7.

* :class:`DegradationPrototypeAssignment`: pooled feature -> embedding -> soft assignment to one
  prototype per degradation (:func:`cplfast.functional.prototype_assignment`).
* :class:`PromptDistribution`: each degradation owns a Gaussian over M prompt tokens; the assignment
  selects (or mixes) them — sampled in training, the mean in eval.
* :class:`PromptCrossFusion`: every pixel attends over the prompt tokens
  (:func:`cplfast.functional.prompt_token_attention`, the Triton kernel on CUDA).

DPPD has no public code. These layers are cplfast's **reading** of the paper's abstract and figures,
not a reproduction of the authors' code; every choice the paper leaves open is a constructor argument
whose default is the reading closest to the paper's text and figures:

==================  =======================  ===================================================
choice              default (reading)        why / alternative
==================  =======================  ===================================================
prototypes          ``"predefined"``         the abstract speaks of *predefined* degradation
                                             prototypes: fixed orthonormal vectors, not trained;
                                             ``"learnable"``: trained, initialised orthonormal
sampling            ``"assigned"``           the figure draws the prompt from the Gaussian of the
                                             prototype the image is assigned to; ``"mixture"``:
                                             the assignment-weighted mix of all T Gaussians
auxiliary losses    off                      the figure shows only the reconstruction loss; the
                                             assignment cross-entropy and the KL term exist and are
                                             turned on by a positive ``loss_weights`` entry of the
                                             model (``assignment_ce``, ``kl``)
==================  =======================  ===================================================
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _validation as check
from .. import functional
from . import _checks

MAX_PROMPT_TOKENS = 64


class DegradationPrototypeAssignment(nn.Module):
    """Soft assignment of an image to degradation prototypes (SPEC §4.5).

    x ``(B, in_dim, H, W)`` -> ``e = mlp(mean_HW x)`` ``(B, embed_dim)`` ->
    ``a = softmax(cos(e, prototypes) / temperature)`` ``(B, T)`` (rows sum to 1).

    ``prototypes`` (a reading of the paper, not a fact — see the module docstring):

    * ``"predefined"`` (default; the abstract's word): the fixed orthonormal rows ``e_0 .. e_{T-1}`` of
      the identity ``(T, embed_dim)`` (needs ``T <= embed_dim``), a buffer without gradient; the MLP
      learns to map each degradation near its prototype. Any orthonormal set is equivalent up to a
      rotation the MLP absorbs.
    * ``"learnable"``: a parameter ``(T, embed_dim)`` initialised with orthonormal rows (T <= embed_dim;
      orthonormal columns otherwise).

    Either way the state_dict key is ``prototypes``. When ``labels`` (class indices ``(B,)`` or float
    weights ``(B,T)``) are given, ``last_aux["assignment_ce"]`` holds ``mean_b -sum_t y_bt log a_bt``, the
    cross-entropy of the assignment against them — an auxiliary loss the paper's figure does not show;
    :class:`cplfast.models.PromptIR` adds it only with a positive ``loss_weights["assignment_ce"]``.
    ``last_embedding`` keeps ``e``.
    """

    def __init__(self, in_dim: int, embed_dim: int = 64, num_degradations: int = 5, temperature: float = 0.1,
                 hidden_dim: int | None = None, *, prototypes: str = "predefined"):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("embed_dim", embed_dim), ("num_degradations", num_degradations)):
            _checks.positive_int(name, value)
        hidden_dim = max(in_dim, embed_dim) if hidden_dim is None else _checks.positive_int("hidden_dim", hidden_dim)
        self.in_dim = in_dim
        self.num_degradations = num_degradations
        self.temperature = check.positive_scalar("temperature", temperature)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim))
        if prototypes == "predefined":
            if num_degradations > embed_dim:
                raise ValueError(f"prototypes='predefined' needs num_degradations <= embed_dim (orthonormal rows), "
                                 f"got {num_degradations} > {embed_dim}")
            self.register_buffer("prototypes", torch.eye(num_degradations, embed_dim))
        elif prototypes == "learnable":
            self.prototypes = nn.Parameter(nn.init.orthogonal_(torch.empty(num_degradations, embed_dim)))
        else:
            raise ValueError(f"prototypes must be 'predefined' or 'learnable', got {prototypes!r}")
        self.prototype_mode = prototypes
        self.last_embedding: torch.Tensor | None = None
        self.last_aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _checks.feature_map("x", x, self.in_dim, f"(B, in_dim, H, W) with in_dim = {self.in_dim}")
        embedding = self.mlp(x.mean(dim=(2, 3)))
        assignment = functional.prototype_assignment(embedding, self.prototypes.to(embedding.dtype),
                                                     temperature=self.temperature)
        self.last_embedding = embedding
        aux: dict[str, torch.Tensor] = {}
        if labels is not None:
            target = _checks.label_weights(labels, x.shape[0], self.num_degradations, x.device, assignment.dtype)
            log_a = torch.log(assignment.clamp_min(torch.finfo(assignment.dtype).tiny))
            aux["assignment_ce"] = _checks.soft_cross_entropy(log_a, target)
        self.last_aux = aux
        return assignment

    def extra_repr(self) -> str:
        t, e = self.prototypes.shape
        return (f"in_dim={self.in_dim}, embed_dim={e}, num_degradations={t}, temperature={self.temperature}, "
                f"prototypes={self.prototype_mode!r}")


class PromptDistribution(nn.Module):
    """Gaussian prompt tokens per degradation, drawn for an assignment (SPEC §4.6).

    ``mu``, ``log_var`` ``(T, M, dim)``, ``sigma = exp(log_var / 2)``; for an assignment a ``(B, T)`` the
    weights ``h (B, T)`` are (``sampling``, a reading of the paper, not a fact — see the module docstring):

    * ``"assigned"`` (default; the figure): ``h = onehot(argmax_t a_t) + a - stopgrad(a)`` — the value
      is the one-hot of the assigned prototype (lowest index on ties), so the tokens come from that
      prototype's Gaussian alone; the straight-through term lets the reconstruction loss train the
      assignment (cplfast's choice: the paper does not say how the assignment gets a gradient).
    * ``"mixture"``: ``h = a`` — the assignment-weighted mix of the T Gaussians.

    Then::

        train (or sample=True):  tokens = sum_t h_t (mu_t + sigma_t * eps),  eps ~ N(0, I) (B, M, dim),
                                 one eps per image shared by the T components (reparameterised)
        eval  (or sample=False): tokens = sum_t h_t mu_t          (deterministic)

    Returns ``(B, M, dim)``. :meth:`kl_loss` is the optional KL term (off in the model by default).
    """

    def __init__(self, num_degradations: int, num_tokens: int, dim: int, init_log_var: float = -4.0, *,
                 sampling: str = "assigned"):
        super().__init__()
        for name, value in (("num_degradations", num_degradations), ("num_tokens", num_tokens), ("dim", dim)):
            _checks.positive_int(name, value)
        self.mu = nn.Parameter(torch.randn(num_degradations, num_tokens, dim))
        self.log_var = nn.Parameter(torch.full((num_degradations, num_tokens, dim), float(init_log_var)))
        if sampling not in ("assigned", "mixture"):
            raise ValueError(f"sampling must be 'assigned' or 'mixture', got {sampling!r}")
        self.sampling = sampling

    @property
    def num_degradations(self) -> int:
        return self.mu.shape[0]

    def kl_loss(self) -> torch.Tensor:
        """``KL(N(mu_t, sigma_t^2) || N(0, I))`` summed over ``dim``, averaged over degradations and tokens."""
        kl = 0.5 * (self.mu.square() + self.log_var.exp() - 1.0 - self.log_var)
        return kl.sum(dim=-1).mean()

    def forward(self, assignment: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        check.tensor("assignment", assignment, 2)
        check.shape("assignment", assignment, (None, self.num_degradations),
                    f"(B, T) with T = num_degradations = {self.num_degradations}")
        check.nonempty("assignment", assignment)
        if assignment.device != self.mu.device:
            raise ValueError(f"assignment must be on {self.mu.device} (the device of the layer), got {assignment.device}")
        sample = self.training if sample is None else bool(sample)
        t, m, d = self.mu.shape
        a = assignment.to(self.mu.dtype)
        if self.sampling == "assigned":
            hard = torch.zeros_like(a).scatter_(1, a.argmax(dim=1, keepdim=True), 1.0)
            a = hard + (a - a.detach())
        tokens = a @ self.mu.view(t, m * d)
        if sample:
            sigma = a @ torch.exp(0.5 * self.log_var).view(t, m * d)
            tokens = tokens + sigma * torch.randn_like(tokens)
        return tokens.view(-1, m, d)

    def extra_repr(self) -> str:
        t, m, d = self.mu.shape
        return f"num_degradations={t}, num_tokens={m}, dim={d}, sampling={self.sampling!r}"


class PromptCrossFusion(nn.Module):
    """Pixels attend over prompt tokens (DPPD's CrossFusion, SPEC §4.7).

    x ``(B, dim, H, W)``, tokens ``(B, M, token_dim)`` (M <= 64; token_dim defaults to dim)::

        q   = W_q LN(x)            per pixel, heads of d = dim / heads channels   (B, h, HW, d)
        k,v = W_kv LN(tokens)                                                     (B, h, M, d)
        out = x + W_o prompt_token_attention(q, k, v)                             (B, dim, H, W)

    The layer works channels-last internally (linear layers over the channel axis).
    """

    def __init__(self, dim: int, heads: int, token_dim: int | None = None, bias: bool = True):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        token_dim = dim if token_dim is None else _checks.positive_int("token_dim", token_dim)
        self.dim, self.heads, self.token_dim = dim, heads, token_dim
        self.norm = nn.LayerNorm(dim)
        self.token_norm = nn.LayerNorm(token_dim)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(token_dim, 2 * dim, bias=bias)
        self.project_out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        _checks.feature_map("x", x, self.dim, f"(B, dim, H, W) with dim = {self.dim}")
        check.tensor("tokens", tokens, 3)
        check.shape("tokens", tokens, (x.shape[0], None, self.token_dim),
                    f"(B, M, token_dim) with B = {x.shape[0]}, token_dim = {self.token_dim}")
        if not 1 <= tokens.shape[1] <= MAX_PROMPT_TOKENS:
            raise ValueError(f"tokens must hold between 1 and {MAX_PROMPT_TOKENS} prompt tokens (M), got {tokens.shape[1]}")
        b, c, h, w = x.shape
        m, heads, d = tokens.shape[1], self.heads, c // self.heads
        pixels = self.norm(x.permute(0, 2, 3, 1))
        q = self.q(pixels).reshape(b, h * w, heads, d).transpose(1, 2)
        k, v = self.kv(self.token_norm(tokens)).chunk(2, dim=-1)
        k = k.reshape(b, m, heads, d).transpose(1, 2)
        v = v.reshape(b, m, heads, d).transpose(1, 2)
        attended = functional.prompt_token_attention(q, k, v)
        out = self.project_out(attended.transpose(1, 2).reshape(b, h, w, c))
        return x + out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, token_dim={self.token_dim}"


__all__ = ["DegradationPrototypeAssignment", "PromptCrossFusion", "PromptDistribution"]
