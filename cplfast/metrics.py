"""PSNR and SSIM for restoration, batched in torch (CPU or GPU) (SPEC §6).

Both equal scikit-image's ``peak_signal_noise_ratio`` and ``structural_similarity`` (uniform 7×7
window, ``gaussian_weights=False``, sample covariance, K1=0.01, K2=0.03, mean over channels) on the
same arrays, computed in float64.

``channel="rgb"`` scores the three channels (PromptIR's protocol); ``channel="y"`` scores the BT.601
luma used by BasicSR (and CPL): for RGB in [0,1],
``Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16/255`` (same ``data_range``).
``crop_border`` pixels are removed from every side first.

Inputs are ``(3,H,W)`` (→ a 0-d tensor) or ``(B,3,H,W)`` (→ ``(B,)``, one value per image).

SSIM per channel: with μ, σ², σ_xy the 7×7 window means, sample variances (×49/48) and covariance,
``S = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))``, ``C1 = (0.01 L)²``,
``C2 = (0.03 L)²``; the score is the mean of S over windows lying fully inside the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)
_Y_OFFSET = 16.0 / 255.0


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of RGB in [0,1] (BasicSR's ``rgb2ycbcr(y_only=True)``): ``(...,3,H,W) -> (...,1,H,W)``."""
    w = torch.tensor(_Y_WEIGHTS, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * w).sum(-3, keepdim=True) + _Y_OFFSET


def _prepare(pred: torch.Tensor, target: torch.Tensor, data_range: float, channel: str, crop_border: int):
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4) or t.shape[-3] != 3:
            raise ValueError(f"{name} must have shape (3,H,W) or (B,3,H,W), got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on one device, got {pred.device} and {target.device}")
    if channel not in ("rgb", "y"):
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be an int >= 0, got {crop_border!r}")
    single = pred.dim() == 3
    x = pred.detach().to(torch.float64)
    y = target.detach().to(torch.float64)
    if single:
        x, y = x[None], y[None]
    if crop_border:
        h, w = x.shape[-2:]
        if 2 * crop_border >= min(h, w):
            raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    if channel == "y":
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y, single


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, channel: str = "rgb", crop_border: int = 0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(L² / mean((pred − target)²))`` per image (float64).

    Identical images give ``inf`` (as scikit-image does).
    """
    x, y, single = _prepare(pred, target, data_range, channel, crop_border)
    mse = (x - y).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range**2 / mse)
    return out[0] if single else out


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, channel: str = "rgb", crop_border: int = 0,
    win_size: int = 7,
) -> torch.Tensor:
    """Structural similarity per image (float64), scikit-image's uniform-window form (module docstring)."""
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd int >= 3, got {win_size!r}")
    x, y, single = _prepare(pred, target, data_range, channel, crop_border)
    b, c, h, w = x.shape
    if min(h, w) < win_size:
        raise ValueError(f"images must be at least {win_size}x{win_size} after cropping, got {h}x{w}")
    x = x.reshape(b * c, 1, h, w)
    y = y.reshape(b * c, 1, h, w)
    # Windows that lie fully inside the image: exactly the region scikit-image keeps after its crop.
    stats = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], 1), win_size, stride=1)
    mx, my, mxx, myy, mxy = stats.unbind(1)
    cov_norm = win_size**2 / (win_size**2 - 1)
    vx = cov_norm * (mxx - mx * mx)
    vy = cov_norm * (myy - my * my)
    vxy = cov_norm * (mxy - mx * my)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    out = s.flatten(1).mean(1).view(b, c).mean(1)
    return out[0] if single else out


__all__ = ["psnr", "rgb_to_y", "ssim"]
