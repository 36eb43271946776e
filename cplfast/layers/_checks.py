"""Input checks shared by the layers (SPEC §9): errors name the argument and what was expected."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as check


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def feature_map(name: str, x: object, channels: int | None = None, what: str = "") -> torch.Tensor:
    """``x`` must be a non-empty floating ``(B, channels, H, W)`` tensor."""
    check.tensor(name, x, 4)
    if channels is not None:
        check.shape(name, x, (None, channels, None, None), what or f"(B, C, H, W) with C = {channels}")
    check.nonempty(name, x)
    return x


def batch_matches(name: str, t: torch.Tensor, batch: int, reference: str = "x") -> None:
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (the batch of {reference}), got shape {tuple(t.shape)}")


def label_weights(labels: object, batch: int, num_classes: int, device: torch.device, dtype: torch.dtype,
                  name: str = "labels") -> torch.Tensor:
    """Degradation labels as mixing weights ``(B, T)``.

    Accepts integer class indices ``(B,)`` in ``[0, T)`` (one-hot) or float weights ``(B, T)`` (e.g. a
    composite degradation as 0.5/0.5), which are used as given.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices (B,) or weights (B, T), got "
                        f"{type(labels).__name__}")
    if labels.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {labels.device}")
    if labels.dtype.is_floating_point:
        check.shape(name, labels, (batch, num_classes), f"float weights (B, T) with B = {batch}, T = {num_classes}")
        return labels.to(dtype)
    if labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"{name} must hold integer class indices or float weights, got {labels.dtype}")
    check.shape(name, labels, (batch,), f"integer class indices (B,) with B = {batch}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must be class indices in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return F.one_hot(labels.long(), num_classes).to(dtype)


def soft_cross_entropy(log_probs: torch.Tensor, target_weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_t w_t log p_t`` (equals the usual cross-entropy for one-hot w)."""
    return -(target_weights * log_probs).sum(dim=1).mean()
