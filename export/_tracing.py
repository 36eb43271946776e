"""``torch.export`` of an image-to-image model with dynamic batch, height and width.

Shared by the ONNX and AOTInductor paths. While tracing, the model runs the PyTorch reference of every
fused op (``cplfast.use_backend("reference")``), so the graph holds only standard aten ops: no Triton
kernel or custom op reaches ONNX or Inductor.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import torch
from torch import nn

from .. import _backend

# torch.export specialises any dimension whose example value is 0 or 1, so a dynamic dimension is
# traced with at least this many elements (the exported graph still accepts 1).
_MIN_TRACE_SIZE = 2


class ImageModel(nn.Module):
    """``x (B,C,H,W) -> (B,C',H,W)``: the first output of ``model(x)`` (models may return extras)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_example_size(example_size: Sequence[int]) -> tuple[int, int, int, int]:
    size = tuple(example_size) if isinstance(example_size, (tuple, list, torch.Size)) else None
    if size is None or len(size) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"example_size must be four positive ints (B, C, H, W), got {example_size!r}")
    return size  # type: ignore[return-value]


def default_size_multiple(model: nn.Module) -> int:
    """The multiple H and W must be for ``model``: its ``size_multiple`` attribute when it has one, 8 for
    cplfast's PromptIR family (three 2x downsamplings), else 1."""
    value = getattr(model, "size_multiple", None)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    from ..models import PromptIR
    from ..models.inference import MULTIPLE

    return MULTIPLE if isinstance(model, PromptIR) else 1


def check_size_multiple(size_multiple: object) -> int:
    if isinstance(size_multiple, bool) or not isinstance(size_multiple, int) or size_multiple < 1:
        raise ValueError(f"size_multiple must be a positive int, got {size_multiple!r}")
    return size_multiple


def trace_size(example_size: Sequence[int], *, dynamic: bool, size_multiple: int) -> tuple[int, int, int, int]:
    """The input shape used for tracing: ``example_size`` with dynamic dims lifted off the 0/1 values
    torch.export would specialise, and H/W rounded up to ``size_multiple``."""
    b, c, h, w = check_example_size(example_size)
    if not dynamic:
        return b, c, h, w

    def spatial(v: int) -> int:
        v = max(v, _MIN_TRACE_SIZE)
        v = -(-v // size_multiple) * size_multiple
        return v if v // size_multiple >= _MIN_TRACE_SIZE else size_multiple * _MIN_TRACE_SIZE

    return max(b, _MIN_TRACE_SIZE), c, spatial(h), spatial(w)


def dynamic_shapes(*, size_multiple: int):
    """``dynamic_shapes`` for ``forward(x)``: batch, height and width free (H, W multiples of ``size_multiple``)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1)
    if size_multiple == 1:
        height, width = Dim("height", min=1), Dim("width", min=1)
    else:
        height = size_multiple * Dim("height_blocks", min=1)
        width = size_multiple * Dim("width_blocks", min=1)
    return ({0: batch, 2: height, 3: width},)


@contextlib.contextmanager
def export_mode(model: nn.Module):
    """Eval mode, no autograd, reference ops; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _backend.use_backend("reference"), warnings.catch_warnings():
            # Layers that keep diagnostics (e.g. SparsePromptModule.last_routing) assign tensor
            # attributes in forward; torch.export warns about each. They are not graph outputs.
            warnings.filterwarnings("ignore", message=r".*assigned during export.*")
            yield
    finally:
        model.train(was_training)


def export_program(
    model: nn.Module,
    example_size: Sequence[int],
    *,
    dynamic: bool,
    size_multiple: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``ImageModel(model)`` on a random input of ``trace_size(...)``.

    ``size_multiple=None``: :func:`default_size_multiple`.
    """
    check_model(model)
    if size_multiple is None:
        size_multiple = default_size_multiple(model)
    size_multiple = check_size_multiple(size_multiple)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    size = trace_size(example_size, dynamic=dynamic, size_multiple=size_multiple)
    example = torch.randn(size, device=device, dtype=dtype)
    wrapped = ImageModel(model)
    shapes = dynamic_shapes(size_multiple=size_multiple) if dynamic else None
    with export_mode(model):
        try:
            return torch.export.export(wrapped, (example,), dynamic_shapes=shapes, strict=False)
        except Exception as err:
            if dynamic and _is_constraint_violation(err):
                raise RuntimeError(
                    "the model's forward constrains the input size in a way the dynamic export cannot "
                    f"express with size_multiple={size_multiple} (torch.export: {_first_line(err)}); "
                    "pass size_multiple=8 (inputs padded to multiples of 8 by the caller) or dynamic=False"
                ) from err
            raise


def _is_constraint_violation(err: BaseException) -> bool:
    name = type(err).__name__
    return "Constraint" in name or "constraint" in str(err).lower()[:2000] or "specializ" in str(err)[:2000]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
