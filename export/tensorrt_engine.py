"""TensorRT 10: build an engine from an ONNX file, serialise it, load it and run it.

Written against TensorRT 10's Python API (``tensorrt``): ``Builder`` → ``create_network`` (networks
are always explicit-batch in TensorRT 10) → ``OnnxParser`` → ``IBuilderConfig`` (workspace pool limit,
FP16/BF16 flags, one optimisation profile, timing cache) → ``build_serialized_network``; at run time
``Runtime.deserialize_cuda_engine`` → ``create_execution_context`` → ``set_input_shape`` /
``set_tensor_address`` → ``execute_async_v3``.

``tensorrt`` (and ``pycuda`` for the torch-free mode) are imported only when used; without them every
entry point raises :class:`TensorRTUnavailableError` with one line naming the package to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Sequence

PRECISIONS = ("fp32", "fp16", "bf16")
INSTALL_HINT = "pip install tensorrt"


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (or pycuda) is not installed, or there is no CUDA device to build/run on."""


def tensorrt_available() -> bool:
    """True when the ``tensorrt`` package can be imported here (says nothing about a GPU)."""
    return importlib.util.find_spec("tensorrt") is not None


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise :class:`TensorRTUnavailableError`."""
    if not tensorrt_available():
        raise TensorRTUnavailableError(
            f"TensorRT is not installed: {INSTALL_HINT} (TensorRT 10+, needs an NVIDIA GPU with CUDA)"
        )
    try:
        return importlib.import_module("tensorrt")
    except Exception as err:  # e.g. libnvinfer missing behind an installed wheel
        raise TensorRTUnavailableError(
            f"the 'tensorrt' package is installed but failed to import ({err}); reinstall it: {INSTALL_HINT}"
        ) from err


def _require_pycuda():
    if importlib.util.find_spec("pycuda") is None:
        raise TensorRTUnavailableError("the pycuda buffer mode needs pycuda: pip install pycuda")
    import pycuda.autoprimaryctx  # noqa: F401  (makes the device's primary context current)
    import pycuda.driver as cuda

    return cuda


def _shape(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ValueError(f"{name} must be a tuple of positive ints such as (1, 3, 256, 256), got {value!r}")
    return tuple(value)


def _check_profile(min_shape, opt_shape, max_shape) -> tuple[tuple[int, ...], ...]:
    shapes = _shape("min_shape", min_shape), _shape("opt_shape", opt_shape), _shape("max_shape", max_shape)
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"min_shape, opt_shape and max_shape must have the same rank, got {shapes}")
    low, opt, high = shapes
    if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
        raise ValueError(f"need min_shape <= opt_shape <= max_shape in every dim, got {low}, {opt}, {high}")
    return shapes


def _logger(trt, verbose: bool):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def _write_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    min_shape: Sequence[int] = (1, 3, 64, 64),
    opt_shape: Sequence[int] = (1, 3, 256, 256),
    max_shape: Sequence[int] = (4, 3, 1024, 1024),
    workspace_gb: float = 4.0,
    timing_cache: str | os.PathLike | None = None,
    input_name: str | None = None,
    verbose: bool = False,
) -> Path:
    """Build a TensorRT engine from ``onnx_path`` and write it (serialised) to ``engine_path``.

    - ``precision``: ``"fp32"``; ``"fp16"`` / ``"bf16"`` allow those kernels (TensorRT keeps fp32
      where it is faster or needed; inputs and outputs stay fp32).
    - One optimisation profile ``min_shape <= opt_shape <= max_shape`` for the (single) image input.
    - ``workspace_gb``: limit of the builder's workspace memory pool.
    - ``timing_cache``: a file read before the build (when it exists) and rewritten after it, so later
      builds of similar networks skip kernel timing.

    Raises :class:`TensorRTUnavailableError` without TensorRT, ``RuntimeError`` with the parser's
    messages when the ONNX file does not parse or the build fails.
    """
    trt = require_tensorrt()
    onnx_path = Path(os.fspath(onnx_path))
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: no ONNX file at {str(onnx_path)!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(workspace_gb, bool) or not isinstance(workspace_gb, (int, float)) or not workspace_gb > 0:
        raise ValueError(f"workspace_gb must be a positive number of GiB, got {workspace_gb!r}")
    low, opt, high = _check_profile(min_shape, opt_shape, max_shape)
    engine_path = Path(os.fspath(engine_path))
    cache_path = None if timing_cache is None else Path(os.fspath(timing_cache))

    logger = _logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {str(onnx_path)!r}: {errors or 'unknown parser error'}")
    if network.num_inputs != 1:
        raise RuntimeError(f"expected an ONNX model with one input image, got {network.num_inputs} inputs")
    network_input = network.get_input(0)
    name = input_name or network_input.name
    if name != network_input.name:
        raise ValueError(f"input_name {input_name!r} does not match the model's input {network_input.name!r}")
    if len(network_input.shape) != len(low):
        raise ValueError(
            f"min/opt/max shapes have rank {len(low)} but the model's input {name!r} has shape "
            f"{tuple(network_input.shape)}"
        )
    for axis, fixed in enumerate(network_input.shape):
        if fixed > 0 and not low[axis] == opt[axis] == high[axis] == fixed:
            raise ValueError(
                f"dim {axis} of input {name!r} is fixed to {fixed} in the ONNX model; min/opt/max shapes "
                f"must use {fixed} there, got {low[axis]}, {opt[axis]}, {high[axis]}"
            )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if cache_path is not None:
        cached = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see the log above)")
    _write_atomic(engine_path, serialized)
    if cache_path is not None:
        _write_atomic(cache_path, config.get_timing_cache().serialize())
    return engine_path


class TensorRTRunner:
    """Run a serialised TensorRT engine with one image input and one output.

    ``mode="torch"`` (default): call with a CUDA (or CPU, copied over) ``torch.Tensor`` and get a CUDA
    ``torch.Tensor``; it runs on torch's current CUDA stream. ``mode="pycuda"``: call with a NumPy array
    and get a NumPy array back; buffers live in pycuda device memory, no torch needed.

    The input shape must lie within the engine's optimisation profile (:attr:`profile`).
    """

    def __init__(self, engine_path: str | os.PathLike, *, mode: str = "torch", verbose: bool = False):
        if mode not in ("torch", "pycuda"):
            raise ValueError(f"mode must be 'torch' or 'pycuda', got {mode!r}")
        trt = require_tensorrt()
        self._trt = trt
        self.mode = mode
        self.engine_path = Path(os.fspath(engine_path))
        if not self.engine_path.is_file():
            raise FileNotFoundError(f"engine_path: no engine file at {str(self.engine_path)!r}")
        if mode == "pycuda":
            self._cuda = _require_pycuda()
        self._runtime = trt.Runtime(_logger(trt, verbose))
        try:
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        except Exception:  # some TensorRT builds raise instead of returning None
            self.engine = None
        if self.engine is None:
            raise RuntimeError(
                f"engine_path: {str(self.engine_path)!r} is not a TensorRT engine this TensorRT version and "
                "GPU can load (corrupt, or built by another TensorRT version / GPU)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeError(f"expected an engine with one input and one output, got {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_trt_dtype = self.engine.get_tensor_dtype(self.input_name)
        self.output_trt_dtype = self.engine.get_tensor_dtype(self.output_name)
        fixed = tuple(self.engine.get_tensor_shape(self.input_name))
        if all(d > 0 for d in fixed):  # a static engine: its one shape is min, opt and max
            self.profile = (fixed, fixed, fixed)
        else:
            low, opt, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.profile = (tuple(low), tuple(opt), tuple(high))
        self._pycuda_buffers: dict[str, tuple[int, object]] = {}
        self._pycuda_stream = self._cuda.Stream() if mode == "pycuda" else None

    def _set_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        low, _, high = self.profile
        if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            raise ValueError(
                f"x has shape {shape}; this engine accepts shapes from {low} to {high} "
                "(rebuild it with a wider min_shape/max_shape)"
            )
        if not self.context.set_input_shape(self.input_name, shape):
            raise RuntimeError(f"TensorRT rejected the input shape {shape}")
        return tuple(self.context.get_tensor_shape(self.output_name))

    def __call__(self, x):
        return self._run_pycuda(x) if self.mode == "pycuda" else self._run_torch(x)

    def _torch_dtype(self, trt_dtype):
        import torch

        DataType = self._trt.DataType
        table = {
            DataType.FLOAT: torch.float32, DataType.HALF: torch.float16, DataType.BF16: torch.bfloat16,
            DataType.INT32: torch.int32, DataType.INT64: torch.int64, DataType.INT8: torch.int8,
            DataType.BOOL: torch.bool, DataType.UINT8: torch.uint8,
        }
        if trt_dtype not in table:
            raise RuntimeError(f"engine tensor type {trt_dtype} has no torch equivalent here")
        return table[trt_dtype]

    def _run_torch(self, x):
        import torch

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor in mode='torch', got {type(x).__name__}")
        device = x.device if x.is_cuda else torch.device("cuda", torch.cuda.current_device())
        in_dtype = self._torch_dtype(self.input_trt_dtype)
        out_dtype = self._torch_dtype(self.output_trt_dtype)
        x = x.to(device=device, dtype=in_dtype).contiguous()
        out_shape = self._set_shape(tuple(x.shape))
        out = torch.empty(out_shape, dtype=out_dtype, device=device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
        return out

    def _buffer(self, name: str, nbytes: int):
        size, buffer = self._pycuda_buffers.get(name, (0, None))
        if size < nbytes:
            buffer = self._cuda.mem_alloc(nbytes)
            self._pycuda_buffers[name] = (nbytes, buffer)
        return buffer

    def _run_pycuda(self, x):
        import numpy as np

        cuda, trt = self._cuda, self._trt
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray in mode='pycuda', got {type(x).__name__}")
        try:
            in_dtype, out_dtype = trt.nptype(self.input_trt_dtype), trt.nptype(self.output_trt_dtype)
        except TypeError as err:  # bf16 has no NumPy type
            raise RuntimeError(f"mode='pycuda' needs NumPy-representable I/O types ({err}); use mode='torch'") from err
        x = np.ascontiguousarray(x, dtype=in_dtype)
        out_shape = self._set_shape(tuple(x.shape))
        out = cuda.pagelocked_empty(out_shape, dtype=out_dtype)
        device_in = self._buffer(self.input_name, x.nbytes)
        device_out = self._buffer(self.output_name, out.nbytes)
        stream = self._pycuda_stream
        cuda.memcpy_htod_async(device_in, x, stream)
        self.context.set_tensor_address(self.input_name, int(device_in))
        self.context.set_tensor_address(self.output_name, int(device_out))
        if not self.context.execute_async_v3(stream.handle):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
        cuda.memcpy_dtoh_async(out, device_out, stream)
        stream.synchronize()
        return np.array(out)


__all__ = [
    "PRECISIONS",
    "TensorRTRunner",
    "TensorRTUnavailableError",
    "build_engine",
    "require_tensorrt",
    "tensorrt_available",
]
