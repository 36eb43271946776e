"""Deployment (SPEC §7): ONNX, TensorRT engines, AOTInductor packages, Triton Inference Server repositories.

- :func:`to_onnx` — ONNX with dynamic batch/height/width, standard operators only;
  :func:`check_tensorrt_ops` — every operator must be one TensorRT 10's ONNX parser accepts.
- :func:`build_engine` / :class:`TensorRTRunner` — TensorRT 10 engine from the ONNX file, and its runner
  (torch tensors, or pycuda buffers for a torch-free runtime). TensorRT is imported only when used.
- :func:`to_aoti` / :func:`load_aoti` — ``torch.export`` + AOTInductor ``.pt2`` package.
- :func:`write_triton_repo` — ``<repo>/<model>/config.pbtxt`` + ``1/model.onnx`` (and ``model.plan``).
- :func:`parity_report` — max-abs error of every artifact against PyTorch, and latency of each runtime.

Optional packages (onnx, onnxruntime, tensorrt, pycuda) are imported lazily, so ``import cplfast.export``
is cheap and works without them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "to_onnx": ".onnx_export",
    "OPSETS": ".onnx_export",
    "check_tensorrt_ops": ".ops_check",
    "tensorrt_op_table": ".ops_check",
    "TensorRTOpReport": ".ops_check",
    "build_engine": ".tensorrt_engine",
    "TensorRTRunner": ".tensorrt_engine",
    "TensorRTUnavailableError": ".tensorrt_engine",
    "require_tensorrt": ".tensorrt_engine",
    "tensorrt_available": ".tensorrt_engine",
    "to_aoti": ".aoti",
    "load_aoti": ".aoti",
    "write_triton_repo": ".triton_repo",
    "triton_config": ".triton_repo",
    "OnnxRunner": ".parity",
    "parity_report": ".parity",
    "format_report": ".parity",
    "max_abs_error": ".parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
