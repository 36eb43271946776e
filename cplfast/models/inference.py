"""Inference on images of any size, whole or in overlapping tiles (SPEC §5).

Whole image: reflect-pad the bottom/right to a multiple of 8, run, crop back.

Tiled: the routing (which prompt / degradation the model picks) is computed once, on the whole image
downscaled so its long side is at most ``routing_size``, and forced on every tile, so all tiles restore
the same degradation. Spatial prompt maps (promptir, cpl, pip) come from that same pass: each tile gets
its own region of the whole image's maps (bilinear resampling; an exact crop when the image needed no
downscaling) instead of a prompt stretched over the tile alone. Tiles of ``tile x tile`` pixels step by ``tile - overlap``; each tile's output is
weighted by a separable raised-cosine window that ramps over ``overlap`` pixels at edges shared with
another tile (1 elsewhere), and the weighted sum is divided by the summed weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

MULTIPLE = 8


def _pad_to_multiple(x: torch.Tensor, multiple: int = MULTIPLE) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _check_image(model, image) -> torch.Tensor:
    channels = model.config.in_channels
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor (values in [0, 1]), got {image.dtype}")
    if image.dim() not in (3, 4) or image.shape[-3] != channels:
        raise ValueError(f"image must have shape ({channels}, H, W) or (B, {channels}, H, W), got {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("image must hold finite values (found NaN or Inf)")
    return image


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile`` stepping ``tile - overlap``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def blend_window(size: int, overlap: int, ramp_start: bool, ramp_end: bool, *, device=None, dtype=None) -> torch.Tensor:
    """1-D window ``(size,)``: raised-cosine ramps ``(1 - cos(pi (i + 1/2) / overlap)) / 2`` over the first /
    last ``overlap`` samples where the tile meets a neighbour, 1 elsewhere; strictly positive."""
    window = torch.ones(size, device=device, dtype=dtype)
    ramp_len = min(overlap, size // 2)
    if ramp_len > 0:
        i = torch.arange(ramp_len, device=device, dtype=torch.float64)
        ramp = ((1 - torch.cos(math.pi * (i + 0.5) / ramp_len)) / 2).to(dtype or torch.float32)
        if ramp_start:
            window[:ramp_len] = ramp
        if ramp_end:
            window[size - ramp_len:] = ramp.flip(0)
    return window


@dataclass
class _WholeImagePrompts:
    """Routing and prompt maps of the whole image, computed once on a downscaled copy."""

    routing: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    ratio: tuple[float, float]  # downscaled / full size, per axis
    padded_size: tuple[int, int]  # size of the padded downscaled input


def _whole_image_prompts(model, image: torch.Tensor, routing_size: int, routing) -> _WholeImagePrompts:
    h, w = image.shape[-2:]
    scale = min(1.0, routing_size / max(h, w))
    small = image
    if scale < 1.0:
        size = (max(MULTIPLE, round(h * scale)), max(MULTIPLE, round(w * scale)))
        small = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    padded = _pad_to_multiple(small)
    _, aux = model(padded, routing=routing, return_aux=True)
    ratio = (small.shape[-2] / h, small.shape[-1] / w)
    return _WholeImagePrompts(aux["routing"], aux.get("prompt_maps", {}), ratio, tuple(padded.shape[-2:]))


def _tile_maps(prompts: _WholeImagePrompts, top: int, left: int, th: int, tw: int) -> dict[str, torch.Tensor]:
    """Each prompt map resampled over the tile's region, at the tile's resolution for that map.

    A map of size (mh, mw) for a padded input of (PH, PW) has stride f = PH / mh. Tile pixel i at that
    stride has full-image centre ``top + (i + 1/2) f``, i.e. map coordinate ``(top + (i + 1/2) f) * ratio / f``.
    """
    crops = {}
    for key, full in prompts.maps.items():
        mh, mw = full.shape[-2:]
        fy, fx = prompts.padded_size[0] / mh, prompts.padded_size[1] / mw
        oh, ow = round(th / fy), round(tw / fx)
        ys = (top + (torch.arange(oh, device=full.device, dtype=torch.float64) + 0.5) * fy) * prompts.ratio[0] / fy
        xs = (left + (torch.arange(ow, device=full.device, dtype=torch.float64) + 0.5) * fx) * prompts.ratio[1] / fx
        gy, gx = (2 * ys / mh - 1).to(full.dtype), (2 * xs / mw - 1).to(full.dtype)
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
        grid = grid.unsqueeze(0).expand(full.shape[0], oh, ow, 2)
        crops[key] = F.grid_sample(full, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return crops


@torch.no_grad()
def restore(model, image: torch.Tensor, *, tile: int | None = None, overlap: int = 32,
            routing: Mapping[str, torch.Tensor] | None = None, routing_size: int = 512):
    """Restore ``image`` ``(3,H,W)`` or ``(B,3,H,W)`` of any size with ``model`` in eval mode, without grad.

    Args:
        tile: tile side in pixels (a multiple of 8, > ``overlap``), or None for the whole image at once.
        overlap: pixels shared by neighbouring tiles (blended with a raised-cosine window).
        routing: forced routing (``aux["routing"]`` of an earlier call); default: computed by the model —
            on the whole image without tiling, on the image downscaled to ``routing_size`` with tiling
            (that pass also gives the prompt maps every tile takes its region from).
        routing_size: long side of the downscaled image the tiled routing is computed on.

    Returns ``(restored image, same shape as image, routing dict)``.
    """
    image = _check_image(model, image)
    squeeze = image.dim() == 3
    x = image.unsqueeze(0) if squeeze else image
    if tile is not None:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < MULTIPLE or tile % MULTIPLE:
            raise ValueError(f"tile must be None or a positive multiple of {MULTIPLE}, got {tile!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"overlap must be an int in [0, tile={tile}), got {overlap!r}")
    if isinstance(routing_size, bool) or not isinstance(routing_size, int) or routing_size < MULTIPLE:
        raise ValueError(f"routing_size must be an int >= {MULTIPLE}, got {routing_size!r}")
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)

    was_training = model.training
    model.eval()
    try:
        h, w = x.shape[-2:]
        padded = _pad_to_multiple(x)
        if tile is None:
            out, aux = model(padded, routing=routing, return_aux=True)
            routing = aux["routing"]
        else:
            prompts = _whole_image_prompts(model, x, routing_size, routing)
            routing = prompts.routing
            out = _tiled(model, padded, tile, overlap, prompts)
    finally:
        model.train(was_training)
    out = out[..., :h, :w]
    return (out[0] if squeeze else out), routing


def _tiled(model, x: torch.Tensor, tile: int, overlap: int, prompts: _WholeImagePrompts) -> torch.Tensor:
    b, _, h, w = x.shape
    out = x.new_zeros(b, model.config.out_channels, h, w)
    weight = x.new_zeros(1, 1, h, w)
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for top in rows:
        for left in cols:
            th, tw = min(tile, h), min(tile, w)
            maps = _tile_maps(prompts, top, left, th, tw) or None
            piece = model(x[..., top:top + th, left:left + tw], routing=prompts.routing, prompt_maps=maps)
            wy = blend_window(th, overlap, top > 0, top + th < h, device=x.device, dtype=x.dtype)
            wx = blend_window(tw, overlap, left > 0, left + tw < w, device=x.device, dtype=x.dtype)
            window = wy[:, None] * wx[None, :]
            out[..., top:top + th, left:left + tw] += piece * window
            weight[..., top:top + th, left:left + tw] += window
    return out / weight


__all__ = ["blend_window", "restore", "tile_starts"]
