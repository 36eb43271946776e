"""What one benchmark is: an op, a shape, the modes it is timed in, and how to build its inputs.

A :class:`Case` is one shape of one op. Its ``shape`` label (``"B=8 C=96 H=64 W=64 ..."``) is the key
under which results are stored, so two cases with the same dims are the same measurement. Each op is an
:class:`OpBenchmark` subclass in :mod:`cplfast.bench.ops` that lists its cases, builds inputs for them,
names the eager reference and the fused functional op, and counts the bytes and flops each mode must
move and compute at least (the roofline floor reported next to the timings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

FORWARD = "forward"
BACKWARD = "backward"
FULL = "forward+backward"
MODES = (FORWARD, BACKWARD, FULL)
TRAIN_MODES = MODES
INFER_MODES = (FORWARD,)

# Groups: "train" (SPEC §8 training shapes: every mode), "infer" (forward under no_grad),
# "sweep" (a size sweep, forward+backward only).
GROUPS = ("train", "infer", "sweep")


@dataclass(frozen=True)
class Case:
    """One shape of one op. ``dims`` is an ordered tuple of ``(name, value)`` pairs."""

    op: str
    name: str
    group: str
    dims: tuple[tuple[str, Any], ...]
    sweep_value: int | None = None
    only_modes: tuple[str, ...] | None = None  # overrides the group's modes (e.g. one mode for a huge case)
    skip_providers: tuple[str, ...] = ()  # providers not run for this case (e.g. compile in a quick CPU sweep)

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")

    def __getitem__(self, key: str) -> Any:
        for name, value in self.dims:
            if name == key:
                return value
        raise KeyError(key)

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims)

    @property
    def modes(self) -> tuple[str, ...]:
        if self.only_modes is not None:
            return self.only_modes
        return {"train": TRAIN_MODES, "infer": INFER_MODES, "sweep": (FULL,)}[self.group]

    @property
    def needs_grad(self) -> bool:
        return self.group != "infer"


def make_case(op: str, name: str, group: str, *, sweep_value: int | None = None,
              only_modes: tuple[str, ...] | None = None, skip_providers: tuple[str, ...] = (), **dims: Any) -> Case:
    return Case(op=op, name=name, group=group, dims=tuple(dims.items()), sweep_value=sweep_value,
                only_modes=only_modes, skip_providers=skip_providers)


# On a shared 2-core CPU one cold torch.compile (forward + backward C++ code generation) takes close to
# a minute, so the quick CPU run compiles each op once, at its training shape.
QUICK_CPU_SKIP = ("compile",)


@dataclass
class OpInputs:
    """Arguments for one call, and the leaves gradients are taken with respect to."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    leaves: Sequence[torch.Tensor] = ()


@dataclass(frozen=True)
class Traffic:
    """Lower bounds for one mode: bytes that must cross HBM and flops that must be computed."""

    bytes: int
    flops: int


def per_mode(forward: Traffic, backward: Traffic) -> dict[str, Traffic]:
    """The three modes' floors; forward+backward is the sum."""
    total = Traffic(forward.bytes + backward.bytes, forward.flops + backward.flops)
    return {FORWARD: forward, BACKWARD: backward, FULL: total}


class OpBenchmark:
    """Base class of one op's benchmark definition."""

    name: str = ""
    memory_bound: bool = True
    sweep_label: str = "H"  # x axis of the size sweep plot

    def cases(self, quick: bool, device_type: str) -> list[Case]:
        """SPEC §8 shapes (reduced ones when ``quick`` on the CPU) and the size sweep."""
        raise NotImplementedError

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> OpInputs:
        raise NotImplementedError

    def eager(self) -> Callable:
        """The PyTorch reference (SPEC's oracle), called as ``fn(*args, **kwargs)``."""
        from .. import reference

        return getattr(reference, self.name)

    def fused(self) -> Callable:
        """The public op, which dispatches to the Triton kernel under the ``auto``/``triton`` backend."""
        from .. import functional

        return getattr(functional, self.name)

    def extra_providers(self) -> dict[str, Callable]:
        """Other implementations worth timing beside the three standard providers."""
        return {}

    def output(self, result: Any) -> torch.Tensor:
        """The tensor of a call's result that the backward pass starts from."""
        return result

    def traffic(self, case: Case, itemsize: int) -> dict[str, Traffic]:
        """Per mode: the minimum bytes moved and flops computed (see ``benchmarks/NOTES.md``)."""
        raise NotImplementedError

    def eager_bytes(self, case: Case, itemsize: int) -> int:
        """A rough upper estimate of the eager reference's peak memory (to skip hopeless CPU runs)."""
        full = self.traffic(case, itemsize)
        return 4 * max(t.bytes for t in full.values())


def random_tensor(shape, device, dtype, *, requires_grad: bool = False, generator=None) -> torch.Tensor:
    t = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    return t.requires_grad_(requires_grad)


def numel(*shape: int) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
