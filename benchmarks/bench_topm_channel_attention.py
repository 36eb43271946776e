"""Benchmark of ``topm_channel_attention``: PIP's top-m channel attention and Restormer's MDTA (SPEC §3.2).

Providers: cplfast (the fused op; the Triton kernel on CUDA), eager (the PyTorch reference),
compile (torch.compile of the reference). Shapes, inputs and the byte/flop floors are defined once in
``cplfast/bench/ops/`` so that the installed ``cplfast bench`` uses the same ones.

    python benchmarks/bench_topm_channel_attention.py --out DIR [--device cuda] [--quick]    # full harness
    pytest benchmarks/bench_topm_channel_attention.py                                         # pytest-benchmark
"""

import sys

OP = "topm_channel_attention"


def test_topm_channel_attention(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    from cplfast.cli import main

    sys.exit(main(["bench", "--ops", OP, *sys.argv[1:]]))
