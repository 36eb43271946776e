"""``infonce`` on the Triton kernels (SPEC §3.4), registered as ``torch.library`` custom ops.

``cplfast::infonce_forward`` returns the loss and per-location ``stats`` (norms and logits, fp32,
``(2K+3, L)``) kept for ``cplfast::infonce_backward``, which rereads the inputs once and writes the
gradients of the inputs that need them (an empty tensor stands for a gradient not asked for).
"""

from __future__ import annotations

import torch

from ._lazy import LazyModule

kernel = LazyModule("cplfast.kernels.infonce")


@torch.library.custom_op("cplfast::infonce_forward", mutates_args=())
def infonce_forward(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float, dim: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel.infonce_forward(anchor, positive, negatives, temperature, dim, reduction)


@infonce_forward.register_fake
def _infonce_forward_fake(anchor, positive, negatives, temperature, dim, reduction):
    if reduction == "none":
        loss = anchor.new_empty([s for d, s in enumerate(anchor.shape) if d != dim])
    else:
        loss = anchor.new_empty(())
    stats = anchor.new_empty((kernel.stats_rows(negatives.shape[0]), kernel.num_locations(anchor, dim)),
                             dtype=torch.float32)
    return loss, stats


@torch.library.custom_op("cplfast::infonce_backward", mutates_args=())
def infonce_backward(
    grad: torch.Tensor, anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
    stats: torch.Tensor, temperature: float, dim: int, reduction: str,
    need_anchor: bool, need_positive: bool, need_negatives: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = kernel.infonce_backward(
        grad, anchor, positive, negatives, stats, temperature, dim, reduction,
        need_anchor, need_positive, need_negatives,
    )
    return tuple(g if g is not None else anchor.new_empty(0) for g in grads)


@infonce_backward.register_fake
def _infonce_backward_fake(grad, anchor, positive, negatives, stats, temperature, dim, reduction,
                           need_anchor, need_positive, need_negatives):
    return (
        torch.empty_like(anchor) if need_anchor else anchor.new_empty(0),
        torch.empty_like(positive) if need_positive else anchor.new_empty(0),
        torch.empty_like(negatives) if need_negatives else anchor.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    anchor, positive, negatives, temperature, dim, reduction = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(anchor, positive, negatives, stats)
    ctx.options = (temperature, dim, reduction)


def _backward(ctx, grad_loss, _grad_stats):
    anchor, positive, negatives, stats = ctx.saved_tensors
    need_a, need_p, need_n = ctx.needs_input_grad[:3]
    if not (need_a or need_p or need_n):
        return None, None, None, None, None, None
    da, dp, dn = infonce_backward(grad_loss, anchor, positive, negatives, stats, *ctx.options, need_a, need_p, need_n)
    return (da if need_a else None, dp if need_p else None, dn if need_n else None, None, None, None)


infonce_forward.register_autograd(_backward, setup_context=_setup_context)


def infonce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float = 0.1,
    dim: int = 1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fused InfoNCE; same contract as :func:`cplfast.reference.infonce` (arguments already validated)."""
    loss, _ = infonce_forward(anchor, positive, negatives, float(temperature), int(dim), reduction)
    return loss
