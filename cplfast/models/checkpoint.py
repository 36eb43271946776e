"""Reading state_dicts from checkpoint files safely (SPEC §9: no code runs from a user's file).

``.ckpt`` / ``.pth`` / ``.pt`` / ``.bin`` go through ``torch.load(weights_only=True)``; ``.safetensors``
through safetensors. Official PromptIR checkpoints are PyTorch-Lightning files whose ``state_dict``
keys carry the module prefix ``net.``; DDP adds ``module.``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from .pip_official import is_official_pip, official_pip_to_cplfast

TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")
_PREFIXES = ("net.", "module.", "model.", "_orig_mod.")


def read_state_dict_file(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """The raw object stored in a checkpoint file (a dict), read without executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise RuntimeError(f"checkpoint {str(path)!r} is not a readable safetensors file: {err}") from err
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"checkpoint path {str(path)!r} must end in one of {TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}, got {suffix!r}"
        )
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise RuntimeError(
            f"checkpoint {str(path)!r} could not be read with torch.load(weights_only=True) "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). It is corrupt, or it "
            "holds Python objects beyond tensors and containers; re-save just its state_dict "
            "(torch.save(ckpt['state_dict'], 'weights.pth')) or convert it to safetensors."
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict / state_dict")
    return dict(obj)


def unwrap_state_dict(obj: Mapping, *, prefixes: tuple[str, ...] = _PREFIXES) -> dict[str, torch.Tensor]:
    """The tensor state_dict inside ``obj``: unwrap ``{"state_dict": ...}``-style containers, then strip a
    prefix (``net.``, ``module.``, ``model.``, ``_orig_mod.``) shared by every key."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(obj).__name__}")
    state = obj
    for _ in range(3):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = inner
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError("state_dict holds no tensors")
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


OFFICIAL_UNUSED_LAYERS = ("chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
                          "reduce_noise_channel_1", "reduce_noise_channel_2", "reduce_noise_channel_3")
# BasicSR-style files (CPLIR, PIP) hold "params" and often "params_ema"; the EMA weights are preferred.
_PARAM_ENTRIES = ("params_ema", "params")

# Official checkpoint formats PromptIR.from_official recognises, in detection order:
#   detect(state) -> bool; prompt: the default variant; prompts: the variants it may load as;
#   overrides: PromptIR(preset="base") options that give the format's key set.
OFFICIAL_FORMATS: dict[str, dict] = {
    "promptir": {
        "detect": lambda state: "prompt1.prompt_param" in state and "chnl_reduce1.weight" in state,
        "prompt": "promptir", "prompts": ("promptir", "cpl"), "overrides": {},
    },
    "cplir": {
        "detect": lambda state: "prompt1.prompt_param" in state
        and not any(k.split(".")[0] in OFFICIAL_UNUSED_LAYERS for k in state),
        "prompt": "cpl", "prompts": ("cpl", "promptir"), "overrides": {"official_unused_layers": False},
    },
    # longzilicart/pip_universal's PIPNet_Restormer_onskip_inter (612 keys); "convert" renames its keys
    # to cplfast's (cplfast.models.pip_official). No router in the file: the model needs labels/routing.
    "pip": {
        "detect": is_official_pip,
        "convert": lambda state: official_pip_to_cplfast(state)[0],
        "prompt": "pip", "prompts": ("pip",),
        "overrides": {"official_unused_layers": True, "pip_router": False},
    },
}


def detect_official_format(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name in :data:`OFFICIAL_FORMATS` of the first format whose key test ``state`` passes, or None.

    ``"promptir"``: PromptGenBlock prompts and the six unused 1x1 convolutions (548 keys);
    ``"cplir"``: the prompts without any of those convolutions (542 keys);
    ``"pip"``: official PIP (``chnl_reduce3``, ``prompt{i}.detask_prompt_param``,
    ``low_prompt_interaction_level{i}``; 612 keys).
    """
    for name, spec in OFFICIAL_FORMATS.items():
        if spec["detect"](state):
            return name
    return None


def official_state_dict(source, *, map_location: str | torch.device = "cpu", key: str | None = None,
                        return_entry: bool = False):
    """A state_dict from a mapping or a checkpoint path, with wrappers and prefixes removed.

    A Lightning checkpoint may also hold tensors of other modules (e.g. a loss); only keys with the
    ``net.`` prefix are kept when there are any. A BasicSR-style file (``{"params": ..., "params_ema":
    ...}``) gives ``key`` when set (``"params"`` or ``"params_ema"``; an error if absent), else
    ``params_ema`` when present, else ``params``. ``return_entry=True`` returns ``(state, entry)`` with
    ``entry`` the top-level entry used (``"params_ema"``, ``"params"``, ``"state_dict"``, ...) or None.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_state_dict_file(source, map_location=map_location)
    if not isinstance(source, Mapping):
        raise TypeError(
            f"source must be a state_dict or a checkpoint path, got {type(source).__name__}"
        )
    state, entry = source, None
    if key is not None:
        if not isinstance(key, str) or not isinstance(source.get(key), Mapping):
            entries = [k for k, v in source.items() if isinstance(v, Mapping)]
            raise ValueError(f"key={key!r} is not an entry of the checkpoint (its entries: {entries})")
        state, entry = source[key], key
    else:
        for name in _PARAM_ENTRIES + _WRAPPER_KEYS:
            if isinstance(state.get(name), Mapping):
                state, entry = state[name], name
                break
    if isinstance(state, Mapping) and any(str(k).startswith("net.") for k in state):
        state = {k: v for k, v in state.items() if str(k).startswith("net.")}
    state = unwrap_state_dict(state)
    return (state, entry) if return_entry else state


__all__ = ["OFFICIAL_FORMATS", "detect_official_format", "official_state_dict", "read_state_dict_file", "unwrap_state_dict"]
