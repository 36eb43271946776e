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
    """``x (B,C,H,W) -> (B,C',H,W)``: the first output of ``model(x)`` (models may return extras).

    With ``size_multiple = m > 1`` the graph itself pads the bottom/right of ``x`` to the next multiple of
    ``m`` (edge replication, valid for any size; ``model.restore`` reflects when the image allows it, so
    the two agree exactly on sizes that are multiples of ``m``) and crops the output back, so the exported
    artifact takes any H x W.
    """

    def __init__(self, model: nn.Module, size_multiple: int = 1):
        super().__init__()
        self.model = model
        self.size_multiple = int(size_multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.size_multiple
        h, w = x.shape[-2], x.shape[-1]
        if m > 1:
            # edge replication as a gather of clamped indices: no branch on the pad amount, so the graph
            # stays valid for every H, W
            # at least two multiples: torch.export specialises a dimension that could be 1
            rows = torch.arange(torch.sym_max((h + m - 1) // m, 2) * m, device=x.device).clamp(max=h - 1)
            cols = torch.arange(torch.sym_max((w + m - 1) // m, 2) * m, device=x.device).clamp(max=w - 1)
            x = x.index_select(2, rows).index_select(3, cols)
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if m > 1:  # crop back, again by index (a slice would make the export branch on the pad)
            out = out.index_select(2, torch.arange(h, device=out.device)).index_select(3, torch.arange(w, device=out.device))
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
    torch.export would specialise (the graph pads H/W to ``size_multiple`` itself, so any size traces)."""
    b, c, h, w = check_example_size(example_size)
    if not dynamic:
        return b, c, h, w
    return max(b, _MIN_TRACE_SIZE), c, max(h, _MIN_TRACE_SIZE), max(w, _MIN_TRACE_SIZE)


def dynamic_shapes(*, size_multiple: int = 1):
    """``dynamic_shapes`` for ``forward(x)``: batch, height and width free (any H, W: the graph pads to
    ``size_multiple`` itself)."""
    Dim = torch.export.Dim
    return ({0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)},)


@contextlib.contextmanager
def quiet_exporter():
    """Silence the third-party noise of a normal export: the ONNX exporter logs one "torchvision is not
    installed. Skipping torchvision::..." warning per torchvision op, and torch's pytree warns a
    FutureWarning about ``LeafSpec``; neither concerns the exported model."""
    import logging

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


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
    wrapped = ImageModel(model, size_multiple)
    shapes = dynamic_shapes(size_multiple=size_multiple) if dynamic else None
    with export_mode(model):
        try:
            return torch.export.export(wrapped, (example,), dynamic_shapes=shapes, strict=False)
        except Exception as err:
            if dynamic and _is_constraint_violation(err):
                raise RuntimeError(
                    "the model's forward constrains the input size in a way the dynamic export cannot "
                    f"express with size_multiple={size_multiple} (torch.export: {_first_line(err)}); "
                    "pass the multiple of H and W the model needs as size_multiple (the graph pads to it), "
                    "or dynamic=False"
                ) from err
            raise


def _is_constraint_violation(err: BaseException) -> bool:
    name = type(err).__name__
    return "Constraint" in name or "constraint" in str(err).lower()[:2000] or "specializ" in str(err)[:2000]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
