"""Public functional API (SPEC §3): validate once, then dispatch to the Triton kernel or the reference.

Every op here has exactly the signature of SPEC §3. Validation (SPEC §9) inspects metadata only, so
it costs no device sync and traces cleanly under ``torch.compile``. The backend is chosen per call by
:func:`cplfast._backend.resolve` (``auto`` / ``triton`` / ``reference``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _validation as check
from . import reference
from .ops import channel_attention as _channel_attention_ops
from .ops import infonce as _infonce_ops
from .ops import sparse_prompt as _sparse_prompt_ops
from .ops import supcon as _supcon_ops
from .ops import token_attention as _token_attention_ops
from ._backend import resolve

# The modules holding the custom ops over the Triton kernels (importing them registers the ops;
# Triton itself is imported on the first kernel call). Imported here, not per call, so torch.compile
# traces the dispatch without a graph break; the op is looked up on its module at call time.
_KERNEL_MODULES = {
    "sparse_prompt": _sparse_prompt_ops,
    "topm_channel_attention": _channel_attention_ops,
    "prompt_token_attention": _token_attention_ops,
    "infonce": _infonce_ops,
    "supcon": _supcon_ops,
}


def _impl(op: str, *tensors: torch.Tensor | None):
    """The Triton implementation of ``op`` or its reference, as the backend in force picks."""
    module = _KERNEL_MODULES[op] if resolve(op, *tensors) == "triton" else reference
    return getattr(module, op)


def _autocast(lowp: bool, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under ``torch.autocast``, inputs of mixed dtypes (bf16 activations, fp32 parameters) are cast
    to one dtype, as autocast does for the ops these replace: the autocast dtype for the matmul-like
    ops (``lowp``), float32 for the losses. Outside autocast the tensors are returned unchanged, and
    mixed dtypes are an error reported by the dtype check."""
    present = [t for t in tensors if t is not None]
    device_type = present[0].device.type
    if not torch.is_autocast_enabled(device_type) or len({t.dtype for t in present}) == 1:
        return tensors
    dtype = torch.get_autocast_dtype(device_type) if lowp else torch.float32
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def sparse_prompt(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prompts: torch.Tensor,
    *,
    k: int | None = None,
    temperature: float = 1.0,
    renorm: bool = False,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed mix of N learned prompt maps, resized to the feature (SPEC §3.1).

    x ``(B,C,H,W)``, weight ``(N,C)``, bias ``(N,)`` or None, prompts ``(N,D,S,S)``; ``k`` in [1, N] or
    None (dense, PromptIR). Returns ``(out (B,D,H',W'), routing (B,N))`` where ``(H',W') = size or (H,W)``.
    On exact ties among the routing weights the lower prompt index is kept first (a stable descending
    sort); ``torch.topk`` (used by the official CPL code) does not promise that order, so on exact ties
    the two may keep different prompts.
    """
    check.tensor("x", x, 4)
    check.tensor("weight", weight, 2)
    check.tensor("prompts", prompts, 4)
    if bias is not None:
        check.tensor("bias", bias, 1)
    check.same_device(x=x, weight=weight, bias=bias, prompts=prompts)
    x, weight, bias, prompts = _autocast(True, x, weight, bias, prompts)
    check.same_dtype(x=x, weight=weight, bias=bias, prompts=prompts)
    n, c = weight.shape
    check.shape("weight", weight, (None, x.shape[1]), "(N, C) with C = x.shape[1]")
    check.shape("prompts", prompts, (n, None, None, None), "(N, D, S, S) with N = weight.shape[0]")
    if prompts.shape[-1] != prompts.shape[-2]:
        raise ValueError(f"prompts must be square (N, D, S, S), got {tuple(prompts.shape)}")
    if bias is not None:
        check.shape("bias", bias, (n,), "(N,)")
    check.nonempty("x", x)
    check.nonempty("prompts", prompts)
    k = n if k is None else check.int_in_range("k", k, 1, n)
    temperature = check.positive_scalar("temperature", temperature)
    if not isinstance(renorm, bool):
        raise TypeError(f"renorm must be a bool, got {type(renorm).__name__}")
    size = None if size is None else check.size2("size", size)
    fn = _impl("sparse_prompt", x, weight, bias, prompts)
    return fn(x, weight, bias, prompts, k=k, temperature=temperature, renorm=renorm, size=size)


def _fractions(fractions: Sequence[float] | None, c: int) -> tuple[float, ...] | None:
    if fractions is None:
        return None
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) == 0:
        raise ValueError(f"fractions must be None or a non-empty sequence of numbers in (0, 1], got {fractions!r}")
    out = []
    for j, f in enumerate(fractions):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"fractions[{j}] must be a number in (0, 1], got {f!r}")
        if int(c * f) < 1:
            raise ValueError(f"fractions[{j}]={f} keeps int({c}*{f}) = 0 channels of c={c}; each must keep >= 1")
        out.append(float(f))
    return tuple(out)


def topm_channel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    *,
    fractions: Sequence[float] | None = (1 / 2, 2 / 3, 3 / 4, 4 / 5),
    mix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Channel attention with per-row top-m masks (SPEC §3.2); ``fractions=None`` is Restormer's MDTA.

    q, k, v ``(B,h,c,L)``; temperature ``(h,)``; mix ``(len(fractions),)`` or None (uniform).
    Returns ``(B,h,c,L)``.
    """
    check.tensor("q", q, 4)
    check.tensor("k", k, 4)
    check.tensor("v", v, 4)
    check.tensor("temperature", temperature, 1)
    check.shape("k", k, tuple(q.shape), "same as q: (B, h, c, L)")
    check.shape("v", v, tuple(q.shape), "same as q: (B, h, c, L)")
    check.shape("temperature", temperature, (q.shape[1],), "(h,)")
    check.nonempty("q", q)
    check.positive_values("temperature", temperature)
    fractions = _fractions(fractions, q.shape[2])
    if mix is not None:
        check.tensor("mix", mix, 1)
        if fractions is None:
            raise ValueError("mix must be None when fractions is None (plain MDTA has nothing to mix)")
        check.shape("mix", mix, (len(fractions),), "(len(fractions),)")
    check.same_device(q=q, k=k, v=v, temperature=temperature, mix=mix)
    q, k, v = _autocast(True, q, k, v)
    check.same_dtype(q=q, k=k, v=v)
    fn = _impl("topm_channel_attention", q, k, v)
    return fn(q, k, v, temperature, fractions=fractions, mix=mix)


def prompt_token_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Pixels attend over a few prompt tokens (SPEC §3.3): ``softmax(q @ k.T * scale) @ v``.

    q ``(B,h,L,d)``; k, v ``(B,h,M,d)`` with M <= 64; scale defaults to ``d ** -0.5``. Returns ``(B,h,L,d)``.
    """
    check.tensor("q", q, 4)
    check.tensor("k", k, 4)
    check.tensor("v", v, 4)
    b, h, _, d = q.shape
    check.shape("k", k, (b, h, None, d), "(B, h, M, d) matching q's B, h, d")
    check.shape("v", v, tuple(k.shape), "same as k: (B, h, M, d)")
    check.nonempty("q", q)
    check.nonempty("k", k)
    if k.shape[2] > 64:
        raise ValueError(f"k must hold at most 64 prompt tokens (M <= 64), got M={k.shape[2]}")
    if scale is not None:
        scale = check.positive_scalar("scale", scale)
    check.same_device(q=q, k=k, v=v)
    q, k, v = _autocast(True, q, k, v)
    check.same_dtype(q=q, k=k, v=v)
    fn = _impl("prompt_token_attention", q, k, v)
    return fn(q, k, v, scale=scale)


def infonce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float = 0.1,
    dim: int = 1,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE with one positive and K negatives per location (SPEC §3.4).

    anchor, positive ``(B,C,H,W)`` (or ``(N,D)`` with ``dim=-1``); negatives ``(K, *anchor.shape)``.
    ``reduction``: ``"mean"`` | ``"sum"`` | ``"none"``.
    """
    check.tensor("anchor", anchor, (2, 4))
    check.tensor("positive", positive, (2, 4))
    check.tensor("negatives", negatives, anchor.dim() + 1)
    check.shape("positive", positive, tuple(anchor.shape), "same as anchor")
    check.shape("negatives", negatives, (None, *anchor.shape), "(K, *anchor.shape)")
    check.nonempty("anchor", anchor)
    if negatives.shape[0] == 0:
        raise ValueError("negatives must hold at least one negative (K >= 1), got K=0: with no negative the "
                         "loss is identically 0")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -anchor.dim() <= dim < anchor.dim():
        raise ValueError(f"dim must be an int in [{-anchor.dim()}, {anchor.dim() - 1}], got {dim!r}")
    temperature = check.positive_scalar("temperature", temperature)
    reduction = check.choice("reduction", reduction, ("mean", "sum", "none"))
    check.same_device(anchor=anchor, positive=positive, negatives=negatives)
    anchor, positive, negatives = _autocast(False, anchor, positive, negatives)
    check.same_dtype(anchor=anchor, positive=positive, negatives=negatives)
    fn = _impl("infonce", anchor, positive, negatives)
    return fn(anchor, positive, negatives, temperature=temperature, dim=dim % anchor.dim(), reduction=reduction)


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    reduction: str = "mean",
    gather: bool = False,
) -> torch.Tensor:
    """Supervised contrastive loss (SPEC §3.5) over z ``(N,D)`` with integer labels ``(N,)``.

    Never builds the N x N matrix on the Triton path. ``gather=True`` under ``torch.distributed`` uses
    every rank's z as keys.
    """
    check.tensor("z", z, 2)
    check.tensor("labels", labels, 1, floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    check.shape("labels", labels, (z.shape[0],), "(N,) with N = z.shape[0]")
    check.nonempty("z", z)
    if z.shape[0] < 2 and not gather:
        raise ValueError(f"z must hold at least 2 samples (N >= 2) to have a positive pair, got N={z.shape[0]}")
    check.same_device(z=z, labels=labels)
    temperature = check.positive_scalar("temperature", temperature)
    reduction = check.choice("reduction", reduction, ("mean", "sum", "none"))
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    fn = _impl("supcon", z)
    return fn(z, labels, temperature=temperature, reduction=reduction, gather=gather)


def prototype_assignment(e: torch.Tensor, prototypes: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """Soft assignment to degradation prototypes (SPEC §3.6): ``softmax(cos(e, prototypes) / tau)``.

    e ``(B,E)``, prototypes ``(T,E)`` -> ``(B,T)``, rows summing to 1. A few hundred flops per row: no
    kernel, always the reference.
    """
    check.tensor("e", e, 2)
    check.tensor("prototypes", prototypes, 2)
    check.shape("prototypes", prototypes, (None, e.shape[1]), "(T, E) with E = e.shape[1]")
    check.nonempty("prototypes", prototypes)
    check.same_device(e=e, prototypes=prototypes)
    e, prototypes = _autocast(False, e, prototypes)
    check.same_dtype(e=e, prototypes=prototypes)
    temperature = check.positive_scalar("temperature", temperature)
    return reference.prototype_assignment(e, prototypes, temperature=temperature)


__all__ = [
    "infonce",
    "prompt_token_attention",
    "prototype_assignment",
    "sparse_prompt",
    "supcon",
    "topm_channel_attention",
]
