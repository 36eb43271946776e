"""What every launcher asks of the device: which GPU to launch on, how many SMs it has, which dot precision.

* :func:`device_guard` makes the tensors' GPU current for the launch (Triton launches on the current
  device, so tensors on ``cuda:1`` while ``cuda:0`` is current would otherwise be read from the wrong GPU).
* :func:`sm_count` is cached per device index; :func:`cache_clear` forgets it (the compile audit fakes it).
* :func:`dot_precision` maps PyTorch's fp32 matmul convention onto ``tl.dot(input_precision=...)``:

  ================================================  =============================================
  ``torch.get_float32_matmul_precision()``           fp32 operands
  ================================================  =============================================
  ``"highest"`` (PyTorch's default)                  ``"ieee"``: fp32 FMA, no tensor cores
  ``"high"``                                         ``"tf32x3"``: three TF32 products, ~fp32 accuracy
  ``"medium"``                                       ``"tf32"``: one TF32 product (10-bit mantissa)
  ================================================  =============================================

  fp16/bf16 inputs are upcast to fp32 on load; their values are exact in TF32, so their dots use
  ``"tf32"`` (tensor cores) whatever the setting. (Setting ``torch.backends.cuda.matmul.allow_tf32``
  moves PyTorch's precision to ``"high"``, so it maps to ``"tf32x3"``.) The interpreter (CPU tensors)
  always uses ``"ieee"``.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def device_guard(device: torch.device):
    """Context that makes ``device`` the current CUDA device for the launches inside it."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 for CPU tensors: the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def cache_clear() -> None:
    _sm_count.cache_clear()


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` for ``tl.dot`` on operands loaded from ``dtype`` tensors (see the module docstring)."""
    if device.type != "cuda":
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[torch.get_float32_matmul_precision()]
