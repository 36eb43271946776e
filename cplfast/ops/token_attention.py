"""``prompt_token_attention`` on the Triton kernels, registered as ``torch.library`` custom ops.

* ``cplfast::prompt_token_attention_fwd(q, k, v, scale) -> out``
* ``cplfast::prompt_token_attention_bwd(grad_out, q, k, v, scale) -> (dq, dk, dv)``

The backward recomputes the probabilities from q and k, so only the inputs are saved.
"""

from __future__ import annotations

import torch

from ._lazy import LazyModule

_kernels = LazyModule("cplfast.kernels.token_attention")


@torch.library.custom_op("cplfast::prompt_token_attention_fwd", mutates_args=())
def prompt_token_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _kernels.token_attention_forward(q, k, v, scale)


@prompt_token_attention_fwd.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("cplfast::prompt_token_attention_bwd", mutates_args=())
def prompt_token_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.token_attention_backward(grad_out, q, k, v, scale)


@prompt_token_attention_bwd.register_fake
def _(grad_out, q, k, v, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = prompt_token_attention_bwd(grad_out, q, k, v, ctx.scale)
    return dq, dk, dv, None


prompt_token_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def prompt_token_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Fused SPEC §3.3 on validated arguments (see :func:`cplfast.functional.prompt_token_attention`).

    q ``(B,h,L,d)``; k, v ``(B,h,M,d)``, M <= 64; scale defaults to ``d ** -0.5``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return prompt_token_attention_fwd(q, k, v, float(scale))
