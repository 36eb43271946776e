"""``cplfast demo``: train the tiny CPL model on the embedded photographs, evaluate, report.

Trains ``PromptIR(prompt="cpl", preset="tiny")`` with L1 + CPR on random crops of the scikit-image
training photographs degraded by noise, rain, haze, blur and low light; evaluates on held-out crops
of other photographs; prints a per-task PSNR/SSIM table of the degraded input and the restored
output; writes into ``--out``: ``report.json``, ``results.md`` / ``results.csv``, ``grid.png``
(degraded | restored | clean per task), ``routing.png`` (which prompt each degradation selects) and
the run folder ``run/`` with the checkpoint. It also prints and reports (``report.json`` →
``routing_health``) how task-specific the routing is: per prompt slot, the mutual information between
the degradation and the chosen prompt in bits (0 = collapsed onto one prompt, log2 5 ≈ 2.32 = each
degradation its own prompt), see :mod:`cplfast.routing`.

Training ends with a completed learning-rate schedule after ``--steps`` or ``--time-budget``
seconds, whichever comes first; on a busy CPU it may go on to 1.5× the budget to make at least 300
steps. The recipe (patch 32, batch 8, peak lr 3e-3, one CPR negative, EMA, the output convolution
zero-initialised so training starts from the identity) was chosen so a 2-core CPU finishes in about
3 minutes with a mean PSNR gain well above 2 dB.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._common import add_device_arguments, positive_int, setup_device, writable_folder

# On a busy CPU the training goes past the budget up to min_steps, but never past time_limit.
CPU_SETTINGS = dict(patch=32, batch=8, lr=3e-3, steps=2000, time_budget=180.0, min_steps=300, time_limit=1.5 * 180.0)
CUDA_SETTINGS = dict(patch=64, batch=16, lr=2e-3, steps=2000, time_budget=240.0, min_steps=0, time_limit=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help=f"training seconds (default: {CPU_SETTINGS['time_budget']:.0f} on CPU, "
                             f"{CUDA_SETTINGS['time_budget']:.0f} on CUDA)")
    parser.add_argument("--steps", type=positive_int, default=None, help="maximum training steps (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import atomic_write_json, load_model_file, save_model
    from ..data import TASKS, embedded_eval_dataset
    from ..evaluate import evaluate, format_table, write_tables
    from ..figures import before_after_grid, routing_heatmap
    from ..routing import format_routing_health
    from ..train import TrainConfig, Trainer

    start = time.perf_counter()
    device = setup_device(args)
    settings = dict(CUDA_SETTINGS if device.type == "cuda" else CPU_SETTINGS)
    if args.time_budget is not None:
        if not args.time_budget > 0:
            raise ValueError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
        settings["time_budget"] = args.time_budget
        settings["time_limit"] = 1.5 * args.time_budget if settings["min_steps"] else None
    if args.steps is not None:
        settings["steps"] = args.steps
    out = writable_folder(args.out, "--out")  # checked before minutes of training, not at the first save
    config = TrainConfig(
        preset="tiny", prompt="cpl", tasks=TASKS, num_negatives=1, cpr_weight=0.05, warmup=0.03, min_lr=1e-5,
        ema=0.995, grad_clip=1.0, save_every=0, zero_init_output=True, seed=args.seed, device=str(device), **settings,
    )
    threads = torch.get_num_threads()
    where = f"{device}" + (f", {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else "")
    budget = f", about {config.time_budget:.0f} s" if config.time_budget else ""
    print(f"cplfast demo: training the tiny CPL model on {', '.join(TASKS)} ({where}; batch {config.batch}, "
          f"patch {config.patch}, up to {config.steps} steps{budget})", flush=True)
    trainer = Trainer(config, out / "run", progress=not args.quiet)
    result = trainer.fit()
    print(f"trained {result.steps} steps in {result.seconds:.0f} s", flush=True)

    model = trainer.model_for_eval()
    dataset = embedded_eval_dataset(TASKS)
    scores = evaluate(model, dataset, device=device, keep_examples=1)
    routing = {task: {k: [round(float(v), 5) for v in vec] for k, vec in keys.items()} for task, keys in scores.routing.items()}
    state, model_config = load_model_file(result.model_path)
    save_model(result.model_path.parent, state, {**model_config, "routing_by_task": routing})

    print()
    print(f"held-out crops ({len(dataset) // len(TASKS)} per task, {dataset[0]['input'].shape[-1]} px), PSNR dB / SSIM on RGB:")
    print(format_table(scores))
    mean = scores.mean()
    print(f"mean PSNR {mean.psnr_in:.2f} -> {mean.psnr_out:.2f} dB ({mean.psnr_gain:+.2f} dB)")

    health = scores.routing_health()
    print(format_routing_health(health))
    report = {"tasks": scores.to_json(), "routing_health": health, "checkpoint": str(result.model_path.resolve())}
    atomic_write_json(out / "report.json", report, sort_keys=False)
    write_tables(scores, out)
    captions = {r.task: f"PSNR {r.psnr_in:.1f} -> {r.psnr_out:.1f}\nSSIM {r.ssim_in:.3f} -> {r.ssim_out:.3f}" for r in scores.rows}
    before_after_grid(scores.examples, out / "grid.png", captions=captions)
    routing_heatmap(scores.selection, out / "routing.png",
                    title="share of held-out images of each degradation (rows) that select each prompt (columns)")
    print(f"wrote {out / 'report.json'}, {out / 'results.md'}, {out / 'grid.png'}, {out / 'routing.png'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0
