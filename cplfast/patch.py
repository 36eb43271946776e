"""Drop-in patching of existing models (the Liger-Kernel pattern).

``cplfast.patch(model)`` walks any module tree — e.g. a network built from the official PromptIR code —
and swaps, in place:

* every PromptGenBlock-shaped module (has ``prompt_param (1,N,D,S,S)``, ``linear_layer`` (Linear C->N)
  and ``conv3x3`` (Conv2d D->D)) for :class:`cplfast.PromptGenBlock`, or for
  :class:`cplfast.SparsePromptModule` with ``top_k`` when ``top_k`` is given;
* every Restormer MDTA attention (has ``num_heads``, ``temperature (h,1,1)``, ``qkv`` (1x1, C->3C),
  ``qkv_dwconv`` (depthwise 3x3) and ``project_out`` (1x1, C->C)) for :class:`cplfast.models.MDTA`, which
  calls :func:`cplfast.functional.topm_channel_attention` with ``fractions=None`` (fused on CUDA).

The new modules hold the *same* Parameter objects and sub-modules as the ones they replace (nothing is
copied), so the state_dict keys and values, any optimizer already holding the parameters, and (with
``top_k=None``) the outputs and gradients are unchanged. Hooks registered on the replaced modules
themselves are not carried over.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .layers import PromptGenBlock, SparsePromptModule
from .models.restormer import MDTA

logger = logging.getLogger(__name__)


def _is_prompt_gen(module: nn.Module) -> bool:
    param, linear, conv = (getattr(module, n, None) for n in ("prompt_param", "linear_layer", "conv3x3"))
    if not (isinstance(param, nn.Parameter) and isinstance(linear, nn.Linear) and isinstance(conv, nn.Conv2d)):
        return False
    if param.dim() != 5 or param.shape[0] != 1 or param.shape[3] != param.shape[4]:
        return False
    _, n, d, _, _ = param.shape
    return (linear.out_features == n and conv.in_channels == d and conv.out_channels == d
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1)


def _is_mdta(module: nn.Module) -> bool:
    names = ("temperature", "qkv", "qkv_dwconv", "project_out")
    temperature, qkv, dwconv, project = (getattr(module, n, None) for n in names)
    heads = getattr(module, "num_heads", None)
    if not (isinstance(temperature, nn.Parameter) and isinstance(heads, int) and isinstance(qkv, nn.Conv2d)
            and isinstance(dwconv, nn.Conv2d) and isinstance(project, nn.Conv2d)):
        return False
    dim = project.out_channels
    return (tuple(temperature.shape) == (heads, 1, 1) and dim % heads == 0
            and qkv.in_channels == dim and qkv.out_channels == 3 * dim and qkv.kernel_size == (1, 1)
            and dwconv.in_channels == 3 * dim and dwconv.groups == 3 * dim and dwconv.kernel_size == (3, 3)
            and dwconv.padding == (1, 1) and project.in_channels == dim and project.kernel_size == (1, 1))


def _adopt(new: nn.Module, old: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Give ``new`` (built on the meta device) ``old``'s parameters / sub-modules under ``names``."""
    for name in names:
        setattr(new, name, getattr(old, name))
    leftover = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"patch: {type(new).__name__} kept unshared tensors {leftover}; cplfast is out of date")
    return new.train(old.training)


def _prompt_replacement(old: nn.Module, top_k: int | None) -> nn.Module:
    _, n, d, s, _ = old.prompt_param.shape
    args = dict(prompt_dim=d, prompt_len=n, prompt_size=s, lin_dim=old.linear_layer.in_features)
    with torch.device("meta"):
        new = PromptGenBlock(**args) if top_k is None else SparsePromptModule(**args, top_k=top_k)
    return _adopt(new, old, ("prompt_param", "linear_layer", "conv3x3"))


def _attention_replacement(old: nn.Module) -> nn.Module:
    dim = old.project_out.out_channels
    with torch.device("meta"):
        new = MDTA(dim, old.num_heads, bias=old.qkv.bias is not None)
    return _adopt(new, old, ("temperature", "qkv", "qkv_dwconv", "project_out"))


def patch(model: nn.Module, *, top_k: int | None = None, prompts: bool = True, attention: bool = True) -> nn.Module:
    """Swap PromptGenBlock-shaped modules and MDTA attentions in ``model`` for cplfast's, in place.

    Args:
        model: any ``nn.Module``.
        top_k: None keeps PromptIR's dense prompt mix (outputs unchanged); an int turns every prompt
            block into CPL's :class:`~cplfast.SparsePromptModule` keeping the ``top_k`` largest weights.
        prompts / attention: which of the two kinds of module to swap.

    Returns ``model`` (or the replacement, if ``model`` itself was such a module). Modules that are already
    cplfast's are left alone (a PromptGenBlock still becomes a SparsePromptModule when ``top_k`` is given).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")

    def replacement(module: nn.Module) -> nn.Module | None:
        if prompts and _is_prompt_gen(module):
            if top_k is None and isinstance(module, PromptGenBlock) and module.top_k is None:
                return None
            if top_k is not None and isinstance(module, SparsePromptModule) and module.top_k == top_k:
                return None
            n = module.prompt_param.shape[1]
            if top_k is not None and top_k > n:
                raise ValueError(f"top_k must be in [1, prompt_len={n}] for {type(module).__name__}, got {top_k}")
            return _prompt_replacement(module, top_k)
        if attention and _is_mdta(module) and not isinstance(module, MDTA):
            return _attention_replacement(module)
        return None

    counts = {"prompt": 0, "attention": 0}
    root_new = replacement(model)
    if root_new is not None:
        return root_new
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
                counts["prompt" if isinstance(new, PromptGenBlock) else "attention"] += 1
    logger.info("cplfast.patch: replaced %d prompt block(s) and %d attention(s)", counts["prompt"], counts["attention"])
    return model


__all__ = ["patch"]
