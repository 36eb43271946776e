"""``cplfast eval``: per-task PSNR/SSIM of a checkpoint (terminal table + markdown + CSV)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import CommandError
from ._common import add_device_arguments, setup_device, tasks_argument, writable_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model.safetensors, its run folder, or an official PromptIR .ckpt/.pth")
    parser.add_argument("--data", default=None,
                        help="test folder: input/+target/ pairs, a PromptIR/AirNet test tree, or clean images degraded by "
                             "--tasks (default: held-out crops of the embedded photographs)")
    parser.add_argument("--tasks", type=tasks_argument, default=None,
                        help="degradations for clean images, comma separated (default: the checkpoint's tasks)")
    parser.add_argument("--channel", choices=("rgb", "y"), default="rgb",
                        help="score RGB (PromptIR protocol) or the BT.601 Y channel (CPL protocol) (default: rgb)")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels removed from each side before scoring")
    parser.add_argument("--tile", type=int, default=None, help="restore in tiles of this size (a multiple of 8)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default: 32)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the synthetic degradations (default: 1234)")
    parser.add_argument("--out", default=None, help="folder for eval_<channel>.md/.csv (default: the checkpoint's folder)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import resolve_checkpoint
    from ..data import TASKS, embedded_eval_dataset, folder_dataset
    from ..evaluate import evaluate, format_table, write_tables
    from ..train import inference_model

    from ..data.datasets import validate_dataset

    if args.crop_border < 0:
        raise CommandError(f"--crop-border must be >= 0, got {args.crop_border}")
    device = setup_device(args)
    path = resolve_checkpoint(args.checkpoint)
    out = writable_folder(Path(args.out) if args.out else path.parent, "--out")  # before the long work
    model, config = inference_model(path, device)
    tasks = tuple(args.tasks or config.get("tasks") or TASKS)
    skipped = []
    if args.data is None:
        dataset = embedded_eval_dataset(tasks, seed=args.seed)
        source = "held-out crops of the embedded photographs"
    else:
        dataset = folder_dataset(args.data, patch=None, seed=args.seed, tasks=tasks)
        source = str(args.data)
        # every file decoded (and big enough for SSIM's 7x7 window after cropping) before scoring starts
        skipped = validate_dataset(dataset, min_side=7 + 2 * args.crop_border)
        for bad, reason in skipped:
            print(f"skipping {bad}: {reason}", file=sys.stderr, flush=True)
    if len(dataset) == 0:
        raise CommandError(f"no images to evaluate in {source}")
    print(f"evaluating {path} on {source} ({len(dataset)} images, {args.channel.upper()})", flush=True)
    result = evaluate(model, dataset, device=device, channel=args.channel, crop_border=args.crop_border,
                      tile=args.tile, overlap=args.overlap, progress=True)
    print(format_table(result))
    health = result.routing_health()
    if health:
        from ..routing import format_routing_health

        print(format_routing_health(health))
    md, cs = write_tables(result, out, stem=f"eval_{args.channel}")
    print(f"wrote {md} and {cs}")
    if result.interrupted:
        print(f"cplfast eval: interrupted; the tables cover the {sum(r.count for r in result.rows)} image(s) scored "
              "before it", file=sys.stderr)
        return 130
    if skipped:
        print(f"evaluated {sum(r.count for r in result.rows)} image(s); skipped {len(skipped)} file(s): "
              + "; ".join(f"{p.name}: {r}" for p, r in skipped[:5]), file=sys.stderr)
        return 1
    return 0
