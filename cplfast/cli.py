"""The ``cplfast`` command line: ``demo``, ``train``, ``eval``, ``restore``, ``export``, ``bench``.

Each sub-command lives in ``cplfast.commands.<name>`` and provides ``add_arguments(parser)`` and
``run(args) -> int``. Expected failures (bad paths, corrupt files, missing optional packages) are
reported as one line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "train the tiny CPL model on the embedded images and report PSNR/SSIM before/after",
    "train": "train a PromptIR / CPL / PIP / DPPD model",
    "eval": "evaluate a checkpoint per task (PSNR/SSIM tables as markdown + CSV)",
    "restore": "restore an image or a folder of images with a checkpoint",
    "export": "export a model to ONNX, TensorRT, AOTInductor or a Triton Inference Server repository",
    "bench": "benchmark the fused ops against eager PyTorch and torch.compile",
}


class CommandError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def _load(name: str):
    return importlib.import_module(f"cplfast.commands.{name}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cplfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import a command's module only when it is the one asked for (or for --help of the whole CLI).
        if wanted is None or wanted == name:
            try:
                module = _load(name)
            except ModuleNotFoundError as err:
                if err.name != f"cplfast.commands.{name}":
                    raise
                p.set_defaults(_missing=name)
                continue
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"cplfast {args.command}: error: this command is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except (CommandError, FileNotFoundError, IsADirectoryError, PermissionError, ValueError, TypeError) as err:
        print(f"cplfast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cplfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
