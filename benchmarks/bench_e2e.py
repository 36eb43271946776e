"""End-to-end benchmark: PromptIR+CPL training step with CPR (B=8, 128x128, K=4) and inference at
256x256 and 512x512, cplfast (Triton kernels) vs eager vs torch.compile (see ``cplfast/bench/e2e.py``).

    python benchmarks/bench_e2e.py --out DIR [--device cuda] [--quick]    # full harness
    pytest benchmarks/bench_e2e.py                                         # pytest-benchmark
"""

import sys

OP = ("promptir_cpl_train_step", "promptir_cpl_inference")


def test_e2e(bench_case, run_bench):
    run_bench(bench_case)


if __name__ == "__main__":
    from cplfast.cli import main

    sys.exit(main(["bench", "--ops", "e2e", *sys.argv[1:]]))
