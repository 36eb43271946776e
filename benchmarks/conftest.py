"""Shared harness for the pytest-benchmark runs of ``benchmarks/bench_*.py``.

    pytest benchmarks/bench_sparse_prompt.py
    pytest benchmarks/bench_infonce.py -k cplfast --benchmark-columns=median,iqr,rounds

Each bench module names its op(s) in ``OP``. This file parametrises the module's ``bench_case``
argument with the op's quick cases (reduced shapes on the CPU, the SPEC §8 training shapes on a GPU)
x modes x providers, and the ``run_bench`` fixture does the untimed setup (inputs, forward for a
backward-only timing, compilation and a warm-up call) before handing the call to pytest-benchmark
(synchronising CUDA after each call). Before an op is timed, its output and gradients are checked
against the float64 reference as in ``cplfast bench`` (a wrong result fails the test instead of being
timed). The case definitions are the ones ``cplfast bench`` uses (:mod:`cplfast.bench.ops`,
:mod:`cplfast.bench.e2e`). pytest-benchmark times one provider after another; for comparisons use
``cplfast bench``, which interleaves the providers in shuffled rounds (plus peak memory, JSON / markdown /
plots).
"""

from __future__ import annotations

import pytest
import torch

from cplfast.bench.e2e import E2E_OPS, build_model, e2e_cases, prepare_workload
from cplfast.bench.ops import OP_BENCHMARKS
from cplfast.bench.cases import BACKWARD, FULL
from cplfast.bench.runner import (STANDARD_PROVIDERS, BenchConfig, check_provider, prepare_mode, provider_functions,
                                  reference_result)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cases_of(op: str, device: torch.device):
    if op in E2E_OPS:
        return [c for c in e2e_cases(True, device.type) if c.op == op], STANDARD_PROVIDERS
    bench = OP_BENCHMARKS[op]
    cases = [c for c in bench.cases(True, device.type) if c.group != "sweep"]
    return cases, STANDARD_PROVIDERS + tuple(bench.extra_providers())


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=._" else "_" for ch in text).strip("_")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    ops = metafunc.module.OP
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    params = []
    for op in ops:
        cases, providers = _cases_of(op, _device())
        for case in cases:
            for mode in case.modes:
                for provider in providers:
                    name = f"{op}-{_slug(case.name)}-{case.group}-{mode.replace('+', '_')}-{provider}"
                    params.append(pytest.param((case, mode, provider), id=name))
    metafunc.parametrize("bench_case", params)


@pytest.fixture
def run_bench(benchmark):
    """``run_bench((case, mode, provider))``: prepare the call, warm it up, then time it with pytest-benchmark."""

    def run(bench_case):
        case, mode, provider = bench_case
        device = _device()
        config = BenchConfig(device=device, quick=True)
        if case.op in E2E_OPS:
            model, cpr = build_model(case, config)
            prepare = prepare_workload(case, provider, config, model, cpr)
        else:
            op = OP_BENCHMARKS[case.op]
            fn = provider_functions(op, config)[provider]()
            inputs = op.inputs(case, device, config.dtype)
            with_grads = case.needs_grad and mode in (BACKWARD, FULL)
            check = check_provider(op, fn, inputs, case, reference_result(op, inputs, case, with_grads),
                                   config.dtype, with_grads)
            if check.correct is False:
                pytest.fail(f"{provider} {case.op} {mode} {case.shape}: {check.message}")
            benchmark.extra_info.update(check=check.message)
            prepare = prepare_mode(op, fn, inputs, mode, case)
        call = prepare()
        call()  # compile / autotune / allocate outside the timing

        def timed():
            result = call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return result

        benchmark.extra_info.update(op=case.op, shape=case.shape, mode=mode, provider=provider,
                                    device=str(device))
        benchmark(timed)

    return run
