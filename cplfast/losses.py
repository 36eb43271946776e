"""Losses of SPEC §4.8–§4.9: CPL's contrastive prompt regularisation and a supervised contrastive loss."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from . import _validation as check
from . import functional
from .features import FilterBankPyramid, VGG16Features

FeatureExtractor = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class ContrastivePromptLoss(nn.Module):
    """CPR: pull the restored image toward the ground truth, away from mismatched-prompt restorations.

    ``forward(output, target, negatives)`` with output, target ``(B, C, H, W)`` and negatives
    ``(K, B, C, H, W)`` (the K outputs restored with negative routing)::

        loss = weight * sum_l level_weights[l] * infonce(phi_l(output), phi_l(target), phi_l(negatives),
                                                         temperature, dim=1)   (mean over locations)

    ``phi`` is a frozen multi-level extractor; the target's features carry no gradient. ``features``:

    * ``"filterbank"`` (default): :class:`cplfast.features.FilterBankPyramid` — fixed filters, no weights;
    * ``"vgg16"``: :class:`cplfast.features.VGG16Features` from ``vgg_weights`` (a local file; never
      downloaded);
    * any module / callable mapping images to a list of feature maps (e.g. a frozen copy of the
      network's encoder). It is used as given: freeze its parameters yourself.

    Gradients reach the output and, unless ``detach_negatives=True``, the negatives.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight: float = 0.1,
        features: str | FeatureExtractor = "filterbank",
        *,
        level_weights: Sequence[float] | None = None,
        detach_negatives: bool = False,
        vgg_weights: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.temperature = check.positive_scalar("temperature", temperature)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)
        if features == "filterbank":
            features = FilterBankPyramid()
        elif features == "vgg16":
            features = VGG16Features(vgg_weights)
        elif isinstance(features, str) or not callable(features):
            raise ValueError(f"features must be 'filterbank', 'vgg16' or a callable returning a list of feature "
                             f"maps, got {features!r}")
        self.features = features
        if level_weights is not None:
            level_weights = [float(w) for w in level_weights]
            if not level_weights or any(w < 0 for w in level_weights):
                raise ValueError(f"level_weights must be a non-empty sequence of numbers >= 0, got {level_weights!r}")
        self.level_weights = level_weights
        self.detach_negatives = bool(detach_negatives)

    def _levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        levels = list(self.features(images))
        if not levels:
            raise RuntimeError("features returned no feature maps")
        if self.level_weights is not None and len(self.level_weights) != len(levels):
            raise ValueError(f"level_weights has {len(self.level_weights)} entries but features returned "
                             f"{len(levels)} levels")
        return levels

    def forward(self, output: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        check.tensor("output", output, 4)
        check.tensor("target", target, 4)
        check.tensor("negatives", negatives, 5)
        check.shape("target", target, tuple(output.shape), "same as output: (B, C, H, W)")
        check.shape("negatives", negatives, (None, *output.shape), "(K, B, C, H, W) matching output")
        check.nonempty("output", output)
        check.nonempty("negatives", negatives)
        check.same_device(output=output, target=target, negatives=negatives)
        check.same_dtype(output=output, negatives=negatives)
        k, b = negatives.shape[:2]
        if self.detach_negatives:
            negatives = negatives.detach()
        # One pass of the extractor over the output and its negatives together.
        queries = self._levels(torch.cat([output.unsqueeze(0), negatives]).flatten(0, 1))
        with torch.no_grad():
            positives = self._levels(target.detach())
        total = output.new_zeros(())
        for level, (query, positive) in enumerate(zip(queries, positives)):
            query = query.unflatten(0, (k + 1, b))
            term = functional.infonce(query[0], positive.to(query.dtype), query[1:],
                                      temperature=self.temperature, dim=1)
            total = total + (term if self.level_weights is None else self.level_weights[level] * term)
        return self.weight * total

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight={self.weight}, detach_negatives={self.detach_negatives}"


class SupConLoss(nn.Module):
    """Supervised contrastive loss over embeddings ``z (N, D)`` and integer labels ``(N,)`` (SPEC §4.9).

    Thin module over :func:`cplfast.functional.supcon`: pulls together prompts / routings of images with
    the same degradation type, pushes apart the others. ``gather=True`` under ``torch.distributed`` uses
    every rank's embeddings as keys.
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", gather: bool = False):
        super().__init__()
        self.temperature = check.positive_scalar("temperature", temperature)
        self.reduction = check.choice("reduction", reduction, ("mean", "sum", "none"))
        if not isinstance(gather, bool):
            raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
        self.gather = gather

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.supcon(z, labels, temperature=self.temperature, reduction=self.reduction, gather=self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, gather={self.gather}"


__all__ = ["ContrastivePromptLoss", "SupConLoss"]
