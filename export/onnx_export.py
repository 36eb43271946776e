"""ONNX export with dynamic batch/height/width, lowered to standard ONNX operators only.

``to_onnx`` traces the model with ``torch.export`` (reference ops, see :mod:`._tracing`), converts it
with PyTorch's ONNX exporter, then checks the file (``onnx.checker`` with strict shape inference), stores
the inferred shapes and, when ``onnxsim`` happens to be installed, simplifies it. The stable sort behind
the top-k routing becomes ONNX ``TopK`` (which TensorRT parses); ``TopK`` breaks ties by the lower
index, the same order as ``torch.sort(stable=True, descending=True)``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import _tracing

# TensorRT 10's parser reads opsets 9-20. PyTorch's exporter builds opset 18 and converts up; converting
# down to 17 fails for ReduceMean/ReduceL2 (axes input -> attribute), so 17 is not offered.
OPSETS = (18, 19, 20)
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_PROTOBUF_LIMIT = 2**31 - 2**26  # leave headroom under protobuf's 2 GiB message limit


def _onnx_modules():
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"ONNX export needs the package(s) {', '.join(missing)}: pip install onnx onnxscript "
            "(or pip install 'cplfast[onnx]')"
        )
    import onnx
    import onnxscript

    return onnx, onnxscript


def _sort_as_topk(opset: int):
    """Translation of ``aten.sort.stable`` into ONNX ``TopK`` over the whole axis.

    PyTorch's exporter has no ONNX function for the ``stable`` overload; ``TopK(k = size of the axis,
    largest = descending, sorted = 1)`` is exactly a stable sort, since TopK orders equal values by index.
    The axis length is written as a constant when it is static (TensorRT wants a constant k).
    """
    import onnxscript

    op = onnxscript.values.Opset("", opset)

    def sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
        rank = len(self.shape) if self.shape is not None else None
        size = self.shape[dim] if rank is not None else None
        if isinstance(size, int):
            k = op.Constant(value_ints=[size])
        else:
            k = op.Reshape(
                op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1])
            )
        values, indices = op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)
        return values, indices

    return sort_stable


def _check_opset(opset: object) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS}, got {opset!r}")
    return opset


def _parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _maybe_simplify(onnx, model_proto):
    """``onnxsim.simplify`` when installed and successful; otherwise the model unchanged."""
    if importlib.util.find_spec("onnxsim") is None:
        return model_proto, False
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model_proto)
        if ok:
            onnx.checker.check_model(simplified)
            return simplified, True
    except Exception:  # simplification is an optional optimisation: any failure keeps the original
        pass
    return model_proto, False


def _name_dynamic_dims(proto) -> None:
    """Rename the exporter's symbols (``s77``...) of the input's dims 0/2/3 to batch/height/width,
    everywhere they occur (inputs, outputs, inferred shapes, expressions such as ``s53*2``)."""
    names = {}
    for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        if axis < len(dims) and dims[axis].dim_param:
            names[dims[axis].dim_param] = name
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in names) + r")\b")
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def _metadata(model: nn.Module, *, size_multiple: int, dynamic: bool) -> dict[str, str]:
    meta = {
        "producer": "cplfast",
        "layout": "NCHW",
        "dynamic_axes": "batch,height,width" if dynamic else "none",
        "size_multiple": str(size_multiple),  # H, W are padded to it inside the graph: any size runs
    }
    for attribute, key in (("prompt_type", "prompt"), ("preset", "preset")):
        value = getattr(model, attribute, None)
        if isinstance(value, str):
            meta[f"cplfast.{key}"] = value
    return meta


def _export_onnx(program, opset: int):
    return torch.onnx.export(
        program,
        f=None,
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        custom_translation_table={torch.ops.aten.sort.stable: _sort_as_topk(opset)},
        optimize=True,
        verbose=False,
    )


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic: bool = True,
    example_size: Sequence[int] = (1, 3, 128, 128),
    size_multiple: int | None = None,
    simplify: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Export ``model`` (``x (B,C,H,W) -> (B,C',H,W)``) to an ONNX file and return its path.

    - ``dynamic=True``: batch, height and width are free (named ``batch``/``height``/``width``), any
      size: the graph pads H and W to a multiple of ``size_multiple`` (edge replication, at least two
      multiples) and crops the output back (``size_multiple``: 8 for cplfast's PromptIR models, a
      ``size_multiple`` attribute of the model if it has one, else 1). ``dynamic=False`` fixes
      ``example_size``.
    - The graph holds standard ONNX operators only (fused ops run their PyTorch reference while
      tracing). Input ``"input"``, output ``"output"``.
    - The file passes ``onnx.checker`` (full check) and carries inferred shapes; it is simplified with
      ``onnxsim`` when that package is installed and ``simplify`` is true.
    - Models over ~2 GB of weights are saved with external data next to ``path``.
    """
    onnx, _ = _onnx_modules()
    _tracing.check_model(model)
    opset = _check_opset(opset)
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be a bool, got {type(dynamic).__name__}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    path = Path(os.fspath(path))
    if path.is_dir():
        raise IsADirectoryError(f"path must be a file path, got the directory {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)

    if size_multiple is None:
        size_multiple = _tracing.default_size_multiple(model)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)  # never cast the caller's model in place
    with _tracing.quiet_exporter():
        program = _tracing.export_program(
            model, example_size, dynamic=dynamic, size_multiple=size_multiple, dtype=dtype
        )
        onnx_program = _export_onnx(program, opset)
    external = _parameter_bytes(model) > _PROTOBUF_LIMIT
    # Write next to the target and rename at the end: a failed export never leaves a half file.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
        staged = Path(tmp) / path.name
        onnx_program.save(str(staged), external_data=external)
        proto = onnx.load(str(staged))
        written_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if written_opset != opset:
            raise RuntimeError(f"the exporter wrote opset {written_opset} instead of the requested {opset}")
        if dynamic:
            _name_dynamic_dims(proto)
        for key, value in _metadata(model, size_multiple=size_multiple, dynamic=dynamic).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        if simplify:
            proto, _ = _maybe_simplify(onnx, proto)
        if external:
            onnx.save(proto, str(staged), save_as_external_data=True, location=path.name + ".data")
            onnx.checker.check_model(str(staged), full_check=True)
            os.replace(Path(tmp) / (path.name + ".data"), path.parent / (path.name + ".data"))
        else:
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(staged))
        os.replace(staged, path)
    return path


__all__ = ["INPUT_NAME", "OPSETS", "OUTPUT_NAME", "to_onnx"]
