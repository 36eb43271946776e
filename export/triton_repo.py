"""A Triton Inference Server model repository for the exported model.

Layout (the server's documented one)::

    <repo>/<model_name>/config.pbtxt          platform: "onnxruntime_onnx"
    <repo>/<model_name>/1/model.onnx
    <repo>/<model_name>_trt/config.pbtxt      platform: "tensorrt_plan"   (when an engine is given)
    <repo>/<model_name>_trt/1/model.plan

Each model directory holds one platform, so the ONNX model and the TensorRT plan are two models of the
repository. Dynamic dimensions are written as -1. With ``max_batch_size=0`` the batch is an explicit
(dynamic) first dim of every tensor; with ``max_batch_size > 0`` Triton owns the batch dim, the dims
list omits it, and requests of equal shape are batched by the dynamic batcher.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

# ONNX TensorProto element type -> Triton data type.
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64"}
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton data type and dims (-1 = dynamic), batch dim included."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def onnx_io(onnx_path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX model as :class:`TensorSpec` (symbolic dims become -1)."""
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tensor_type = value.type.tensor_type
        data_type = _ONNX_TO_TRITON.get(tensor_type.elem_type)
        if data_type is None:
            raise ValueError(f"tensor {value.name!r} has ONNX element type {tensor_type.elem_type}, not supported here")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        return TensorSpec(value.name, data_type, dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def _tensor_block(spec: TensorSpec, batched: bool) -> str:
    dims = spec.dims[1:] if batched else spec.dims
    return (
        "  {\n"
        f'    name: "{spec.name}"\n'
        f"    data_type: {spec.data_type}\n"
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
        "  }"
    )


def triton_config(
    name: str,
    *,
    platform: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int = 0,
    instance_kind: str | None = None,
    instance_count: int = 1,
) -> str:
    """The text of ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    if not _NAME.match(name):
        raise ValueError(f"model name must use letters, digits, '_', '.', '-' only, got {name!r}")
    if platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        raise ValueError(f"platform must be 'onnxruntime_onnx' or 'tensorrt_plan', got {platform!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ValueError(f"max_batch_size must be an int >= 0, got {max_batch_size!r}")
    if instance_kind is not None and instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS} or None, got {instance_kind!r}")
    if isinstance(instance_count, bool) or not isinstance(instance_count, int) or instance_count < 1:
        raise ValueError(f"instance_count must be a positive int, got {instance_count!r}")
    batched = max_batch_size > 0
    if batched:
        for spec in (*inputs, *outputs):
            if not spec.dims or spec.dims[0] != -1:
                raise ValueError(f"max_batch_size > 0 needs a dynamic batch dim, but {spec.name!r} has dims {spec.dims}")
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(s, batched) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(s, batched) for s in outputs) + "\n]",
    ]
    if instance_kind is not None:
        lines.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {instance_kind}\n  }}\n]")
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def write_triton_repo(
    repo: str | os.PathLike,
    *,
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    model_name: str = "cplfast",
    max_batch_size: int = 0,
    instance_kind: str | None = None,
    version: int = 1,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write (or add to) the model repository ``repo``; return ``{model name: model directory}``.

    ``onnx_path``: the ONNX model (from :func:`cplfast.export.to_onnx`), served by ONNX Runtime as
    ``model_name``. ``engine_path``: a TensorRT engine built from that ONNX file
    (:func:`cplfast.export.build_engine`), served as ``<model_name>_trt``; its inputs/outputs are the
    ONNX model's. ``instance_kind``: ``KIND_GPU`` / ``KIND_CPU`` / ``KIND_AUTO`` or None (server default).
    An existing model directory is replaced only with ``overwrite=True``.
    """
    repo = Path(os.fspath(repo))
    onnx_path = Path(os.fspath(onnx_path))
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: no ONNX file at {str(onnx_path)!r}")
    if engine_path is not None:
        engine_path = Path(os.fspath(engine_path))
        if not engine_path.is_file():
            raise FileNotFoundError(f"engine_path: no TensorRT engine at {str(engine_path)!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")
    if repo.exists() and not repo.is_dir():
        raise NotADirectoryError(f"repo must be a directory, got the file {str(repo)!r}")
    inputs, outputs = onnx_io(onnx_path)
    if (onnx_path.parent / (onnx_path.name + ".data")).exists():
        raise ValueError(
            f"{str(onnx_path)!r} keeps its weights in external data; Triton's layout here expects one model.onnx"
        )

    models = {model_name: ("onnxruntime_onnx", onnx_path, "model.onnx")}
    if engine_path is not None:
        models[f"{model_name}_trt"] = ("tensorrt_plan", engine_path, "model.plan")
    configs = {
        name: triton_config(
            name, platform=platform, inputs=inputs, outputs=outputs,
            max_batch_size=max_batch_size,
            instance_kind="KIND_GPU" if platform == "tensorrt_plan" and instance_kind in (None, "KIND_AUTO") else instance_kind,
        )
        for name, (platform, _, _) in models.items()
    }  # validate everything before touching the disk
    written = {}
    for name, (_, source, filename) in models.items():
        directory = repo / name
        if directory.exists():
            if not overwrite:
                raise FileExistsError(f"{str(directory)!r} exists; pass overwrite=True to replace it")
            shutil.rmtree(directory)
        _place(source, directory / str(version) / filename)
        (directory / "config.pbtxt").write_text(configs[name], encoding="utf-8")
        written[name] = directory
    return written


__all__ = ["INSTANCE_KINDS", "TensorSpec", "onnx_io", "triton_config", "write_triton_repo"]
