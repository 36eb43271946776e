"""End-to-end benchmarks: a PromptIR+CPL training step with CPR, and inference (SPEC §8).

* ``promptir_cpl_train_step`` (mode ``forward+backward``): ``PromptIR(prompt="cpl")`` restores a batch
  and K negatives (mismatched routing), ``loss = L1(out, gt) + ContrastivePromptLoss(out, gt, negs)``,
  backward, AdamW step. SPEC shape: ``preset="base"``, B=8, 128x128, K=4.
* ``promptir_cpl_inference`` (mode ``forward``): one image at 256x256 and 512x512 under ``no_grad``.

Providers: ``cplfast`` (the model on the chosen backend: the Triton kernels on CUDA), ``eager`` (the
same model on the ``reference`` backend) and ``compile`` (``torch.compile`` of the reference-backend
forward (+ loss)). With a half-precision ``dtype`` the model stays fp32 and runs under autocast, as in
training. When the model or the loss module is missing, the workload is skipped with the reason.

The providers of a case are timed interleaved, in rounds of freshly shuffled order (as the ops, see
:mod:`.runner`); they share one model (each training provider has its own AdamW). Inference outputs are
checked once per case against the model on the ``reference`` backend in float32 on the same image
(tolerance :data:`E2E_TOLERANCES`); a training step is not checked (its weights change every step; the op
benchmarks check its kernels).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import FULL, Case, Traffic, make_case
from .runner import (BenchConfig, Measurement, _format_row, describe_error, free_memory, record_interleaved,
                     relative_error, time_interleaved)

TRAIN = "promptir_cpl_train_step"
INFER = "promptir_cpl_inference"
E2E_OPS = (TRAIN, INFER)


# max|got - want| / max|want| of the restored image against the float32 reference backend.
E2E_TOLERANCES = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 3e-2, torch.bfloat16: 8e-2}

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


def _infer_image(case: Case, config: BenchConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(case["B"], 3, case["H"], case["W"], generator=generator).to(config.device)


def _infer_prepare(case: Case, provider: str, config: BenchConfig, model) -> Callable[[], Callable]:
    from .._backend import use_backend

    x = _infer_image(case, config)
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


def run_e2e(config: BenchConfig, ops=E2E_OPS, done: set | None = None,
            orders: list[dict] | None = None) -> tuple[list[Measurement], list[dict]]:
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
        for mode in case.modes:
            names = [p for p in providers if (case.op, mode, case.shape, p) not in done]
            mode_rows = {p: Measurement(case.op, mode, case.shape, p) for p in names}
            prepares = {}
            for provider in names:
                row = mode_rows[provider]
                if provider == "compile" and config.quick and config.device.type == "cpu":
                    row.error = QUICK_CPU_COMPILE_SKIP
                    continue
                try:
                    prepares[provider] = prepare_workload(case, provider, config, model, cpr)
                except Exception as err:  # noqa: BLE001
                    row.error = describe_error(err)
            if case.op == INFER and config.check:
                _check_inference(case, config, model, prepares, mode_rows)
            elif case.op == TRAIN:
                for row in mode_rows.values():
                    row.check = "not checked: a training step (weights change every step; see the op benchmarks)"
            result = time_interleaved(prepares, slow_config, False, (case.op, case.shape, mode))
            record_interleaved(result, prepares, mode_rows, config, orders, (case.op, case.shape, mode))
            prepares.clear()
            for provider in names:
                rows.append(mode_rows[provider])
                done.add(mode_rows[provider].key)
                config.log(_format_row(mode_rows[provider]))
        del model, cpr
        free_memory(config.device, full=True)
    return rows, []


def _check_inference(case: Case, config: BenchConfig, model, prepares: dict, rows: dict) -> None:
    """Each provider's restored image against the model on the reference backend (float32, no autocast)."""
    from .._backend import use_backend

    tolerance = E2E_TOLERANCES.get(config.dtype, 1e-3)
    try:
        with torch.no_grad(), use_backend("reference"):
            want = model(_infer_image(case, config)).float()
    except Exception as err:  # noqa: BLE001
        for row in rows.values():
            row.check = f"unchecked: the reference forward failed ({describe_error(err)[:200]})"
        return
    for provider in list(prepares):
        row = rows[provider]
        try:
            got = prepares[provider]()()
        except Exception as err:  # noqa: BLE001
            row.error = f"forward failed: {describe_error(err)}"
            del prepares[provider]
            continue
        err = relative_error(got.float(), want)
        row.max_err, row.tolerance, row.correct = err, tolerance, err <= tolerance
        row.check = (f"ok: restored image within {tolerance:.0e} of the reference backend (max rel err {err:.1e})"
                     if row.correct else
                     f"WRONG: restored image differs from the reference backend: max|got-want|/max|want| = "
                     f"{err:.2e} > {tolerance:.0e}")
        free_memory(config.device)
