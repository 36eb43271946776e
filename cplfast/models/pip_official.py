"""Official PIP checkpoints (longzilicart/pip_universal, ``PIPNet_Restormer_onskip_inter``) <-> cplfast keys.

The official network and ``PromptIR(prompt="pip", official_unused_layers=True, pip_router=False)`` hold
the same parameters (27,429,510 at the official configuration) under almost the same names. An official
state_dict has 612 keys; they map as follows:

* ``low_prompt_interaction_level{i}.prompt_transformer_cross.<rest>`` -> ``interaction{i}.<rest>``
  (16 keys per level, 48 in all);
* ``...prompt_transformer_cross.attn.attn1`` .. ``attn4`` (four ``(1,)`` mixing weights per level) ->
  ``interaction{i}.attn.mix`` ``(4,)``, in that order (12 keys become 3);
* every other key (backbone, ``prompt{i}.*``, ``chnl_reduce3``) keeps its name (552 keys), including the
  three ``reduce_noise_channel_{1,2,3}`` convolutions the official forward never calls (kept as frozen
  layers with ``official_unused_layers=True`` so files round-trip).

Hence 612 official keys -> 603 cplfast keys; nothing is dropped. cplfast's blind routers
(``prompt{i}.router.*``) have no official counterpart: the official code takes the degradation class
from the data or from a separately trained classifier. :meth:`PromptIR.from_official` therefore builds
the model with ``pip_router=False`` (labels or ``routing=`` required, as officially).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

_INTERACTION = re.compile(r"^low_prompt_interaction_level([123])\.prompt_transformer_cross\.(.+)$")
_MIX = re.compile(r"^interaction([123])\.attn\.attn([1-4])$")
_OWN_INTERACTION = re.compile(r"^interaction([123])\.(.+)$")

#: Keys present in every official PIP state_dict (used to recognise the format).
SIGNATURE_KEYS = (
    "chnl_reduce3.weight",
    "prompt1.detask_prompt_param",
    "prompt1.low_prompt_param",
    "low_prompt_interaction_level1.prompt_transformer_cross.attn.attn1",
)
OFFICIAL_KEYS = 612


def is_official_pip(state: Mapping[str, object]) -> bool:
    """Whether ``state`` (a prefix-free state_dict) has the official PIP network's key names."""
    return all(key in state for key in SIGNATURE_KEYS)


def official_pip_to_cplfast(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Rename an official PIP state_dict to cplfast's ``PromptIR(prompt="pip")`` keys.

    Returns ``(renamed, report)`` with ``report = {"official": n_in, "renamed": ..., "merged": ...,
    "kept": ..., "cplfast": n_out}``: ``renamed`` counts interaction keys moved to ``interaction{i}``,
    ``merged`` the ``attn1..attn4`` weights folded into ``mix``, ``kept`` the keys whose name is unchanged.
    Raises ValueError when a level's mixing weights are incomplete or not ``(1,)`` tensors.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    renamed: dict[str, torch.Tensor] = {}
    mixes: dict[str, dict[int, torch.Tensor]] = {}
    report = {"official": len(state), "renamed": 0, "merged": 0, "kept": 0}
    for key, value in state.items():
        match = _INTERACTION.match(key)
        if match is None:
            renamed[key] = value
            report["kept"] += 1
            continue
        own = f"interaction{match.group(1)}.{match.group(2)}"
        mix = _MIX.match(own)
        if mix is not None:
            mixes.setdefault(f"interaction{mix.group(1)}.attn.mix", {})[int(mix.group(2))] = value
            report["merged"] += 1
        else:
            renamed[own] = value
            report["renamed"] += 1
    for key, parts in mixes.items():
        if sorted(parts) != [1, 2, 3, 4]:
            raise ValueError(f"{key}: the official state_dict must hold attn1..attn4, got attn{sorted(parts)}")
        if any(t.numel() != 1 for t in parts.values()):
            raise ValueError(f"{key}: attn1..attn4 must be single numbers, got shapes "
                             f"{[tuple(parts[j].shape) for j in range(1, 5)]}")
        renamed[key] = torch.cat([parts[j].reshape(1) for j in range(1, 5)])
    report["cplfast"] = len(renamed)
    return renamed, report


def cplfast_to_official_pip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`official_pip_to_cplfast` (``prompt{i}.router.*`` is dropped: not official)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if re.match(r"^prompt[123]\.router\.", key):
            continue
        match = _OWN_INTERACTION.match(key)
        if match is None:
            out[key] = value
            continue
        level, rest = match.groups()
        prefix = f"low_prompt_interaction_level{level}.prompt_transformer_cross."
        if rest == "attn.mix":
            if value.numel() != 4:
                raise ValueError(f"{key} must hold 4 mixing weights to export to the official format, "
                                 f"got {value.numel()}")
            for j in range(4):
                out[f"{prefix}attn.attn{j + 1}"] = value[j:j + 1].clone()
        else:
            out[prefix + rest] = value
    return out


__all__ = ["OFFICIAL_KEYS", "SIGNATURE_KEYS", "cplfast_to_official_pip", "is_official_pip",
           "official_pip_to_cplfast"]
