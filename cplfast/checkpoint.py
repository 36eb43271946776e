"""Checkpoints: safetensors tensors + JSON, written atomically, loaded without executing code.

A training run folder holds

- ``model.safetensors``: the weights to restore with (the EMA weights when EMA is on); its
  safetensors metadata carries the JSON config (``"cplfast"`` key) so the file alone rebuilds the model;
- ``config.json``: the same config, human readable;
- ``train_state.safetensors``: everything ``--resume`` needs (raw weights, EMA, optimizer moments,
  RNG states) with the JSON part (step, schedule, hyper-parameters) in its metadata — one file, so
  it is always self-consistent.

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed over
the old one (``os.replace`` is atomic), so a crash never leaves a truncated checkpoint behind.
Loading uses ``safetensors`` (no pickle). Official PromptIR ``.ckpt/.pth`` files go through
:meth:`cplfast.models.PromptIR.from_official` (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

FORMAT = "cplfast-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that is missing pieces, corrupt, or not a cplfast checkpoint."""


# temporary names of atomic writes: ".<name>.tmp<pid>" (checkpoints) and ".<stem>.tmp<pid><suffix>" (images)
_TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)(\.[A-Za-z0-9]+)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no write in flight when it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder`` (those whose writing
    process is gone); returns the removed paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and entry.is_file() and not _pid_alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def check_finite(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first floating-point tensor that holds NaN or Inf."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(
                    f"{source}: weight {name!r} holds {bad} non-finite value(s) (NaN/Inf) of {value.numel()}; "
                    "the checkpoint is corrupt or its training diverged, and would restore garbage")


def _names(keys: list[str], limit: int) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def describe_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], limit: int = 8) -> str | None:
    """Why ``got`` does not load into a model whose state_dict is ``expected`` (None when it does):
    missing keys, unexpected keys and shape mismatches, each with the first ``limit`` names."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(expected) & set(got))
              if tuple(got[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_names(missing, limit)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected, limit)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (file vs model): {_names(shapes, limit)}")
    return "; ".join(parts) or None


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``model.load_state_dict(state, strict=True)`` with a full one-line :class:`CheckpointError` listing
    the first missing / unexpected / mis-shaped keys, and non-finite weights refused."""
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"{source}: the weights do not fit the model: {problem}")
    check_finite(state, source)
    model.load_state_dict(state, strict=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared ones)."""
    out = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint entry {k!r} must be a tensor, got {type(v).__name__}")
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
    """Atomically write ``tensors`` to a safetensors file, ``meta`` JSON-encoded under key ``"cplfast"``."""
    from safetensors.torch import save

    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION)}
    if meta is not None:
        metadata["cplfast"] = json.dumps(meta, sort_keys=True)
    return atomic_write_bytes(path, save(_plain(tensors), metadata=metadata))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a file written by :func:`save_tensors`; clear errors for bad files."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a checkpoint file, got a folder: {path}")
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors file ({err.__class__.__name__}: {str(err)[:80]})") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a cplfast checkpoint (no cplfast metadata)")
    try:
        meta = json.loads(metadata.get("cplfast", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt cplfast metadata") from None
    return tensors, meta


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder -> its ``model.safetensors``; a file -> itself (must exist)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.exists():
            raise FileNotFoundError(f"{path} is a folder without {MODEL_FILE}: not a cplfast run folder")
        return candidate
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    return path


def save_model(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (with ``config`` embedded) and ``config.json`` into ``folder``."""
    folder = Path(folder)
    path = save_tensors(folder / MODEL_FILE, state_dict, {"kind": "model", "config": config})
    atomic_write_json(folder / CONFIG_FILE, config)
    return path


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` from a cplfast model checkpoint (file or run folder)."""
    path = resolve_checkpoint(path)
    if path.suffix.lower() in TORCH_SUFFIXES:
        raise CheckpointError(f"{path} is a PyTorch pickle checkpoint; cplfast model files are .safetensors")
    tensors, meta = load_tensors(path)
    if meta.get("kind") == "train_state":
        raise CheckpointError(f"{path} is a training state (for --resume), not a model; use {MODEL_FILE} of the run")
    if meta.get("kind") != "model" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is not a cplfast model checkpoint (no model config)")
    check_finite(tensors, path)
    return tensors, meta["config"]


# ------------------------------------------------------------------------------ optimizer state I/O
def flatten_optimizer_state(state: dict[str, Any], prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "indices": [int(i) for i in state["state"]]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "optim") -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["indices"]}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


__all__ = [
    "CONFIG_FILE", "CheckpointError", "MODEL_FILE", "STATE_FILE", "atomic_write_bytes", "atomic_write_json",
    "check_finite", "describe_mismatch", "flatten_optimizer_state", "load_model_file", "load_tensors", "load_weights",
    "remove_stale_temp_files", "resolve_checkpoint", "save_model", "save_tensors", "unflatten_optimizer_state",
]
