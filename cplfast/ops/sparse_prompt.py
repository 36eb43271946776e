"""``sparse_prompt`` over the Triton kernels, registered with ``torch.library`` (SPEC §2, §3.1).

Two custom ops, both opaque to ``torch.compile`` (fake implementations give their shapes):

* ``cplfast::sparse_prompt(x, weight, bias, prompts, k, temperature, renorm, out_h, out_w)``
  -> ``(out (B,D,out_h,out_w), routing (B,N), emb (B,C) f32, probs (B,N) f32, mixw (B,N) f32)``;
  the last three are saved for the backward and are not differentiable.
* ``cplfast::sparse_prompt_backward(grad_out?, grad_routing?, weight, prompts, emb, probs, mixw, k,
  temperature, renorm, in_h, in_w, out_h, out_w)`` -> ``(grad_emb (B,C), grad_weight, grad_bias, grad_prompts)``;
  either incoming gradient may be None (its output did not reach the loss). Without ``grad_out``,
  ``grad_prompts`` is an empty ``(0,)`` tensor (no prompt gradient is computed or zero-filled) and the
  autograd formula hands None to ``prompts``.

The autograd formula returns ``grad_x = grad_emb[:, :, None, None].expand(B, C, H, W)``: the exact
gradient of the spatial mean, as a broadcast view rather than a written (B,C,H,W) tensor. Gradients are
not materialised (``ctx.set_materialize_grads(False)``): an unused output costs no zero fill, and the
non-differentiable emb/probs/mixw outputs none either.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._lazy import LazyModule

_kernels = LazyModule("cplfast.kernels.sparse_prompt")


@torch.library.custom_op("cplfast::sparse_prompt", mutates_args=())
def sparse_prompt_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    prompts: Tensor,
    k: int,
    temperature: float,
    renorm: bool,
    out_h: int,
    out_w: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    result = _kernels.forward(x, weight, bias, prompts, k, temperature, renorm, (out_h, out_w))
    return tuple(result)


@sparse_prompt_op.register_fake
def _(x, weight, bias, prompts, k, temperature, renorm, out_h, out_w):
    b, c = x.shape[:2]
    n, d = prompts.shape[:2]
    f32 = torch.float32
    return (
        x.new_empty((b, d, out_h, out_w)),
        x.new_empty((b, n)),
        x.new_empty((b, c), dtype=f32),
        x.new_empty((b, n), dtype=f32),
        x.new_empty((b, n), dtype=f32),
    )


@torch.library.custom_op("cplfast::sparse_prompt_backward", mutates_args=())
def sparse_prompt_backward_op(
    grad_out: Optional[Tensor],
    grad_routing: Optional[Tensor],
    weight: Tensor,
    prompts: Tensor,
    emb: Tensor,
    probs: Tensor,
    mixw: Tensor,
    k: int,
    temperature: float,
    renorm: bool,
    in_h: int,
    in_w: int,
    out_h: int,
    out_w: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if grad_out is None and grad_routing is None:
        raise ValueError("sparse_prompt_backward: grad_out and grad_routing are both None")
    grad_emb, grad_weight, grad_bias, grad_prompts = _kernels.backward(
        grad_out, grad_routing, weight, prompts, emb, probs, mixw, k, temperature, renorm, (in_h, in_w),
        (out_h, out_w),
    )
    if grad_prompts is None:
        grad_prompts = prompts.new_empty((0,))
    return grad_emb, grad_weight, grad_bias, grad_prompts


@sparse_prompt_backward_op.register_fake
def _(grad_out, grad_routing, weight, prompts, emb, probs, mixw, k, temperature, renorm, in_h, in_w, out_h, out_w):
    n, c = weight.shape
    grad_dtype = grad_out.dtype if grad_out is not None else grad_routing.dtype
    return (
        emb.new_empty((emb.shape[0], c), dtype=grad_dtype),
        weight.new_empty((n, c)),
        weight.new_empty((n,)),
        prompts.new_empty(prompts.shape if grad_out is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, prompts, k, temperature, renorm, _, _ = inputs
    _, _, emb, probs, mixw = output
    ctx.mark_non_differentiable(emb, probs, mixw)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(weight, prompts, emb, probs, mixw)
    ctx.x_shape = tuple(x.shape)
    ctx.out_shape = tuple(output[0].shape)
    ctx.has_bias = bias is not None
    ctx.config = (k, temperature, renorm)


def _backward(ctx, grad_out, grad_routing, *_unused):
    weight, prompts, emb, probs, mixw = ctx.saved_tensors
    b, c, h, w = ctx.x_shape
    k, temperature, renorm = ctx.config
    if grad_out is None and grad_routing is None:
        return None, None, None, None, None, None, None, None, None
    grad_emb, grad_weight, grad_bias, grad_prompts = sparse_prompt_backward_op(
        grad_out, grad_routing, weight, prompts, emb, probs, mixw, k, temperature, renorm, h, w, *ctx.out_shape[2:]
    )
    grad_x = grad_emb[:, :, None, None].expand(b, c, h, w)
    return (grad_x, grad_weight, grad_bias if ctx.has_bias else None, grad_prompts if grad_out is not None else None,
            None, None, None, None, None)


sparse_prompt_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_prompt(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    prompts: Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    renorm: bool = False,
    size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused :func:`cplfast.reference.sparse_prompt` (same arguments, already validated).

    Returns ``(out (B,D,H',W'), routing (B,N))`` with ``(H',W') = size or (H,W)``.
    """
    out_h, out_w = size if size is not None else x.shape[-2:]
    out, routing, _, _, _ = sparse_prompt_op(x, weight, bias, prompts, k, temperature, renorm, out_h, out_w)
    return out, routing


__all__ = ["sparse_prompt", "sparse_prompt_backward_op", "sparse_prompt_op"]
