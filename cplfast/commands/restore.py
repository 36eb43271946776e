"""``cplfast restore IN -o OUT --checkpoint C``: restore an image or a folder of images.

Safe with originals: an output that resolves to an input (``-o`` = ``IN``, or a folder restored into
itself) is refused unless ``--overwrite``; every file is written to a temporary name and renamed;
``--skip-existing`` leaves outputs that exist alone; ``--suffix`` names outputs ``<stem><suffix><ext>``;
``--recursive`` restores sub-folders into the same tree under ``OUT``.

Keeps what the image is (see :mod:`cplfast.data.io`): alpha, 16-bit depth, greyscale, ICC profile and
EXIF (orientation applied on read), the JPEG quality of the input (or ``--quality``), and the format
(unless the output's extension names another).

Finishes the batch: every input is decoded and the output folders are checked for writing before the
model loads; a bad input is reported and skipped; a summary ends the run and the exit status is 1 when
any image was skipped. For every image it prints which prompt each prompt module selected (its routing
weight) and, when the checkpoint records the mean routing of its training degradations, the closest one.

Large images: ``--max-memory 4GB`` restores within a memory budget (the whole image at once when it
fits, else exactly in chunks of the largest size that fits); ``--tile N`` restores exactly in chunks of
about N x N pixels; both give the whole-image result (up to float rounding). ``--tile N --tile-mode
blend`` is the approximate independent-tile restore (blended over ``--overlap`` pixels). The peak
memory of each restore is printed.

Options: ``--fp16`` (CUDA), ``--tta`` (mean over the 8 flips/rotations), ``--task`` (force the routing
of one degradation where the variant has routing).
"""

from __future__ import annotations

import argparse
import errno
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli import CommandError
from ._common import add_device_arguments, setup_device, writable_folder

TASK_CHOICES = ("noise", "rain", "haze", "blur", "lowlight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="an image file or a folder of images")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output file (for one image) or folder (for a folder, or an existing folder)")
    parser.add_argument("--checkpoint", required=True, help="model.safetensors, its run folder, or an official PromptIR .ckpt/.pth")
    parser.add_argument("--tile", type=int, default=None,
                        help="restore exactly in chunks of about N x N pixels (a multiple of 8): bounded memory, "
                             "the whole-image result")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="memory budget, e.g. 4GB or 3.5GiB: the whole image at once if it fits, else exact "
                             "chunks of the largest size that fits")
    parser.add_argument("--tile-mode", choices=("exact", "blend"), default="exact",
                        help="exact (default): chunks give the whole-image result; blend: independent tiles "
                             "blended over --overlap pixels (approximate, needs --tile)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="blended tile overlap in pixels (default: 32; --tile-mode blend only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow outputs that replace their input files (default: refused)")
    parser.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist alone")
    parser.add_argument("--suffix", default="", help="output names are <stem><suffix><ext> (e.g. _restored)")
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="also restore images in sub-folders of IN, mirrored under OUT")
    parser.add_argument("--quality", type=int, default=None,
                        help="JPEG/WebP quality 1-100 (default: the input JPEG's estimated quality, else 95)")
    parser.add_argument("--fp16", action="store_true", help="run the model in float16 (CUDA only)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the restorations of the 8 flips/rotations (8x slower)")
    parser.add_argument("--task", choices=TASK_CHOICES, default=None,
                        help="force the routing of this degradation instead of the model's own choice "
                             "(pip/dppd: the task's prompt; promptir/cpl: the checkpoint's routing profile of that task)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
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


def describe_memory(stats: dict) -> str:
    """``peak 1.23 GiB (exact, 12 chunks of 64 rows)`` from :func:`cplfast.models.inference.restore`'s stats."""
    from ..models.inference import format_bytes

    mode = stats.get("mode", "?")
    if mode == "exact":
        mode = f"exact, {stats['chunks']} chunks of {stats['chunk_rows']} rows"
    elif mode == "blend":
        mode = "blended tiles, approximate"
    else:
        mode = "whole image"
    peak = stats.get("peak_bytes")
    return f"peak {format_bytes(peak)} ({mode})" if peak is not None else f"({mode})"


@dataclass
class Job:
    src: Path
    dst: Path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))
    except OSError:
        return False


def _named(path: Path, suffix: str) -> str:
    return f"{path.stem}{suffix}{path.suffix}"


def plan(src: Path, dst: Path, *, suffix: str = "", recursive: bool = False, overwrite: bool = False) -> list[Job]:
    """The (input, output) pairs of a restore, refusing outputs that would replace an input."""
    from ..data.io import is_image_file, list_images

    if not src.exists():
        raise FileNotFoundError(f"no such file or folder: {src}")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise CommandError(f"the output for a folder must be a folder, got a file: {dst}")
        files = list_images(src, recursive=recursive)
        if recursive and dst.resolve().is_relative_to(src.resolve()) and dst.resolve() != src.resolve():
            # outputs of an earlier run into a sub-folder of IN are not inputs
            files = [f for f in files if not f.resolve().is_relative_to(dst.resolve())]
        if not files:
            raise CommandError(f"no images in {src}" + ("" if recursive else " (use --recursive for sub-folders)"))
        jobs = [Job(f, dst / f.relative_to(src).parent / _named(f, suffix)) for f in files]
    elif dst.is_dir() or str(dst).endswith(("/", "\\")):
        jobs = [Job(src, dst / _named(src, suffix))]
    else:
        if not is_image_file(dst):
            raise CommandError(f"output {dst} needs an image extension (.png, .jpg, ...)")
        jobs = [Job(src, dst)]
    if not overwrite:
        for job in jobs:
            if _same_file(job.src, job.dst):
                what = "the folder into itself" if src.is_dir() else "the output onto its input"
                raise CommandError(f"refusing to restore {what}: {job.dst} would replace the original; pick another "
                                   "-o or a --suffix, or pass --overwrite to replace the originals")
    return jobs


def task_routing(model, config: dict, task: str):
    """Forced routing ``{key: (1, N)}`` that makes ``model`` restore degradation ``task``.

    pip / dppd: the one-hot weight of the task among the checkpoint's tasks. promptir / cpl: the
    checkpoint's mean routing of that task (``routing_by_task``, recorded by ``cplfast train``/``demo``);
    for cpl only the ``top_k`` largest weights are kept, as the router keeps them.
    """
    import torch

    prompt = getattr(model, "prompt_type", None)
    keys = tuple(getattr(model, "routing_keys", ()) or ())
    param = next(model.parameters())

    def pick(names) -> str | None:
        names = list(names)
        if task in names:
            return task
        return next((n for n in names if n.split("+")[0].rstrip("0123456789") == task), None)

    if prompt in ("pip", "dppd"):
        tasks = list(config.get("tasks") or [])
        name = pick(tasks)
        if name is None:
            raise CommandError(f"--task {task}: this checkpoint was trained on {', '.join(tasks) or 'no named tasks'}")
        width = model.config.num_degradations
        weights = torch.zeros(1, width, device=param.device, dtype=torch.float32)
        weights[0, tasks.index(name)] = 1.0
        return {key: weights for key in keys}
    if prompt in ("promptir", "cpl"):
        profile = config.get("routing_by_task") or {}
        name = pick(profile)
        if name is None:
            have = f"it has {', '.join(profile)}" if profile else "it records no routing per degradation (official " \
                "checkpoints do not; cplfast train/demo checkpoints do)"
            raise CommandError(f"--task {task}: this checkpoint has no routing profile for {task}; {have}")
        routing = {}
        for key, values in profile[name].items():
            if key not in keys:
                continue
            w = torch.tensor(values, dtype=torch.float32, device=param.device).clamp_min(0)
            module = getattr(model, key, None)
            k = getattr(module, "top_k", None)
            if prompt == "cpl" and k:
                kept = torch.sort(w, descending=True, stable=True).indices[:k]
                w = torch.zeros_like(w).scatter(0, kept, w[kept])
                if getattr(module, "renorm", False):
                    w = w / w.sum().clamp_min(1e-12)
            routing[key] = w[None]
        return routing
    raise CommandError(f"--task needs a variant with prompt routing (promptir, cpl, pip, dppd); this model has "
                       f"prompt={prompt!r}")


def _validate(jobs: list[Job]) -> tuple[list[Job], list[tuple[Path, str]]]:
    from ..data.io import check_image_file, output_format

    good, bad = [], []
    for job in jobs:
        try:
            output_format(job.dst)
        except ValueError as err:
            bad.append((job.src, str(err)))
            continue
        reason = check_image_file(job.src)
        if reason is None:
            good.append(job)
        else:
            bad.append((job.src, reason))
    return good, bad


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.io import read_image, write_image
    from ..models.inference import NotEnoughMemoryError, parse_memory, restore, restore_tta
    from ..train import inference_model

    if args.tile is not None and (args.tile < 8 or args.tile % 8):
        raise CommandError(f"--tile must be a positive multiple of 8, got {args.tile}")
    if args.overlap is not None and args.tile_mode != "blend":
        raise CommandError("--overlap applies to --tile-mode blend only (exact chunks need no overlap)")
    overlap = 32 if args.overlap is None else args.overlap
    if args.tile_mode == "blend" and (overlap < 0 or (args.tile is not None and overlap >= args.tile)):
        raise CommandError(f"--overlap must be in [0, tile), got {overlap}")
    if args.tile_mode == "blend" and args.tile is None:
        raise CommandError("--tile-mode blend needs --tile N")
    if args.max_memory is not None:
        if args.tile is not None:
            raise CommandError("give --tile or --max-memory, not both (--max-memory picks the chunk size)")
        try:
            parse_memory(args.max_memory)
        except (TypeError, ValueError) as err:
            raise CommandError(f"--max-memory: {err}") from None
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise CommandError(f"--quality must be in [1, 100], got {args.quality}")
    if any(sep in args.suffix for sep in ("/", "\\")):
        raise CommandError(f"--suffix must not contain a path separator, got {args.suffix!r}")

    jobs = plan(Path(args.input), Path(args.output), suffix=args.suffix, recursive=args.recursive,
                overwrite=args.overwrite)
    existing = [job for job in jobs if args.skip_existing and job.dst.exists()]
    jobs = [job for job in jobs if job not in existing]
    # everything that can fail before the long work: inputs decoded, output folders writable
    jobs, skipped = _validate(jobs)
    if not jobs and len(skipped) == 1 and not existing:
        raise CommandError(skipped[0][1])
    for src, reason in skipped:
        print(f"skipping {src}: {reason}", file=sys.stderr, flush=True)
    if not jobs and skipped and not existing:
        raise CommandError(f"none of the {len(skipped)} inputs can be read")
    for folder in sorted({job.dst.parent for job in jobs}):
        writable_folder(folder, "the output folder")

    done = 0
    if jobs:
        device = setup_device(args)
        if args.fp16 and device.type != "cuda":
            raise CommandError(f"--fp16 needs a CUDA device (got {device}); drop --fp16 on the CPU")
        model, config = inference_model(args.checkpoint, device)
        if args.fp16:
            model = model.half()
        forced = task_routing(model, config, args.task) if args.task else None
        method = restore_tta if args.tta else restore
        for k, job in enumerate(jobs):
            try:
                image, info = read_image(job.src)
                stats: dict = {}
                out, routing = method(model, image.to(device), tile=args.tile, overlap=overlap if args.tile_mode == "blend" else None,
                                      routing=forced,
                                      progress=not args.quiet, max_memory=args.max_memory, tile_mode=args.tile_mode,
                                      stats=stats)
            except (ValueError, NotEnoughMemoryError) as err:
                skipped.append((job.src, str(err)))
                print(f"skipping {job.src}: {err}", file=sys.stderr, flush=True)
                continue
            try:
                write_image(out.float().clamp(0, 1).cpu(), job.dst, info, quality=args.quality)
            except OSError as err:
                from ..cli import os_error_message

                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    left = len(jobs) - k
                    raise CommandError(f"{os_error_message(err)} while writing {job.dst}; {done} image(s) restored, "
                                       f"{left} not written (the original files are untouched)") from None
                skipped.append((job.src, f"cannot write {job.dst}: {os_error_message(err)}"))
                print(f"skipping {job.src}: cannot write {job.dst}: {os_error_message(err)}", file=sys.stderr, flush=True)
                continue
            done += 1
            print(f"{job.src} -> {job.dst}  [{describe_routing(routing, config)}]  {describe_memory(stats)}", flush=True)
            del out
            if device.type == "cuda":
                torch.cuda.empty_cache()

    total = done + len(skipped) + len(existing)
    if total > 1 or skipped or existing:
        line = f"restored {done} of {total} image(s)"
        if existing:
            line += f"; {len(existing)} already existed (--skip-existing)"
        if skipped:
            line += f"; skipped {len(skipped)}: " + "; ".join(f"{src.name}: {reason}" for src, reason in skipped[:5])
            if len(skipped) > 5:
                line += f"; ... ({len(skipped) - 5} more above)"
        print(line, file=sys.stderr if skipped else sys.stdout, flush=True)
    return 1 if skipped else 0
