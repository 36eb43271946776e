"""``cplfast export --format onnx|tensorrt|aoti|triton-repo (--checkpoint C | --preset P --prompt V) -o OUT``.

- ``onnx``: OUT is the ``.onnx`` file (dynamic batch/H/W; every op checked against TensorRT 10's parser).
- ``tensorrt``: OUT is the engine (``.plan``); the ONNX file it is built from is written next to it.
- ``aoti``: OUT is the AOTInductor ``.pt2`` package (compiled for ``--device``).
- ``triton-repo``: OUT is a Triton Inference Server model repository (the ONNX model, plus the
  TensorRT plan with ``--engine PLAN`` or ``--with-tensorrt``).

A preset + prompt variant without a checkpoint exports randomly initialised weights (for testing the
pipeline). Afterwards a parity report prints, for every artifact and two input shapes, the max-abs
error against PyTorch and the latency of each runtime next to eager PyTorch (``--no-parity`` skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..cli import CommandError
from ._common import add_device_arguments, setup_device, writable_folder

FORMATS = ("onnx", "tensorrt", "aoti", "triton-repo")
PROMPTS = ("promptir", "cpl", "pip", "dppd", "none")
PRESETS = ("base", "small", "tiny")


def _shape(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x256x256, got {text!r}") from None
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive sizes BxCxHxW, got {text!r}")
    return values


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [_shape(part) for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to produce")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                        help="output file (onnx, tensorrt, aoti) or repository folder (triton-repo)")
    source = parser.add_argument_group("model (a checkpoint, or a preset and a prompt variant)")
    source.add_argument("--checkpoint", help="model.safetensors, its run folder, or an official PromptIR .ckpt/.pth")
    source.add_argument("--preset", choices=PRESETS, help="architecture preset (random weights)")
    source.add_argument("--prompt", choices=PROMPTS, help="prompt variant (random weights)")
    source.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    add_device_arguments(parser)
    parser.add_argument("--static", action="store_true", help="fix the input shape to --example-size (default: dynamic)")
    parser.add_argument("--example-size", type=_shape, default=(1, 3, 128, 128), metavar="BxCxHxW",
                        help="input shape traced with (default: 1x3x128x128)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18-20 (default: 18)")
    trt = parser.add_argument_group("TensorRT")
    trt.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16", help="engine precision (default: fp16)")
    trt.add_argument("--min-shape", type=_shape, default=(1, 3, 64, 64), metavar="BxCxHxW")
    trt.add_argument("--opt-shape", type=_shape, default=(1, 3, 256, 256), metavar="BxCxHxW")
    trt.add_argument("--max-shape", type=_shape, default=(4, 3, 1024, 1024), metavar="BxCxHxW")
    trt.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit in GiB (default: 4)")
    trt.add_argument("--timing-cache", type=Path, help="timing cache file, read and updated")
    repo = parser.add_argument_group("Triton Inference Server repository")
    repo.add_argument("--model-name", default=None, help="model name in the repository (default: cplfast_<prompt>)")
    repo.add_argument("--max-batch-size", type=int, default=0,
                      help="Triton max_batch_size; 0 keeps the batch an explicit dynamic dim (default: 0)")
    repo.add_argument("--engine", type=Path, help="add this TensorRT engine (built from the same model) as <name>_trt")
    repo.add_argument("--with-tensorrt", action="store_true", help="also build a TensorRT engine and add it")
    repo.add_argument("--overwrite", action="store_true", help="replace existing model folders in the repository")
    report = parser.add_argument_group("parity report")
    report.add_argument("--parity-shapes", type=_shapes, default=None, metavar="SHAPES",
                        help="comma-separated BxCxHxW shapes (default: 1xCx64x64,2xCx72x96; with --static the example size)")
    report.add_argument("--no-parity", action="store_true", help="skip the parity and latency report")
    report.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: 5)")


def _need(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CommandError(f"{module} is not installed: {install}")


def _check_dependencies(args) -> None:
    """Fail fast, in one line, before any slow work."""
    wants_trt = args.format == "tensorrt" or (args.format == "triton-repo" and args.with_tensorrt)
    if args.format in ("onnx", "tensorrt", "triton-repo"):
        _need("onnx", "pip install onnx onnxscript")
        _need("onnxscript", "pip install onnxscript")
    if wants_trt:
        from cplfast.export import TensorRTUnavailableError, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailableError as err:
            raise CommandError(str(err)) from None
        import torch

        if not torch.cuda.is_available():
            raise CommandError("TensorRT needs a CUDA GPU, and PyTorch sees none here")


def _check_arguments(args) -> None:
    if args.checkpoint and (args.preset or args.prompt):
        raise CommandError("give either --checkpoint or --preset with --prompt, not both")
    if not args.checkpoint and not (args.preset and args.prompt):
        raise CommandError("give --checkpoint C, or --preset P and --prompt V (random weights)")
    if args.format == "triton-repo" and args.engine and args.with_tensorrt:
        raise CommandError("give --engine or --with-tensorrt, not both")
    if args.max_batch_size < 0:
        raise CommandError(f"--max-batch-size must be >= 0, got {args.max_batch_size}")
    if args.repeats < 1:
        raise CommandError(f"--repeats must be >= 1, got {args.repeats}")


def _load_model(args, device):
    import torch

    if args.checkpoint:
        from ..train import inference_model

        model, _ = inference_model(args.checkpoint, "cpu")
    else:
        from ..models import PromptIR

        torch.manual_seed(args.seed)
        model = PromptIR(prompt=args.prompt, preset=args.preset)
    return model.eval()


def _model_label(model) -> str:
    return f"{getattr(model, 'prompt_type', 'model')}_{getattr(model, 'preset', '')}".strip("_")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _onnx_file(args, model, path: Path) -> Path:
    from cplfast.export import check_tensorrt_ops, to_onnx

    _log(f"exporting ONNX (opset {args.opset}, {'static' if args.static else 'dynamic batch/H/W'}) -> {path}")
    to_onnx(model, path, opset=args.opset, dynamic=not args.static, example_size=args.example_size)
    report = check_tensorrt_ops(path)
    print(report.summary())
    if not report.ok:
        raise CommandError(f"the ONNX graph has operators TensorRT 10 cannot parse: {report.summary()}")
    return path


def _engine_file(args, onnx_path: Path, engine_path: Path) -> Path:
    from cplfast.export import build_engine

    _log(f"building TensorRT engine ({args.precision}) -> {engine_path}")
    return build_engine(
        onnx_path, engine_path, precision=args.precision, min_shape=args.min_shape, opt_shape=args.opt_shape,
        max_shape=args.max_shape, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
    )


def _runners(artifacts: dict[str, tuple[str, Path]], device):
    """name -> callable for every artifact; a runtime that is not installed is reported and left out."""
    import torch

    from cplfast.export import OnnxRunner, TensorRTRunner, load_aoti

    runners = {}
    for name, (kind, path) in artifacts.items():
        if kind == "onnx":
            if importlib.util.find_spec("onnxruntime") is None:
                print(f"parity: {name} skipped (onnxruntime is not installed: pip install onnxruntime)")
                continue
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda":
                import onnxruntime as ort

                if "CUDAExecutionProvider" in ort.get_available_providers():
                    providers.insert(0, "CUDAExecutionProvider")
            runners[name] = OnnxRunner(path, providers=providers, threads=torch.get_num_threads())
        elif kind == "tensorrt":
            runners[name] = TensorRTRunner(path)
        elif kind == "aoti":
            runners[name] = load_aoti(path)
    return runners


def _parity(args, model, artifacts, device) -> None:
    import torch

    from cplfast.export import format_report, parity_report

    channels = model.config.in_channels if hasattr(model, "config") else 3
    shapes = args.parity_shapes
    if shapes is None:  # a static artifact runs its example size only
        shapes = [args.example_size] if args.static else [(1, channels, 64, 64), (2, channels, 72, 96)]
    runners = _runners(artifacts, device)
    if not runners:
        return
    rows = parity_report(model.to(device), runners, shapes, device=device, repeats=args.repeats)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(format_report(rows, device=where))


def run(args) -> int:
    import torch

    _check_arguments(args)
    _check_dependencies(args)
    out_path: Path = args.output
    is_file = args.format != "triton-repo" and out_path.suffix in (".onnx", ".plan", ".engine", ".trt", ".pt2")
    writable_folder(out_path.parent if is_file else out_path, "-o")  # before the slow export, not after it
    device = setup_device(args)
    model = _load_model(args, device)
    out: Path = args.output
    artifacts: dict[str, tuple[str, Path]] = {}

    if args.format == "onnx":
        path = out if out.suffix == ".onnx" else out / "model.onnx"
        artifacts["onnxruntime"] = ("onnx", _onnx_file(args, model, path))
    elif args.format == "tensorrt":
        engine_path = out if out.suffix in (".plan", ".engine", ".trt") else out / "model.plan"
        onnx_path = _onnx_file(args, model, engine_path.with_suffix(".onnx"))
        artifacts[f"tensorrt-{args.precision}"] = ("tensorrt", _engine_file(args, onnx_path, engine_path))
    elif args.format == "aoti":
        from cplfast.export import to_aoti

        path = out if out.suffix == ".pt2" else out / "model.pt2"
        _log(f"compiling AOTInductor package for {device} -> {path}")
        to_aoti(model.to(device), path, dynamic=not args.static, example_size=args.example_size)
        artifacts[f"aoti-{device.type}"] = ("aoti", path)
    else:  # triton-repo
        from cplfast.export import write_triton_repo

        if out.exists() and not out.is_dir():
            raise CommandError(f"the repository must be a folder, got a file: {out}")
        name = args.model_name or f"cplfast_{_model_label(model)}"
        staging = out / f".{name}.staging"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            onnx_path = _onnx_file(args, model, staging / "model.onnx")
            engine = args.engine
            if args.with_tensorrt:
                engine = _engine_file(args, onnx_path, staging / "model.plan")
            written = write_triton_repo(
                out, onnx_path=onnx_path, engine_path=engine, model_name=name,
                max_batch_size=args.max_batch_size, overwrite=args.overwrite,
            )
        finally:
            for leftover in staging.glob("*"):
                leftover.unlink()
            staging.rmdir()
        for model_name, directory in written.items():
            print(f"wrote {directory}/config.pbtxt")
        artifacts["onnxruntime"] = ("onnx", written[name] / "1" / "model.onnx")
        if engine is not None and f"{name}_trt" in written and importlib.util.find_spec("tensorrt") is not None:
            artifacts["tensorrt"] = ("tensorrt", written[f"{name}_trt"] / "1" / "model.plan")

    for label, (_, path) in artifacts.items():
        print(f"wrote {path}")
    if not args.no_parity:
        with torch.no_grad():
            _parity(args, model, artifacts, device)
    return 0
