"""``cplfast train``: train a PromptIR / CPL / PIP / DPPD model; ``--resume`` continues a run exactly.

Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: NCCL on GPUs, gloo on
CPUs; ``--batch`` stays the global batch; rank 0 prints, saves and evaluates the routing profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ..checkpoint import STATE_FILE
from ..cli import CommandError
from ._common import add_device_arguments, positive_int, setup_device, tasks_argument, writable_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("tiny", "small", "base"), default=None, help="model size (default: tiny)")
    parser.add_argument("--prompt", choices=("cpl", "promptir", "pip", "dppd", "none"), default=None,
                        help="prompt variant (default: cpl)")
    parser.add_argument("--data", default=None,
                        help="training folder: input/+target/ pairs, a PromptIR/AirNet tree, or clean images to degrade "
                             "on the fly (default: the scikit-image photographs)")
    parser.add_argument("--tasks", type=tasks_argument, default=None,
                        help="degradations for clean images, comma separated (default: noise,rain,haze,blur,lowlight)")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: 1000)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="global batch per optimizer step, over all GPUs/processes and --grad-accum (default: 8)")
    parser.add_argument("--grad-accum", type=positive_int, default=None,
                        help="micro-batches per step on each process: batch / (processes x grad-accum) images "
                             "each (default: 1)")
    parser.add_argument("--patch", type=positive_int, default=None, help="training patch side, a multiple of 8 (default: 64)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4)")
    parser.add_argument("--pixel-loss", choices=("l1", "smoothl1", "psnr"), default=None,
                        help="pixel loss: l1 (PromptIR/CPL), smoothl1 (official PIP's SmoothL1, beta 1) or psnr "
                             "(mean per-image log MSE) (default: smoothl1 for --prompt pip, else l1)")
    parser.add_argument("--negatives", type=int, default=None, help="CPR negatives per image for cpl; 0 disables CPR (default: 2)")
    parser.add_argument("--cpr-weight", type=float, default=None, help="weight of the CPR loss (default: 0.1)")
    parser.add_argument("--cpr-batch-negatives", action="store_const", const=True, default=None,
                        help="CPR (cpl with --negatives > 0) also contrasts each restoration with the other images of "
                             "its micro-batch step on all processes (batch / grad-accum images)")
    parser.add_argument("--cpr-negatives", choices=("random", "ordered", "batch"), default=None,
                        help="cpl: which unselected prompts restore the CPR negatives: random per image and step (the "
                             "CPL paper's) or the lowest-index ones (default: random); batch: --prompt promptir with "
                             "CPR, each negative borrows another image's dense prompt weights (CPR without SPM)")
    parser.add_argument("--cpr-negative-grad", action="store_const", const=True, default=None,
                        help="let CPR's gradient reach the negatives (trains the prompts that restored them; default: "
                             "negatives restored without autograd, as in CPL's official code)")
    parser.add_argument("--cpr-form", choices=("infonce", "l1-push"), default=None,
                        help="CPR loss: infonce (cplfast's, fused kernel) or l1-push (the CPL authors' template: "
                             "-weight x mean_k sum_l w_l L1(phi_l(out), phi_l(neg_k)), negatives detached) "
                             "(default: infonce)")
    parser.add_argument("--cpr-features", choices=("filters", "vgg16"), default=None,
                        help="CPR feature pyramid: filters (cplfast's fixed filter bank, no weights) or vgg16 "
                             "(relu1_2/2_2/3_3, the paper's; needs --cpr-vgg-weights or torchvision's cached "
                             "vgg16-397923af.pth) (default: filters)")
    parser.add_argument("--cpr-vgg-weights", default=None, metavar="PATH",
                        help="torchvision VGG16 state_dict (.pth or .safetensors) for --cpr-features vgg16")
    parser.add_argument("--load-balance", type=float, default=None, metavar="W",
                        help="cpl, not in CPL: weight of a Switch-style load-balancing loss against routing collapse "
                             "(default: 0 = off)")
    parser.add_argument("--gate-noise", type=float, default=None, metavar="S",
                        help="cpl, not in CPL: noisy top-k gating, N(0, S^2) added to the router logits in "
                             "training (default: 0 = off)")
    parser.add_argument("--ema", type=float, default=None, help="EMA decay; 0 disables (default: 0.999)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    parser.add_argument("--workers", type=int, default=None, help="data loader worker processes (default: 0)")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps; 0: only at the end (default: 500)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="steps between lines of RUN/train_log.jsonl (loss terms, lr, images/s); 0: no log (default: 10)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop after this many seconds with a completed schedule (makes the step count speed-dependent)")
    parser.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="continue the run in this folder (or its train_state.safetensors); --steps / --time-budget "
                             "may extend it, --grad-accum re-split its batch (e.g. on fewer GPUs), and --log-every, "
                             "--save-every, --workers change")
    parser.add_argument("--out", default=None, help="run folder for checkpoints (default: runs/<prompt>-<preset>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


_FLAG_FIELDS = {
    "preset": "preset", "prompt": "prompt", "data": "data", "tasks": "tasks", "steps": "steps", "batch": "batch", "grad_accum": "grad_accum",
    "patch": "patch", "lr": "lr", "pixel_loss": "pixel_loss", "negatives": "num_negatives", "cpr_weight": "cpr_weight",
    "cpr_batch_negatives": "cpr_batch_negatives", "cpr_negatives": "cpr_negatives", "cpr_negative_grad": "cpr_negative_grad", "cpr_form": "cpr_form",
    "cpr_features": "cpr_features", "cpr_vgg_weights": "cpr_vgg_weights", "load_balance": "load_balance",
    "gate_noise": "gate_noise", "ema": "ema", "seed": "seed",
    "workers": "workers", "save_every": "save_every", "log_every": "log_every", "time_budget": "time_budget",
}


def _check_free_run_folder(out: Path, continuing: Path | None = None) -> None:
    """A training run must not overwrite another run's folder (``continuing``: the run being resumed)."""
    if (out / STATE_FILE).exists() and (continuing is None or out.resolve() != continuing.resolve()):
        hint = f"continue it with --resume {out} or pick another --out" if continuing is None else "pick another --out"
        raise CommandError(f"{out} already holds a training run; {hint}")


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..train import init_distributed

    distributed = init_distributed(args.device)
    try:
        code = _train(args)
        if distributed:
            dist.barrier()  # rank 0 has written the checkpoint before any rank leaves
        return code
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> int:
    from ..distributed import on_rank0, world
    from ..evaluate import routing_profile
    from ..train import RESUME_CHANGES, TrainConfig, Trainer, schedule_progress, train_state_path

    rank, world_size = world()
    say = print if rank == 0 else (lambda *a, **k: None)
    setup_device(args, processes_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if args.resume:
        changeable = {flag: name for flag, name in _FLAG_FIELDS.items() if name in RESUME_CHANGES}
        explicit = [flag for flag in _FLAG_FIELDS if flag not in changeable and getattr(args, flag) is not None]
        if explicit:
            allowed = ", ".join("--" + flag.replace("_", "-") for flag in changeable)
            raise CommandError(f"--resume continues the saved configuration; only {allowed} may change "
                               f"(got --{explicit[0].replace('_', '-')})")
        if args.out:
            on_rank0(_check_free_run_folder, Path(args.out), continuing=train_state_path(args.resume).parent)
        on_rank0(writable_folder, Path(args.out) if args.out else train_state_path(args.resume).parent, "--out")
        trainer = Trainer.resume(args.resume, out_dir=args.out, progress=not args.quiet,
                                 **{name: getattr(args, flag) for flag, name in changeable.items()})
        cfg = trainer.config
        if trainer.step >= cfg.steps:
            raise CommandError(f"the run in {args.resume} already finished {trainer.step} steps; pass a larger --steps to extend it")
        if schedule_progress(trainer.step, trainer.elapsed, cfg) >= 1:
            raise CommandError(f"the run in {args.resume} used its time budget ({trainer.elapsed:.0f} of "
                               f"{cfg.time_budget:.0f} s); pass a larger --time-budget to extend it")
        say(f"resuming {trainer.config.prompt}/{trainer.config.preset} at step {trainer.step} of {trainer.config.steps}")
    else:
        values = {name: getattr(args, flag) for flag, name in _FLAG_FIELDS.items() if getattr(args, flag) is not None}
        if values.get("cpr_features") == "filters":
            values["cpr_features"] = "filterbank"
        if args.data is not None and not Path(args.data).exists():
            raise FileNotFoundError(f"no such data folder: {args.data}")
        config = dataclasses.replace(TrainConfig(), **values, amp=not args.no_amp, deterministic=args.deterministic,
                                     device=args.device)
        out = Path(args.out or f"runs/{config.prompt}-{config.preset}")
        on_rank0(_check_free_run_folder, out)
        on_rank0(writable_folder, out, "--out")  # before training, not at the first save
        trainer = Trainer(config, out, progress=not args.quiet)
        processes = f" x {world_size} processes" if world_size > 1 else ""
        say(f"training {config.prompt}/{config.preset} on {', '.join(trainer.tasks)} "
            f"({config.steps} steps, batch {config.batch}, patch {config.patch}) on {trainer.device}{processes} "
            f"-> {trainer.out_dir}")
    result = trainer.fit()
    extra = {"routing_by_task": routing_profile(trainer.model_for_eval(), trainer.dataset, device=trainer.device)} if rank == 0 else None
    trainer.save(extra_config=extra)
    say(f"done: {result.steps} steps in {result.seconds:.0f} s, last loss {result.last_loss:.4f}; "
        f"model: {result.model_path}")
    skipped = getattr(trainer.dataset, "skipped", None) or []
    if skipped:
        say(f"skipped {len(skipped)} unreadable training image(s): " + "; ".join(f"{p.name}: {r}" for p, r in skipped[:5]))
    return 1 if skipped else 0
