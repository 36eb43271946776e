"""The ``cplfast`` command line: ``demo``, ``train``, ``eval``, ``restore``, ``export``, ``bench``, ``study``.

Each sub-command lives in ``cplfast.commands.<name>`` and provides ``add_arguments(parser)`` and
``run(args) -> int``. Expected failures (bad paths, corrupt files, missing optional packages, operating-
system errors such as a read-only folder or a full disk, running out of memory, a diverged training) are
reported as one line on stderr with a non-zero exit code, never a traceback. ``cplfast --version``.
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
    "study": "train PromptIR, CPL (+ ablation), PIP and DPPD on an equal budget and compare them",
}


class CommandError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def _load(name: str):
    return importlib.import_module(f"cplfast.commands.{name}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cplfast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cplfast {__version__}")
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
    except (CommandError, ValueError, TypeError) as err:
        return _fail(args.command, str(err))
    except OSError as err:
        return _fail(args.command, os_error_message(err))
    except MemoryError as err:
        return _fail(args.command, str(err) or "out of memory; for restore/eval pass --tile 512 (or smaller)")
    except RuntimeError as err:
        text = str(err).strip()
        if text.startswith("training diverged"):
            return _fail(args.command, f"{text.splitlines()[0]}; lower --lr (e.g. by 10x) or keep --grad-clip on")
        if _is_out_of_memory(err):
            return _fail(args.command, f"out of memory ({text.splitlines()[0][:120] if text else type(err).__name__}); "
                                       "restore in tiles with --tile 512 (or smaller), or use a smaller --batch")
        raise
    except KeyboardInterrupt as interrupt:
        saved = getattr(interrupt, "cplfast_checkpoint", None)
        if saved is not None:
            step, folder = saved
            print(f"cplfast {args.command}: interrupted; saved a checkpoint at step {step} in {folder} "
                  f"(continue with: cplfast train --resume {folder})", file=sys.stderr)
        else:
            print(f"cplfast {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(command: str, message: str) -> int:
    text = " ".join(message.split()) if "\n" in message else message
    print(f"cplfast {command}: error: {text}", file=sys.stderr)
    return 2


def _is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(__import__("torch"), "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err)[:200].lower() \
        or "DefaultCPUAllocator: can't allocate memory" in str(err)[:300]


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: ``<what>: <file>`` (e.g. "No space left on device: out.png")."""
    if err.errno is not None and err.strerror:
        names = [n for n in (err.filename, err.filename2) if n]
        return err.strerror + (": " + " -> ".join(str(n) for n in names) if names else "")
    return str(err) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
