"""Benchmark of ``infonce``: CPR's per-location InfoNCE, K=4 negatives (SPEC §3.4).

Providers: cplfast (the fused op; the Triton kernel on CUDA), eager (the PyTorch reference),
compile (torch.compile of the reference). Shapes, inputs and the byte/flop floors are defined once in
``cplfast/bench/ops/`` so that the installed ``cplfast bench`` uses the same ones.

    python benchmarks/bench_infonce.py --out DIR [--device cuda] [--quick]    # full harness
    pytest benchmarks/bench_infonce.py                                         # pytest-benchmark
"""

import sys

OP = "infonce"


def test_infonce(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    from cplfast.cli import main

    sys.exit(main(["bench", "--ops", OP, *sys.argv[1:]]))
