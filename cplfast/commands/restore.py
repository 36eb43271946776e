"""``cplfast restore IN -o OUT --checkpoint C``: restore an image or a folder of images.

For every image it prints which prompt each prompt module selected (its routing weight) and, when
the checkpoint records the mean routing of its training degradations, the closest one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import CommandError
from ._common import add_device_arguments, setup_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="an image file or a folder of images")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output file (for one image) or folder (for a folder, or an existing folder)")
    parser.add_argument("--checkpoint", required=True, help="model.safetensors, its run folder, or an official PromptIR .ckpt/.pth")
    parser.add_argument("--tile", type=int, default=None, help="restore in tiles of this size (a multiple of 8) to save memory")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default: 32)")
    add_device_arguments(parser)


def describe_routing(routing: dict, config: dict, index: int = 0) -> str:
    """One line naming the prompt (or degradation) each module chose for image ``index``."""
    from ..evaluate import closest_task

    tasks = list(config.get("tasks") or [])
    prompt = config.get("model", {}).get("prompt")
    parts = []
    for key, weights in routing.items():
        w = weights[index].detach().float().cpu()
        best = int(w.argmax())
        if prompt in ("pip", "dppd") and best < len(tasks):
            parts.append(f"{key}: {tasks[best]} ({float(w[best]):.2f})")
        else:
            parts.append(f"{key}: #{best} ({float(w[best]):.2f})")
    text = ", ".join(parts) if parts else "no prompt routing"
    profile = config.get("routing_by_task")
    if profile and prompt in ("cpl", "promptir"):
        near = closest_task(routing, profile, index)
        if near is not None:
            text += f"; closest degradation: {near[0]}"
    return text


def _plan(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    from ..data.io import is_image_file, list_images

    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src}")
    if src.is_dir():
        files = list_images(src)
        if not files:
            raise CommandError(f"no images in {src}")
        if dst.exists() and not dst.is_dir():
            raise CommandError(f"the output for a folder must be a folder, got a file: {dst}")
        return [(f, dst / f.name) for f in files]
    if dst.is_dir() or str(dst).endswith(("/", "\\")):
        return [(src, dst / src.name)]
    if not is_image_file(dst):
        raise CommandError(f"output {dst} needs an image extension (.png, .jpg, ...)")
    return [(src, dst)]


def run(args: argparse.Namespace) -> int:
    from ..data.io import load_image, save_image
    from ..train import inference_model

    if args.tile is not None and (args.tile < 8 or args.tile % 8):
        raise CommandError(f"--tile must be a positive multiple of 8, got {args.tile}")
    if args.overlap < 0 or (args.tile is not None and args.overlap >= args.tile):
        raise CommandError(f"--overlap must be in [0, tile), got {args.overlap}")
    jobs = _plan(Path(args.input), Path(args.output))
    # read the first image before loading the model, so a bad input fails fast
    first = load_image(jobs[0][0])
    device = setup_device(args)
    model, config = inference_model(args.checkpoint, device)
    for i, (src, dst) in enumerate(jobs):
        image = first if i == 0 else load_image(src)
        out, routing = model.restore(image.to(device), tile=args.tile, overlap=args.overlap)
        save_image(out.float().clamp(0, 1).cpu(), dst)
        print(f"{src} -> {dst}  [{describe_routing(routing, config)}]", flush=True)
    return 0
