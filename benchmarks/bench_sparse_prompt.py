"""Benchmark of ``sparse_prompt``: PromptIR's prompt slots: routing + prompt mix + resize (SPEC §3.1).

Providers: cplfast (the fused op; the Triton kernel on CUDA), eager (the PyTorch reference),
compile (torch.compile of the reference). Shapes, inputs and the byte/flop floors are defined once in
``cplfast/bench/ops/`` so that the installed ``cplfast bench`` uses the same ones.

    python benchmarks/bench_sparse_prompt.py --out DIR [--device cuda] [--quick]    # full harness
    pytest benchmarks/bench_sparse_prompt.py                                         # pytest-benchmark
"""

import sys

OP = "sparse_prompt"


def test_sparse_prompt(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    from cplfast.cli import main

    sys.exit(main(["bench", "--ops", OP, *sys.argv[1:]]))
