"""Parameter and MAC counts of a restoration model, with the share taken by its prompt path.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one forward at the given size
(convolutions, matmuls, einsums; elementwise ops are not counted, as is usual). One MAC = 2 flops.
The prompt path is what :meth:`PromptIR.prompt_module_names` lists (prompt generation + interaction).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelSummary:
    params: int
    trainable_params: int
    prompt_params: int
    macs: int
    prompt_macs: int
    size: tuple[int, int]

    @property
    def prompt_param_share(self) -> float:
        return self.prompt_params / self.params if self.params else 0.0

    @property
    def prompt_mac_share(self) -> float:
        return self.prompt_macs / self.macs if self.macs else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(prompt_param_share=self.prompt_param_share, prompt_mac_share=self.prompt_mac_share)
        return out

    def __str__(self) -> str:
        h, w = self.size
        return "\n".join([
            f"parameters        {self.params:>16,d}  (trainable {self.trainable_params:,d})",
            f"prompt parameters {self.prompt_params:>16,d}  ({100 * self.prompt_param_share:.2f}%)",
            f"MACs @ {h}x{w:<9} {self.macs:>16,d}  ({self.macs / 1e9:.2f} G)",
            f"prompt MACs       {self.prompt_macs:>16,d}  ({100 * self.prompt_mac_share:.2f}%)",
        ])


def _count_params(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def summary(model: nn.Module, size: tuple[int, int] | int = (256, 256), *, batch: int = 1,
            verbose: bool = True) -> ModelSummary:
    """Count parameters and MACs of ``model`` on a ``(batch, C, H, W)`` input; print it when ``verbose``.

    Works on any module taking one image tensor; prompt shares need ``model.prompt_module_names()``.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = tuple(model.prompt_module_names()) if hasattr(model, "prompt_module_names") else ()
    prompt_modules = [getattr(model, n) for n in names]

    channels = getattr(getattr(model, "config", None), "in_channels", 3)
    param = next(model.parameters())
    x = torch.zeros(batch, channels, *size, device=param.device, dtype=param.dtype)
    # Count per top-level child with hooks around FlopCounterMode totals: robust to how the mode names modules.
    per_child: dict[str, int] = {}
    counter = FlopCounterMode(display=False)
    handles = []

    def pre_hook(name):
        def hook(module, args):
            per_child.setdefault(name, 0)
            per_child[name] -= counter.get_total_flops()
        return hook

    def post_hook(name):
        def hook(module, args, output):
            per_child[name] += counter.get_total_flops()
        return hook

    for name in names:
        child = getattr(model, name)
        handles.append(child.register_forward_pre_hook(pre_hook(name)))
        handles.append(child.register_forward_hook(post_hook(name)))
    was_training = model.training
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        # Parameters are frozen rather than run under no_grad: FlopCounterMode's module tracker expects
        # tensors that require grad to carry a grad_fn, which leaf parameters under no_grad do not.
        for p, _ in requires_grad:
            p.requires_grad_(False)
        with counter:
            model(x)
    finally:
        model.train(was_training)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for handle in handles:
            handle.remove()
    result = ModelSummary(
        params=_count_params([model]),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        prompt_params=_count_params(prompt_modules),
        macs=counter.get_total_flops() // 2,
        prompt_macs=sum(per_child.values()) // 2,
        size=tuple(size),
    )
    if verbose:
        print(result)
    return result


__all__ = ["ModelSummary", "summary"]
