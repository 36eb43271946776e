"""``topm_channel_attention`` on the Triton kernels, registered as ``torch.library`` custom ops.

Two ops, both opaque to ``torch.compile`` and traced through their fake implementations:

* ``cplfast::topm_channel_attention_fwd(q, k, v, temperature, mix, counts)``
  -> ``(out, G^, |q|, |k|, P)``: the output plus the small fp32 tensors the backward needs
  (normalised Gram ``(B,h,c,c)``, row norms ``(B,h,c)``, mixed probabilities ``(B,h,c,c)``).
* ``cplfast::topm_channel_attention_bwd(grad_out, ...)`` -> ``(dq, dk, dv, dtemperature, dmix)``.

``counts`` holds ``int(c * f)`` per fraction; an empty list is plain softmax (Restormer's MDTA).
The top-m choice is not differentiated (as in the reference); the softmax Jacobians are.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..reference.channel_attention import topm_counts
from ._lazy import LazyModule

_Tensors5 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


_kernels = LazyModule("cplfast.kernels.channel_attention")


@torch.library.custom_op("cplfast::topm_channel_attention_fwd", mutates_args=())
def topm_channel_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    mix: torch.Tensor | None,
    counts: Sequence[int],
) -> _Tensors5:
    return _kernels.channel_attention_forward(q, k, v, temperature, mix, counts)


@topm_channel_attention_fwd.register_fake
def _(q, k, v, temperature, mix, counts):
    batch, heads, c, _ = q.shape
    f32 = torch.float32
    return (
        q.new_empty(q.shape),
        q.new_empty((batch, heads, c, c), dtype=f32),
        q.new_empty((batch, heads, c), dtype=f32),
        q.new_empty((batch, heads, c), dtype=f32),
        q.new_empty((batch, heads, c, c), dtype=f32),
    )


@torch.library.custom_op("cplfast::topm_channel_attention_bwd", mutates_args=())
def topm_channel_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    mix: torch.Tensor | None,
    gram: torch.Tensor,
    qnorm: torch.Tensor,
    knorm: torch.Tensor,
    probs: torch.Tensor,
    counts: Sequence[int],
) -> _Tensors5:
    return _kernels.channel_attention_backward(
        grad_out, q, k, v, temperature, mix, gram, qnorm, knorm, probs, counts
    )


@topm_channel_attention_bwd.register_fake
def _(grad_out, q, k, v, temperature, mix, gram, qnorm, knorm, probs, counts):
    dmix = mix.new_empty(mix.shape) if mix is not None else q.new_empty((0,), dtype=torch.float32)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        temperature.new_empty(temperature.shape),
        dmix,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, temperature, mix, counts = inputs
    _, gram, qnorm, knorm, probs = output
    ctx.save_for_backward(q, k, v, temperature, mix, gram, qnorm, knorm, probs)
    ctx.counts = list(counts)
    ctx.has_mix = mix is not None


def _backward(ctx, grad_out, *_unused_residual_grads):
    q, k, v, temperature, mix, gram, qnorm, knorm, probs = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    dq, dk, dv, dtemperature, dmix = topm_channel_attention_bwd(
        grad_out, q, k, v, temperature, mix, gram, qnorm, knorm, probs, ctx.counts
    )
    return dq, dk, dv, dtemperature, (dmix if ctx.has_mix else None), None


topm_channel_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def topm_channel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    *,
    fractions: Sequence[float] | None = (1 / 2, 2 / 3, 3 / 4, 4 / 5),
    mix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused SPEC §3.2 on validated arguments (see :func:`cplfast.functional.topm_channel_attention`).

    q, k, v ``(B,h,c,L)``; temperature ``(h,)``; mix ``(len(fractions),)`` or None (uniform 1/J).
    """
    counts = [] if fractions is None else topm_counts(q.shape[-2], fractions)
    return topm_channel_attention_fwd(q, k, v, temperature, mix, counts)[0]
