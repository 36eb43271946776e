"""End-to-end benchmarks: a PromptIR+CPL training step with CPR, and inference (SPEC §8).

* ``promptir_cpl_train_step`` (mode ``forward+backward``): ``PromptIR(prompt="cpl")`` restores a batch
  and K negatives (mismatched routing), ``loss = L1(out, gt) + ContrastivePromptLoss(out, gt, negs)``,
  backward, AdamW step. SPEC shape: ``preset="base"``, B=8, 128x128, K=4.
* ``promptir_cpl_inference`` (mode ``forward``): one image at 256x256 and 512x512 under ``no_grad``.

Providers: ``cplfast`` (the model on the chosen backend: the Triton kernels on CUDA), ``eager`` (the
same model on the ``reference`` backend) and ``compile`` (``torch.compile`` of the reference-backend
forward (+ loss)). With a half-precision ``dtype`` the model stays fp32 and runs under autocast, as in
training. When the model or the loss module is missing, the workload is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import FULL, Case, Traffic, make_case
from .memory import peak_mb
from .runner import BenchConfig, Measurement, _format_row, describe_error, free_memory, time_prepared

TRAIN = "promptir_cpl_train_step"
INFER = "promptir_cpl_inference"
E2E_OPS = (TRAIN, INFER)


QUICK_CPU_COMPILE_SKIP = ("skipped: torch.compile of the whole model on the CPU spends minutes in C++ code "
                          "generation; run without --quick to measure it")


class E2EUnavailable(RuntimeError):
    """The model or loss this workload needs is not importable."""


def e2e_cases(quick: bool, device_type: str) -> list[Case]:
    if quick and device_type == "cpu":
        return [
            make_case(TRAIN, "tiny (reduced)", "train", only_modes=(FULL,), preset="tiny", B=2, H=32, W=32, K=4),
            make_case(INFER, "tiny (reduced)", "infer", preset="tiny", B=1, H=64, W=64),
        ]
    return [
        make_case(TRAIN, "SPEC §8 train step", "train", only_modes=(FULL,), preset="base", B=8, H=128, W=128, K=4),
        make_case(INFER, "256x256", "infer", preset="base", B=1, H=256, W=256),
        make_case(INFER, "512x512", "infer", preset="base", B=1, H=512, W=512),
    ]


def load_model_and_loss():
    try:
        from ..models import PromptIR
    except ImportError as err:
        raise E2EUnavailable(f"cplfast.models.PromptIR is not importable ({describe_error(err)})") from err
    try:
        from ..losses import ContrastivePromptLoss
    except ImportError as err:
        raise E2EUnavailable(f"cplfast.losses.ContrastivePromptLoss is not importable ({describe_error(err)})") from err
    return PromptIR, ContrastivePromptLoss


def _autocast(config: BenchConfig):
    if config.dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(config.device.type, dtype=config.dtype)
    return contextlib.nullcontext()


def _backend_for(provider: str, config: BenchConfig) -> str:
    return config.backend if provider == "cplfast" else "reference"


def _compiled_if_asked(fn: Callable, provider: str, config: BenchConfig) -> Callable:
    """``torch.compile(fn)`` (fresh dynamo caches) for the ``compile`` provider, else ``fn``."""
    if provider != "compile":
        return fn
    torch._dynamo.reset()
    return torch.compile(fn, backend=config.compile_backend, mode=config.compile_mode)


def _train_prepare(case: Case, provider: str, config: BenchConfig, model, cpr) -> Callable[[], Callable]:
    from .._backend import use_backend

    b, h, w, k = case["B"], case["H"], case["W"], case["K"]
    device = config.device
    x = torch.rand(b, 3, h, w, device=device)
    y = torch.rand(b, 3, h, w, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def forward_loss(inputs, target):
        out, negatives = model(inputs, num_negatives=k)
        return F.l1_loss(out, target) + cpr(out, target, negatives)

    loss_fn = _compiled_if_asked(forward_loss, provider, config)
    backend = _backend_for(provider, config)

    def step():
        with use_backend(backend), _autocast(config):
            loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return lambda: step


def _infer_prepare(case: Case, provider: str, config: BenchConfig, model) -> Callable[[], Callable]:
    from .._backend import use_backend

    x = torch.rand(case["B"], 3, case["H"], case["W"], device=config.device)
    forward = _compiled_if_asked(model, provider, config)
    backend = _backend_for(provider, config)

    def infer():
        with torch.no_grad(), use_backend(backend), _autocast(config):
            return forward(x)

    return lambda: infer


def build_model(case: Case, config: BenchConfig):
    """``(model, cpr_loss)`` for ``case`` on the configured device (train/eval mode set by the case)."""
    PromptIR, ContrastivePromptLoss = load_model_and_loss()
    model = PromptIR(prompt="cpl", preset=case["preset"]).to(config.device)
    model.train(case.group == "train")
    return model, ContrastivePromptLoss().to(config.device)


def prepare_workload(case: Case, provider: str, config: BenchConfig, model, cpr) -> Callable[[], Callable]:
    """``prepare()`` returning the closure to time: one training step or one inference."""
    if case.op == TRAIN:
        return _train_prepare(case, provider, config, model, cpr)
    return _infer_prepare(case, provider, config, model)


def e2e_traffic(case: Case, itemsize: int) -> dict[str, Traffic]:
    """Image bytes only: the end-to-end numbers are not compared with a roofline."""
    image = case["B"] * 3 * case["H"] * case["W"] * itemsize
    return {mode: Traffic(image, 0) for mode in case.modes}


def run_e2e(config: BenchConfig, ops=E2E_OPS, done: set | None = None) -> tuple[list[Measurement], list[dict]]:
    """Measure the end-to-end workloads; returns ``(rows, skipped)`` (``skipped``: ``{"op", "reason"}``)."""
    done = set() if done is None else done
    cases = [c for c in e2e_cases(config.quick, config.device.type) if c.op in ops]
    try:
        load_model_and_loss()
    except E2EUnavailable as err:
        return [], [{"op": op, "reason": str(err)} for op in ops]
    rows: list[Measurement] = []
    providers = [p for p in config.providers if p in ("cplfast", "eager", "compile")]
    # A step takes 10-1000 ms: longer timing windows, so the percentiles come from several calls.
    slow_config = dataclasses.replace(config, rep_ms=max(config.rep_ms, 10 * config.rep_ms if config.quick else 2000),
                                      cpu_budget_s=max(config.cpu_budget_s, 1.0 if not config.quick else 0.1))
    for case in cases:
        config.log(f"[{case.op}] {case.name}: {case.shape}")
        try:
            model, cpr = build_model(case, config)
        except Exception as err:  # noqa: BLE001
            reason = f"building the model failed: {describe_error(err)}"
            rows.extend(Measurement(case.op, m, case.shape, p, error=reason) for p in providers for m in case.modes)
            continue
        for provider in providers:
            for mode in case.modes:
                if (case.op, mode, case.shape, provider) in done:
                    continue
                row = Measurement(case.op, mode, case.shape, provider)
                if provider == "compile" and config.quick and config.device.type == "cpu":
                    row.error = QUICK_CPU_COMPILE_SKIP
                    rows.append(row)
                    done.add(row.key)
                    config.log(_format_row(row))
                    continue
                try:
                    prepare = prepare_workload(case, provider, config, model, cpr)
                    timing = time_prepared(prepare, slow_config, use_graph=False)
                    row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
                    row.timer, row.samples = timing.timer, timing.samples
                    row.peak_mb = peak_mb(prepare, config.device)
                except Exception as err:  # noqa: BLE001
                    row.error = describe_error(err)
                finally:
                    prepare = None
                    free_memory(config.device)
                rows.append(row)
                done.add(row.key)
                config.log(_format_row(row))
        del model, cpr
        free_memory(config.device)
    return rows, []
