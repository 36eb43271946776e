"""Which operators of an ONNX graph TensorRT 10's ONNX parser accepts.

The table ``tensorrt10_onnx_ops.tsv`` (shipped in this package) lists every ONNX operator with ``Y``/``N``
as onnx-tensorrt's operator table for TensorRT 10.0 gives it (opsets 9-20). An op of a non-standard
domain (a custom op) is reported as unsupported too: TensorRT would need a plugin for it.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterator

STANDARD_DOMAINS = ("", "ai.onnx")
TABLE_NAME = "tensorrt10_onnx_ops.tsv"


@functools.lru_cache(maxsize=1)
def tensorrt_op_table() -> dict[str, bool]:
    """``{op_type: supported}`` for every ONNX operator, as TensorRT 10.0's parser documents it."""
    text = resources.files(__package__).joinpath(TABLE_NAME).read_text(encoding="utf-8")
    table: dict[str, bool] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if number == 1 or not line.strip():
            continue  # header
        name, _, flag = line.partition("\t")
        if flag.strip() not in ("Y", "N"):
            raise RuntimeError(f"{TABLE_NAME} line {number}: expected 'Operator<TAB>Y|N', got {line!r}")
        table[name.strip()] = flag.strip() == "Y"
    return table


@dataclass
class TensorRTOpReport:
    """Result of :func:`check_tensorrt_ops`.

    ``op_counts``: how often each op (``domain::op`` for non-standard domains) occurs, subgraphs included;
    ``unsupported``: ops TensorRT 10's parser rejects; ``unknown``: ops missing from the table (newer
    than TensorRT 10.0's list, or custom-domain ops).
    """

    path: str
    op_counts: Counter = field(default_factory=Counter)
    unsupported: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unsupported and not self.unknown

    def summary(self) -> str:
        if self.ok:
            return f"{self.path}: all {len(self.op_counts)} operator types are TensorRT 10 parsable"
        parts = []
        if self.unsupported:
            parts.append("not supported by TensorRT 10: " + ", ".join(self.unsupported))
        if self.unknown:
            parts.append("not in TensorRT 10's operator table: " + ", ".join(self.unknown))
        return f"{self.path}: " + "; ".join(parts)


def _nodes(graph) -> Iterator:
    """Every node of ``graph`` and of the subgraphs in its attributes (If/Loop/Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _nodes(sub)


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "<ModelProto>"
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, os.PathLike or onnx.ModelProto, got {type(model_or_path).__name__}")
    path = os.fspath(model_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no ONNX file at {path!r}")
    try:
        return onnx.load(path, load_external_data=False), path
    except Exception as err:  # protobuf DecodeError and friends
        raise ValueError(f"path: {path!r} is not a readable ONNX model ({err})") from err


def check_tensorrt_ops(path, *, raise_on_failure: bool = False) -> TensorRTOpReport:
    """List the operators of an ONNX model that TensorRT 10's ONNX parser would reject.

    ``path``: an ``.onnx`` file or an ``onnx.ModelProto``. Functions defined inside the model are
    expanded (their bodies are what TensorRT sees). With ``raise_on_failure=True`` a failing report
    raises ``RuntimeError`` with :meth:`TensorRTOpReport.summary`.
    """
    model, label = _load(path)
    table = tensorrt_op_table()
    functions = {(f.domain, f.name): f for f in model.functions}
    report = TensorRTOpReport(path=label)

    def visit(graph_nodes) -> None:
        for node in graph_nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                visit(_nodes(functions[key]))
                continue
            standard = node.domain in STANDARD_DOMAINS
            name = node.op_type if standard else f"{node.domain}::{node.op_type}"
            report.op_counts[name] += 1

    visit(_nodes(model.graph))
    for name in sorted(report.op_counts):
        if "::" in name or name not in table:
            report.unknown.append(name)
        elif not table[name]:
            report.unsupported.append(name)
    if raise_on_failure and not report.ok:
        raise RuntimeError(report.summary())
    return report


__all__ = ["TensorRTOpReport", "check_tensorrt_ops", "tensorrt_op_table"]
