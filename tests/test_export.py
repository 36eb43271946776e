"""Deployment: ONNX (dynamic shapes, TensorRT-parsable ops, onnxruntime parity), TensorRT, AOTInductor,
Triton Inference Server repositories, the parity report and ``cplfast export``.

Fast tests use a small stand-in network built from the fused ops (sparse top-k prompt routing, top-m
channel attention, prompt-token attention). The acceptance runs on the real tiny models (every prompt
variant exported dynamically, the AOTInductor package of the CPL model) are marked slow: a dynamic
``torch.export`` of a whole PromptIR takes minutes on two cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cplfast
from cplfast import functional as CF

onnx = pytest.importorskip("onnx", reason="the ONNX export tests need onnx (pip install onnx onnxscript)")
pytest.importorskip("onnxscript", reason="the ONNX export tests need onnxscript")
ort = pytest.importorskip("onnxruntime", reason="the ONNX parity tests need onnxruntime")

from cplfast.export import (  # noqa: E402
    OnnxRunner,
    check_tensorrt_ops,
    format_report,
    parity_report,
    tensorrt_op_table,
    to_onnx,
    write_triton_repo,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
TOLERANCE = 1e-4


class StandIn(nn.Module):
    """conv -> + top-k routed prompt (SPM) -> + top-m channel attention -> + prompt-token attention -> conv."""

    def __init__(self, channels: int = 8, prompts: int = 5, prompt_size: int = 5, heads: int = 2, tokens: int = 3):
        super().__init__()
        self.heads = heads
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.router = nn.Linear(channels, prompts)
        self.prompts = nn.Parameter(torch.rand(prompts, channels, prompt_size, prompt_size))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.temperature = nn.Parameter(torch.rand(heads) + 0.5)
        self.tokens = nn.Parameter(torch.randn(1, heads, tokens, channels // heads))
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        prompt, _ = CF.sparse_prompt(f, self.router.weight, self.router.bias, self.prompts, k=2, renorm=True)
        f = f + prompt
        b, c, h, w = f.shape
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in self.qkv(f).chunk(3, dim=1))
        f = f + CF.topm_channel_attention(q, k, v, self.temperature).reshape(b, c, h, w)
        pixels = f.reshape(b, self.heads, c // self.heads, h * w).transpose(-2, -1)
        tokens = self.tokens.expand(b, -1, -1, -1)
        f = f + CF.prompt_token_attention(pixels, tokens, tokens).transpose(-2, -1).reshape(b, c, h, w)
        return x + self.tail(F.gelu(f))


@pytest.fixture(scope="module")
def standin() -> StandIn:
    torch.manual_seed(1234)
    return StandIn().eval()


@pytest.fixture(scope="module")
def standin_onnx(standin, tmp_path_factory) -> Path:
    return to_onnx(standin, tmp_path_factory.mktemp("onnx") / "standin.onnx", example_size=(1, 3, 20, 28))


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


# ----------------------------------------------------------------------------- TensorRT operator table
def test_op_table_ships_in_the_package_and_matches_the_shared_copy():
    table = tensorrt_op_table()
    assert len(table) > 150
    assert table["TopK"] and table["Resize"] and table["LayerNormalization"] and table["ScatterElements"]
    assert not table["Unique"] and not table["Col2Im"]
    shipped = Path(cplfast.export.__file__).with_name("tensorrt10_onnx_ops.tsv")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tensorrt10_onnx_ops.tsv"
    if shared.is_file():
        assert shipped.read_bytes() == shared.read_bytes()


def _graph_with(nodes, name="g"):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_graph(nodes, name, [x], [y])


def test_check_tensorrt_ops_reports_unsupported_custom_and_nested_ops(tmp_path):
    from onnx import TensorProto, helper

    then_branch = _graph_with([helper.make_node("Unique", ["x"], ["y"])], "then")
    else_branch = _graph_with([helper.make_node("Relu", ["x"], ["y"])], "else")
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MyFusedOp", ["r"], ["c"], domain="cplfast.custom"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[cond],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("cplfast.custom", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    report = check_tensorrt_ops(path)
    assert not report.ok
    assert report.unsupported == ["Unique"]  # found inside the If's then-branch
    assert report.unknown == ["cplfast.custom::MyFusedOp"]
    assert report.op_counts["Relu"] == 2
    assert "Unique" in report.summary()
    with pytest.raises(RuntimeError, match="Unique"):
        check_tensorrt_ops(model, raise_on_failure=True)


def test_check_tensorrt_ops_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        check_tensorrt_ops(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf" * 7)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        check_tensorrt_ops(junk)
    with pytest.raises(TypeError, match="path"):
        check_tensorrt_ops(42)


# ----------------------------------------------------------------------------- ONNX
def test_onnx_dynamic_export_matches_pytorch_at_several_shapes(standin, standin_onnx):
    model = onnx.load(str(standin_onnx))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    ops = {n.op_type for n in model.graph.node}
    assert "TopK" in ops  # the top-k routing and top-m masks lower to ONNX TopK
    assert not any(n.domain not in ("", "ai.onnx") for n in model.graph.node)
    assert {p.key: p.value for p in model.metadata_props}["producer"] == "cplfast"
    for shape in [(1, 3, 64, 64), (2, 3, 72, 96), (3, 3, 17, 9)]:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = standin(x).numpy()
        got = _run_onnx(standin_onnx, x)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOLERANCE


def test_onnx_export_operators_are_tensorrt_parsable(standin_onnx):
    report = check_tensorrt_ops(standin_onnx)
    assert report.ok, report.summary()
    assert report.op_counts["TopK"] >= 2


def test_onnx_topk_keeps_pytorchs_stable_tie_order(tmp_path):
    """Equal routing scores: ONNX TopK and torch.sort(stable=True) must pick the same (lower) index."""

    class Ranks(nn.Module):
        def forward(self, x):
            down = torch.sort(x.round(), dim=1, descending=True, stable=True).indices
            up = torch.sort(x.round(), dim=-1, descending=False, stable=True).indices
            return torch.cat([down.flatten(1), up.flatten(1)], dim=1).to(x.dtype)

    path = to_onnx(Ranks(), tmp_path / "ranks.onnx", example_size=(2, 6, 4, 4), size_multiple=1)
    x = torch.randint(0, 3, (3, 6, 5, 4)).float()  # many ties
    assert np.array_equal(_run_onnx(path, x), Ranks()(x).numpy())


def test_onnx_static_export_keeps_backend_and_training_mode(standin, tmp_path):
    standin.train()
    try:
        with cplfast.use_backend("auto"):
            path = to_onnx(standin, tmp_path / "static.onnx", dynamic=False, example_size=(1, 3, 16, 24), opset=20)
            assert cplfast.get_backend() == "auto"
        assert standin.training
    finally:
        standin.eval()
    model = onnx.load(str(path))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 24]
    assert {o.domain: o.version for o in model.opset_import}[""] == 20
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        assert np.abs(_run_onnx(path, x) - standin(x).numpy()).max() <= TOLERANCE


def test_onnx_bad_arguments(standin, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        to_onnx(standin, tmp_path / "a.onnx", opset=17)
    with pytest.raises(ValueError, match="example_size"):
        to_onnx(standin, tmp_path / "a.onnx", example_size=(1, 3, 16))
    with pytest.raises(ValueError, match="size_multiple"):
        to_onnx(standin, tmp_path / "a.onnx", size_multiple=0)
    with pytest.raises(TypeError, match="model"):
        to_onnx(lambda x: x, tmp_path / "a.onnx")
    with pytest.raises(IsADirectoryError):
        to_onnx(standin, tmp_path)
    assert not (tmp_path / "a.onnx").exists()


# ----------------------------------------------------------------------------- parity report
def test_parity_report_measures_error_and_latency(standin, standin_onnx):
    offset = 3e-3
    artifacts = {"onnxruntime": OnnxRunner(standin_onnx), "shifted": lambda x: standin(x) + offset}
    rows = parity_report(standin, artifacts, [(1, 3, 16, 16), (2, 3, 24, 8)], repeats=2, warmup=1)
    assert [(r.artifact, r.shape) for r in rows] == [
        ("onnxruntime", (1, 3, 16, 16)), ("shifted", (1, 3, 16, 16)),
        ("onnxruntime", (2, 3, 24, 8)), ("shifted", (2, 3, 24, 8)),
    ]
    for row in rows:
        assert row.latency_ms > 0 and row.eager_ms > 0
        if row.artifact == "onnxruntime":
            assert row.max_abs_error <= TOLERANCE
        else:
            assert abs(row.max_abs_error - offset) < 1e-5
    table = format_report(rows, device="CPU")
    assert table.count("\n| ") == 1 + len(rows) and "2x3x24x8" in table


# ----------------------------------------------------------------------------- Triton Inference Server
def _parse_config(text: str):
    """Parse with Triton's own ModelConfig proto when tritonclient is installed, else a light check."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        assert text.count("{") == text.count("}") and text.count("[") == text.count("]")
        return None
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_triton_repository_layout_and_config(standin_onnx, tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"serialized engine bytes")
    repo = tmp_path / "repo"
    written = write_triton_repo(repo, onnx_path=standin_onnx, engine_path=plan, model_name="standin")
    assert set(written) == {"standin", "standin_trt"}
    assert (repo / "standin" / "1" / "model.onnx").read_bytes() == standin_onnx.read_bytes()
    assert (repo / "standin_trt" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    onnx_cfg = (repo / "standin" / "config.pbtxt").read_text()
    trt_cfg = (repo / "standin_trt" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in onnx_cfg and 'platform: "tensorrt_plan"' in trt_cfg
    assert "dims: [ -1, 3, -1, -1 ]" in onnx_cfg and "max_batch_size: 0" in onnx_cfg
    assert "KIND_GPU" in trt_cfg
    parsed = _parse_config(onnx_cfg)
    if parsed is not None:
        assert parsed.name == "standin" and list(parsed.input[0].dims) == [-1, 3, -1, -1]
        assert parsed.input[0].name == "input" and parsed.output[0].name == "output"

    with pytest.raises(FileExistsError, match="overwrite"):
        write_triton_repo(repo, onnx_path=standin_onnx, model_name="standin")
    batched = write_triton_repo(repo, onnx_path=standin_onnx, model_name="standin", max_batch_size=4,
                                instance_kind="KIND_CPU", overwrite=True)
    text = (batched["standin"] / "config.pbtxt").read_text()
    assert "dims: [ 3, -1, -1 ]" in text and "dynamic_batching" in text and "KIND_CPU" in text
    parsed = _parse_config(text)
    if parsed is not None:
        assert parsed.max_batch_size == 4


def test_triton_repository_bad_input(standin_onnx, tmp_path):
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        write_triton_repo(tmp_path / "r", onnx_path=tmp_path / "none.onnx")
    with pytest.raises(FileNotFoundError, match="engine_path"):
        write_triton_repo(tmp_path / "r", onnx_path=standin_onnx, engine_path=tmp_path / "none.plan")
    with pytest.raises(ValueError, match="model name"):
        write_triton_repo(tmp_path / "r", onnx_path=standin_onnx, model_name="bad name/..")
    with pytest.raises(ValueError, match="instance_kind"):
        write_triton_repo(tmp_path / "r", onnx_path=standin_onnx, instance_kind="GPU")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- TensorRT
@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown when TensorRT is not installed")
def test_tensorrt_missing_is_one_clear_error(tmp_path, standin_onnx):
    from cplfast.export import TensorRTRunner, TensorRTUnavailableError, build_engine

    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        build_engine(standin_onnx, tmp_path / "m.plan")
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        TensorRTRunner(tmp_path / "m.plan")


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown when TensorRT is not installed")
def test_cli_tensorrt_without_tensorrt_prints_one_line_and_fails(tmp_path, capsys):
    from cplfast.cli import main

    code = main(["export", "--format", "tensorrt", "--preset", "tiny", "--prompt", "cpl", "-o", str(tmp_path / "m.plan")])
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorrt" in lines[0] and "Traceback" not in captured.err
    assert not list(tmp_path.iterdir())  # failed before doing any work


def test_cli_argument_errors_are_one_line(tmp_path, capsys):
    from cplfast.cli import main

    assert main(["export", "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) != 0
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["export", "--format", "onnx", "--checkpoint", str(tmp_path / "none"), "--preset", "tiny",
                 "--prompt", "cpl", "-o", str(tmp_path / "m.onnx")]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not both" in err


def _fake_tensorrt(calls: list, *, parse_ok: bool = True):
    """A stand-in ``tensorrt`` module recording how cplfast drives TensorRT 10's builder/runtime API."""
    import importlib.machinery
    import types

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)

    class Logger:
        VERBOSE, WARNING = "verbose", "warning"

        def __init__(self, level):
            calls.append(("Logger", level))

    trt.Logger = Logger
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", BF16="bf16")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT="f32", HALF="f16", BF16="bf16", INT32="i32", INT64="i64",
                                         INT8="i8", BOOL="b", UINT8="u8")
    network_input = types.SimpleNamespace(name="input", shape=(-1, 3, -1, -1))
    network = types.SimpleNamespace(num_inputs=1, get_input=lambda i: network_input)

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            self.cache = Cache(bytes(data))
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("timing_cache", cache.data, ignore_mismatch))

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return network

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, net, config):
            return b"ENGINE"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, net, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return "In node 7 (Unique): unsupported operator"

    class Context:
        def set_input_shape(self, name, shape):
            self.shape = shape
            return True

        def get_tensor_shape(self, name):
            return self.shape

    class Engine:
        num_io_tensors = 2
        get_tensor_name = staticmethod(lambda i: ("input", "output")[i])
        get_tensor_mode = staticmethod(lambda name: "in" if name == "input" else "out")
        get_tensor_dtype = staticmethod(lambda name: "f32")
        get_tensor_shape = staticmethod(lambda name: (-1, 3, -1, -1))
        get_tensor_profile_shape = staticmethod(lambda name, index: ((1, 3, 8, 8), (2, 3, 32, 32), (4, 3, 64, 64)))
        create_execution_context = staticmethod(Context)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"ENGINE" else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def test_build_engine_drives_the_tensorrt10_api(monkeypatch, standin_onnx, tmp_path):
    import sys

    from cplfast.export import TensorRTRunner, build_engine

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    engine = build_engine(standin_onnx, tmp_path / "out" / "m.plan", precision="bf16", min_shape=(1, 3, 8, 8),
                          opt_shape=(2, 3, 32, 32), max_shape=(4, 3, 64, 64), workspace_gb=0.5, timing_cache=cache)
    assert engine.read_bytes() == b"ENGINE" and cache.read_bytes() == b"old+timings"
    assert ("create_network", 0) in calls and ("parse", standin_onnx.name) in calls
    assert ("pool", "workspace", 1 << 29) in calls and ("flag", "bf16") in calls
    assert ("profile", ("input", (1, 3, 8, 8), (2, 3, 32, 32), (4, 3, 64, 64))) in calls
    assert ("timing_cache", b"old", False) in calls
    runner = TensorRTRunner(engine)
    assert (runner.input_name, runner.output_name) == ("input", "output")
    assert runner._set_shape((3, 3, 40, 24)) == (3, 3, 40, 24)
    with pytest.raises(ValueError, match="engine accepts shapes"):
        runner._set_shape((8, 3, 32, 32))
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="not a TensorRT engine"):
        TensorRTRunner(bad)
    with pytest.raises(ValueError, match="min_shape <= opt_shape <= max_shape"):
        build_engine(standin_onnx, tmp_path / "x.plan", min_shape=(1, 3, 64, 64), opt_shape=(1, 3, 32, 32))
    with pytest.raises(ValueError, match="dim 1 of input"):
        build_engine(standin_onnx, tmp_path / "x.plan", min_shape=(1, 4, 8, 8), opt_shape=(1, 4, 8, 8),
                     max_shape=(1, 4, 8, 8))
    with pytest.raises(ValueError, match="precision"):
        build_engine(standin_onnx, tmp_path / "x.plan", precision="int4")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls, parse_ok=False))
    with pytest.raises(RuntimeError, match="Unique"):
        build_engine(standin_onnx, tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_engine_build_and_run(standin, standin_onnx, tmp_path, precision, tolerance):
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install tensorrt; not installable on CI machines)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from cplfast.export import TensorRTRunner, build_engine

    cache = tmp_path / "timing.cache"
    engine = build_engine(standin_onnx, tmp_path / "m.plan", precision=precision, min_shape=(1, 3, 8, 8),
                          opt_shape=(2, 3, 32, 32), max_shape=(4, 3, 64, 64), workspace_gb=1, timing_cache=cache)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    runner = TensorRTRunner(engine)
    model = standin.cuda()
    try:
        for shape in [(1, 3, 24, 40), (3, 3, 64, 16)]:
            x = torch.rand(shape, device="cuda")
            with torch.no_grad(), cplfast.use_backend("reference"):
                expected = model(x)
            got = runner(x)
            torch.cuda.synchronize()
            assert (got.float() - expected).abs().max().item() <= tolerance
        with pytest.raises(ValueError, match="engine accepts shapes"):
            runner(torch.rand(5, 3, 32, 32, device="cuda"))
    finally:
        standin.cpu()
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"not an engine" * 10)
    with pytest.raises(RuntimeError, match="engine"):
        TensorRTRunner(bad)


# ----------------------------------------------------------------------------- any size (issue 18)
class NeedsMultipleOf8(nn.Module):
    """A model that only runs on H, W multiples of 8 (8x8 pixel blocks mixed by a 1x1 conv), as PromptIR."""

    size_multiple = 8

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(3 * 64, 3 * 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.pixel_shuffle(self.mix(F.pixel_unshuffle(x, 8)), 8)


def _edge_padded(model, x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    h, w = x.shape[-2:]
    hp, wp = max(-(-h // multiple), 2) * multiple, max(-(-w // multiple), 2) * multiple
    with torch.no_grad():
        return model(F.pad(x, (0, wp - w, 0, hp - h), mode="replicate"))[..., :h, :w]


def test_onnx_takes_any_size_and_exports_without_third_party_warnings(tmp_path, recwarn, caplog):
    """Old: sides had to be multiples of 8 (onnxruntime failed in a Reshape at 100x100); the export printed
    torchvision "Skipping" warnings and a FutureWarning."""
    torch.manual_seed(0)
    model = NeedsMultipleOf8().eval()
    caplog.set_level("WARNING")
    path = to_onnx(model, tmp_path / "m8.onnx", example_size=(1, 3, 20, 28))
    assert not [str(w.message) for w in recwarn.list]
    assert not [r.getMessage() for r in caplog.records]
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["size_multiple"] == "8"
    for shape in [(1, 3, 100, 100), (2, 3, 37, 61), (1, 3, 64, 64), (1, 3, 5, 3)]:
        x = torch.rand(shape)
        got = _run_onnx(path, x)
        assert got.shape == shape
        assert np.abs(got - _edge_padded(model, x).numpy()).max() <= TOLERANCE


@pytest.mark.slow
def test_aoti_takes_any_size(tmp_path):
    """Old: the AOTI package silently cropped 100x100 to 96x96."""
    from cplfast.export import load_aoti, to_aoti
    from cplfast.models import PromptIR

    torch.manual_seed(0)
    model = PromptIR(prompt="cpl", preset="tiny").eval()
    runner = load_aoti(to_aoti(model, tmp_path / "cpl.pt2", example_size=(1, 3, 64, 64)))
    for shape in [(1, 3, 100, 100), (1, 3, 37, 61)]:
        x = torch.rand(shape)
        got = runner(x)
        assert tuple(got.shape) == shape
        assert (got - _edge_padded(model, x)).abs().max().item() <= TOLERANCE


# ----------------------------------------------------------------------------- acceptance on the real models (slow)
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["promptir", "cpl", "pip", "dppd"])
def test_tiny_model_onnx_parity_and_tensorrt_ops(variant, tmp_path):
    from cplfast.models import PromptIR

    torch.manual_seed(0)
    model = PromptIR(prompt=variant, preset="tiny").eval()
    path = to_onnx(model, tmp_path / f"{variant}.onnx", example_size=(1, 3, 64, 64))
    report = check_tensorrt_ops(path)
    assert report.ok, report.summary()
    for shape in [(1, 3, 64, 64), (2, 3, 72, 96)]:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(_run_onnx(path, x) - expected).max() <= TOLERANCE
    for shape in [(1, 3, 100, 100), (1, 3, 37, 61)]:  # any size: padded to 8 inside the graph
        x = torch.rand(shape)
        assert np.abs(_run_onnx(path, x) - _edge_padded(model, x).numpy()).max() <= TOLERANCE


@pytest.mark.slow
def test_cpl_aoti_package_matches_pytorch_on_cpu(tmp_path):
    from cplfast.export import load_aoti, to_aoti
    from cplfast.models import PromptIR

    torch.manual_seed(0)
    model = PromptIR(prompt="cpl", preset="tiny").eval()
    package = to_aoti(model, tmp_path / "cpl.pt2", example_size=(1, 3, 64, 64))
    runner = load_aoti(package)
    for shape in [(1, 3, 64, 64), (2, 3, 72, 96)]:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = model(x)
        assert (runner(x) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.slow
def test_standin_aoti_package_dynamic_sizes(standin, tmp_path):
    from cplfast.export import load_aoti, to_aoti

    package = to_aoti(standin, tmp_path / "standin.pt2", example_size=(1, 3, 16, 16), size_multiple=1)
    runner = load_aoti(package)
    for shape in [(1, 3, 24, 40), (3, 3, 9, 13)]:
        x = torch.rand(shape)
        with torch.no_grad():
            assert (runner(x) - standin(x)).abs().max().item() <= TOLERANCE
    with pytest.raises(ValueError, match=".pt2"):
        to_aoti(standin, tmp_path / "x.zip")
    with pytest.raises(FileNotFoundError):
        load_aoti(tmp_path / "missing.pt2")


def test_cli_exports_triton_repository_with_parity_report(tmp_path, capsys):
    from cplfast.cli import main

    repo = tmp_path / "repo"
    code = main(["export", "--format", "triton-repo", "--preset", "tiny", "--prompt", "cpl", "--static",
                 "--example-size", "1x3x64x64", "--repeats", "1", "-o", str(repo)])
    out = capsys.readouterr().out
    assert code == 0
    assert (repo / "cplfast_cpl_tiny" / "1" / "model.onnx").is_file()
    assert 'platform: "onnxruntime_onnx"' in (repo / "cplfast_cpl_tiny" / "config.pbtxt").read_text()
    assert [p.name for p in repo.iterdir()] == ["cplfast_cpl_tiny"]  # no staging leftovers
    assert "TensorRT 10 parsable" in out
    rows = [line for line in out.splitlines() if line.startswith("| onnxruntime | 1x3x64x64 |")]
    assert len(rows) == 1 and float(rows[0].split("|")[3]) <= TOLERANCE
