"""Losses of SPEC §4.8–§4.9: CPL's contrastive prompt regularisation and a supervised contrastive loss."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check
from . import functional
from .distributed import gather_rows
from .features import FilterBankPyramid, VGG16Features

FeatureExtractor = Callable[[torch.Tensor], Sequence[torch.Tensor]]
CPR_FORMS = ("infonce", "l1-push")
L1_PUSH_LEVEL_WEIGHTS = (0.2, 0.3, 0.5)  # the CPL authors' template: relu1_2, relu2_2, relu3_3


class ContrastivePromptLoss(nn.Module):
    """CPR: pull the restored image toward the ground truth, away from mismatched-prompt restorations.

    ``forward(output, target, negatives)`` with output, target ``(B, C, H, W)`` and negatives
    ``(K, B, C, H, W)`` (the K outputs restored with negative routing; which prompts they use —
    random unselected ones by default, as in the paper — is decided by the model, see
    :meth:`cplfast.SparsePromptModule.negative_routing`). ``form``:

    * ``"infonce"`` (default; cplfast's choice, the fused kernel)::

        loss = weight * sum_l level_weights[l] * infonce(phi_l(output), phi_l(target), phi_l(negatives),
                                                         temperature, dim=1)   (mean over locations)

      ``level_weights`` default to 1. Gradients reach the output and, unless ``detach_negatives=True``,
      the negatives (so the prompts used by the negatives are trained too).
    * ``"l1-push"`` (the CPL authors' template, Aitical/MCLIR; their pixel L1 term is the trainer's)::

        loss = -weight * mean_k sum_l level_weights[l] * mean|phi_l(output) - phi_l(negatives_k)|

      with the negatives always detached (the template computes them under ``no_grad``) and
      ``level_weights`` defaulting to ``(0.2, 0.3, 0.5)`` for a three-level extractor. ``target`` is
      checked but unused; ``temperature`` is unused. The term is unbounded below: keep ``weight`` small.

    ``phi`` is a frozen multi-level extractor; the target's features carry no gradient. ``features``:

    * ``"filterbank"`` (alias ``"filters"``; the default — cplfast's choice, not the paper's):
      :class:`cplfast.features.FilterBankPyramid`, fixed filters, no weights to download;
    * ``"vgg16"`` (the paper's feature space): :class:`cplfast.features.VGG16Features` (relu1_2,
      relu2_2, relu3_3, ImageNet normalisation) from ``vgg_weights`` (a ``.pth`` / ``.safetensors``
      file) or, when None, torchvision's weight cache; never downloaded;
    * any module / callable mapping images to a list of feature maps (e.g. a frozen copy of the
      network's encoder). It is used as given: freeze its parameters yourself.

    ``batch_negatives=True`` also contrasts every anchor with the other images' restored outputs at the
    same location. With ``a_b, p_b, n_kb`` the features of image ``b`` at one location, L2-normalised
    along C (eps 1e-12), ``s_p = a_b.p_b / tau``, ``s_k = a_b.n_kb / tau`` and keys ``a_g`` of every
    image ``g`` of the batch::

        loss_b = logsumexp(s_p, s_1..s_K, {a_b.a_g / tau : g != b}) - s_p      (mean over b and locations)

    ``gather=True`` (only with ``batch_negatives=True``) makes the keys the global batch under
    ``torch.distributed``: every rank's outputs, gradients flowing back to their owners (summed over
    ranks, so each rank's gradient is that of the sum of all ranks' losses). Ranks may hold different
    batch sizes but must agree on the feature shapes; every rank must call the loss and run backward.
    Outside an initialised process group ``gather`` changes nothing. With a single image in all (B = 1,
    no other rank) there is no cross term and the loss equals the plain one.
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
        batch_negatives: bool = False,
        gather: bool = False,
        form: str = "infonce",
    ):
        super().__init__()
        if form not in CPR_FORMS:
            raise ValueError(f"form must be one of {CPR_FORMS}, got {form!r}")
        self.form = form
        self.temperature = check.positive_scalar("temperature", temperature)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)
        if features in ("filterbank", "filters"):
            features = FilterBankPyramid()
        elif features == "vgg16":
            features = VGG16Features(vgg_weights)
        elif isinstance(features, str) or not callable(features):
            raise ValueError(f"features must be 'filterbank' ('filters'), 'vgg16' or a callable returning a list of feature "
                             f"maps, got {features!r}")
        self.features = features
        if level_weights is not None:
            level_weights = [float(w) for w in level_weights]
            if not level_weights or any(w < 0 for w in level_weights):
                raise ValueError(f"level_weights must be a non-empty sequence of numbers >= 0, got {level_weights!r}")
        self.level_weights = level_weights
        self.detach_negatives = bool(detach_negatives)
        for name, flag in (("batch_negatives", batch_negatives), ("gather", gather)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if gather and not batch_negatives:
            raise ValueError("gather=True needs batch_negatives=True: the gathered outputs are the batch negatives")
        if batch_negatives and form != "infonce":
            raise ValueError(f"batch_negatives extends the 'infonce' form, got form={form!r}")
        self.batch_negatives = batch_negatives
        self.gather = gather

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
        if self.form == "l1-push":
            return self._l1_push(output, negatives)
        if self.detach_negatives:
            negatives = negatives.detach()
        # One pass of the extractor over the output and its negatives together.
        queries = self._levels(torch.cat([output.unsqueeze(0), negatives]).flatten(0, 1))
        with torch.no_grad():
            positives = self._levels(target.detach())
        total = output.new_zeros(())
        for level, (query, positive) in enumerate(zip(queries, positives)):
            query = query.unflatten(0, (k + 1, b))
            term = self._level_loss(query[0], positive.to(query.dtype), query[1:])
            total = total + (term if self.level_weights is None else self.level_weights[level] * term)
        return self.weight * total

    def _l1_push(self, output: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        k, b = negatives.shape[:2]
        queries = self._levels(output)
        with torch.no_grad():
            pushed = self._levels(negatives.detach().flatten(0, 1))
        weights = self.level_weights
        if weights is None:
            if len(queries) != len(L1_PUSH_LEVEL_WEIGHTS):
                raise ValueError(f"form='l1-push' weighs {len(L1_PUSH_LEVEL_WEIGHTS)} levels by default but features "
                                 f"returned {len(queries)}: pass level_weights")
            weights = L1_PUSH_LEVEL_WEIGHTS
        total = output.new_zeros(())
        for w, query, negative in zip(weights, queries, pushed):
            distance = (query.unsqueeze(0) - negative.unflatten(0, (k, b)).to(query.dtype)).abs()
            total = total + w * distance.flatten(1).mean(dim=1).mean()
        return -self.weight * total

    def _level_loss(self, anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """One level's term, mean over locations: anchor, positive ``(B, C, H, W)``, negatives ``(K, B, C, H, W)``."""
        if not self.batch_negatives:
            return functional.infonce(anchor, positive, negatives, temperature=self.temperature, dim=1)
        # The fused kernel gives logsumexp(s_p, s_k) - s_p; the batch keys are merged into its log-sum-exp.
        own = functional.infonce(anchor, positive, negatives, temperature=self.temperature, dim=1, reduction="none")
        dtype = torch.promote_types(own.dtype, torch.float32)
        with torch.autocast(anchor.device.type, enabled=False):
            a = F.normalize(anchor.to(dtype), dim=1, eps=1e-12)
            keys, offset = gather_rows(a) if self.gather else (a, 0)  # (G, C, H, W)
            own = own.to(dtype)
            if keys.shape[0] == 1:  # no other image anywhere: nothing to add
                return own.mean()
            p = F.normalize(positive.to(dtype), dim=1, eps=1e-12)
            s_pos = (a * p).sum(1) / self.temperature  # (B, H, W)
            cross = torch.einsum("bchw,gchw->bghw", a, keys) / self.temperature  # (B, G, H, W)
            b = a.shape[0]
            itself = torch.zeros(b, keys.shape[0], dtype=torch.bool, device=a.device)
            itself[torch.arange(b, device=a.device), torch.arange(b, device=a.device) + offset] = True
            cross = cross.masked_fill(itself[:, :, None, None], float("-inf"))
            loss = torch.logaddexp(own + s_pos, torch.logsumexp(cross, dim=1)) - s_pos
        return loss.mean()

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, temperature={self.temperature}, weight={self.weight}, detach_negatives={self.detach_negatives}, "
                f"batch_negatives={self.batch_negatives}, gather={self.gather}")


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


__all__ = ["CPR_FORMS", "ContrastivePromptLoss", "SupConLoss"]
