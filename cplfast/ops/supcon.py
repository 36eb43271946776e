"""``supcon`` on the Triton kernels (SPEC §3.5), registered as ``torch.library`` custom ops.

``cplfast::supcon_forward`` gives the per-query loss, log-sum-exp and positive count ``(N,)`` (O(N)
memory); ``cplfast::supcon_backward`` recomputes the score tiles and returns the gradients of the
queries and, when the keys are other rows (``gather=True`` under ``torch.distributed``), of the keys.
The reduction is done here in fp32 on the ``(N,)`` rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._lazy import LazyModule

kernel = LazyModule("cplfast.kernels.supcon")


@torch.library.custom_op("cplfast::supcon_forward", mutates_args=())
def supcon_forward(
    z: torch.Tensor, labels: torch.Tensor, keys: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
    offset: int, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel.supcon_forward(z, labels, keys, key_labels, offset, temperature)


@supcon_forward.register_fake
def _supcon_forward_fake(z, labels, keys, key_labels, offset, temperature):
    n = z.shape[0]
    return (z.new_empty(n, dtype=torch.float32), z.new_empty(n, dtype=torch.float32),
            z.new_empty(n, dtype=torch.int32))


@torch.library.custom_op("cplfast::supcon_backward", mutates_args=())
def supcon_backward(
    grad: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, keys: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor], offset: int, temperature: float, lse: torch.Tensor, n_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    dz, dkeys = kernel.supcon_backward(grad, z, labels, keys, key_labels, offset, temperature, lse, n_pos)
    return dz, dkeys if dkeys is not None else z.new_empty(0)


@supcon_backward.register_fake
def _supcon_backward_fake(grad, z, labels, keys, key_labels, offset, temperature, lse, n_pos):
    dz = z.new_empty(z.shape)
    return dz, keys.new_empty(keys.shape) if keys is not None else z.new_empty(0)


def _setup_context(ctx, inputs, output):
    z, labels, keys, key_labels, offset, temperature = inputs
    _, lse, n_pos = output
    ctx.mark_non_differentiable(lse, n_pos)
    ctx.save_for_backward(z, labels, keys, key_labels, lse, n_pos)
    ctx.options = (offset, temperature)


def _backward(ctx, grad_loss, _grad_lse, _grad_npos):
    z, labels, keys, key_labels, lse, n_pos = ctx.saved_tensors
    dz, dkeys = supcon_backward(grad_loss, z, labels, keys, key_labels, *ctx.options, lse, n_pos)
    return dz, None, (dkeys if keys is not None else None), None, None, None


supcon_forward.register_autograd(_backward, setup_context=_setup_context)


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    reduction: str = "mean",
    gather: bool = False,
) -> torch.Tensor:
    """Fused supervised contrastive loss; same contract as :func:`cplfast.reference.supcon`."""
    keys = key_labels = None
    offset = 0
    if gather:
        from ..distributed import gather_keys

        gathered, gathered_labels, gathered_offset = gather_keys(z, labels)
        if gathered is not z:
            keys, key_labels, offset = gathered, gathered_labels, gathered_offset
    rows, _, n_pos = supcon_forward(z, labels, keys, key_labels, int(offset), float(temperature))
    if reduction == "none":
        return rows.to(z.dtype)
    total = rows.sum()
    if reduction == "mean":
        total = total / (n_pos > 0).sum().clamp(min=1)
    return total.to(z.dtype)
