"""Argument helpers shared by the demo / train / eval / restore commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the cores not already busy, from the load average)")


def check_device_name(name: str) -> str:
    """``name`` if it is ``auto`` or a device PyTorch knows (cpu, cuda, cuda:N, mps, ...), else a ValueError."""
    if name == "auto":
        return name
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    return name


def writable_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``folder`` if needed and check a file can be written in it, before any long work starts.

    Raises a one-line :class:`cplfast.cli.CommandError` naming ``flag`` otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} must be a folder, got a file: {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cplfast-write-check.tmp{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        from ..cli import CommandError

        raise CommandError(f"cannot write to {flag} {folder}: {err.strerror or type(err).__name__}") from None
    return folder


def setup_device(args: argparse.Namespace, processes_per_node: int = 1) -> torch.device:
    """Resolve ``--device`` and set the CPU thread count: ``--threads``, else this process's share
    (``processes_per_node``) of :func:`cplfast.train.cpu_threads`."""
    from ..train import cpu_threads, resolve_device

    device = resolve_device(check_device_name(args.device))
    threads = args.threads
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads or max(1, cpu_threads() // max(1, processes_per_node)))
    return device


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def tasks_argument(text: str) -> tuple[str, ...]:
    """``noise,rain,haze`` -> a validated tuple of task names (composites joined by '+')."""
    from ..data import parse_task

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise argparse.ArgumentTypeError("give at least one task")
    for t in tasks:
        try:
            parse_task(t)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return tasks
