"""Build Triton kernels for sm_90 without a GPU, in a subprocess with the interpreter off.

This checks what the interpreter cannot: globals read inside kernels, argument types, shared-memory
and register resources. ``build_for_sm90(body)`` runs ``body`` after a prelude that defines
``build(fn, arg_types, constexprs, num_warps, ones=())`` and ``FakeCuda(shape, stride=None, dtype=...)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SM90_PRELUDE = """
import types, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

def build(fn, arg_types, constexprs, num_warps, ones=()):
    sig, consts = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name], consts[name] = "constexpr", constexprs[name]
        elif name in ones:  # integer arguments equal to 1 are specialised by the launcher
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = arg_types.get(name, "i32")
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    assert kernel.asm.get("cubin"), "no cubin"
    assert kernel.metadata.shared <= 227 * 1024, f"{fn.__name__} needs {kernel.metadata.shared} B of shared memory"

class FakeCuda:  # the metadata the launchers read to pick tile sizes
    def __init__(self, shape, stride=None, dtype=torch.float32):
        self.shape, self._stride, self.dtype = shape, stride, dtype
        self.device = types.SimpleNamespace(type="cuda")
    def stride(self, d):
        return self._stride[d]
"""


def build_for_sm90(body: str) -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = SM90_PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
