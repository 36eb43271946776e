"""Inference on images of any size, whole or in overlapping tiles (SPEC §5).

Whole image: reflect-pad the bottom/right to a multiple of 8, run, crop back.

Tiled: the routing (which prompt / degradation the model picks) is computed once, on the whole image
downscaled so its long side is at most ``routing_size``, and forced on every tile, so all tiles restore
the same degradation. Spatial prompt maps (promptir, cpl, pip) come from that same pass: each tile gets
its own region of the whole image's maps (bilinear resampling; an exact crop when the image needed no
downscaling) instead of a prompt stretched over the tile alone. Tiles of ``tile x tile`` pixels step by ``tile - overlap``; each tile's output is
weighted by a separable raised-cosine window that ramps over ``overlap`` pixels at edges shared with
another tile (1 elsewhere), and the weighted sum is divided by the summed weights.

Input values: images are floats in [0, 1]. A float image in 0-255 (max above 1.1, min not below -0.1,
max at most 255.5) is divided by 255 with a warning; anything else outside [-0.1, 1.1] is an error.

Memory: before a whole-image restore, the activation memory is estimated (about
:data:`BYTES_PER_PIXEL_CHANNEL` bytes per pixel and channel of the first level in fp32) and compared with
what the device has free; if it does not fit, :class:`NotEnoughMemoryError` names a tile size that does.

Progress: ``progress=True`` shows a tqdm bar (after 2 s) over the tiles, or for a whole image over the
model's top-level blocks as they run.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

MULTIPLE = 8
RANGE_TOLERANCE = 0.1
# peak activation bytes of a whole-image forward, per pixel and per channel of the first level, fp32
# (measured on CPU with the tiny/small presets: 150-165)
BYTES_PER_PIXEL_CHANNEL = 160


class NotEnoughMemoryError(MemoryError):
    """A whole-image restore that would not fit in the device's free memory (the message names a tile)."""


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
    return check_value_range(image)


def check_value_range(image: torch.Tensor) -> torch.Tensor:
    """``image`` if its values are in [0, 1] (± :data:`RANGE_TOLERANCE`); divided by 255 with a warning
    if they look like 0-255; a ValueError otherwise."""
    lo, hi = (float(v) for v in torch.aminmax(image.detach()))
    if lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE:
        return image
    if lo >= -RANGE_TOLERANCE and hi <= 255.5:
        warnings.warn(f"image values span [{lo:.3g}, {hi:.3g}], not [0, 1]: treating them as 0-255 and dividing "
                      "by 255 (pass image / 255 to silence this)", UserWarning, stacklevel=4)
        return image / 255
    raise ValueError(f"image values must be in [0, 1] (floats), got values in [{lo:.3g}, {hi:.3g}]; divide 8-bit "
                     "images by 255 and 16-bit images by 65535")


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CUDA: driver free + this process's cached blocks; CPU:
    MemAvailable of /proc/meminfo), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def estimate_restore_bytes(model, batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of a forward on ``(batch, C, height, width)`` (padded to 8)."""
    dim = int(getattr(getattr(model, "config", None), "dim", 48))
    h, w = -(-height // MULTIPLE) * MULTIPLE, -(-width // MULTIPLE) * MULTIPLE
    element = torch.empty((), dtype=dtype).element_size()
    return int(BYTES_PER_PIXEL_CHANNEL * dim * batch * h * w * element / 4)


def check_memory(model, x: torch.Tensor) -> None:
    """Raise :class:`NotEnoughMemoryError` (naming a tile size that fits) if a whole-image forward of ``x``
    would not fit in the free memory of its device. ``CPLFAST_SKIP_MEMORY_CHECK=1`` skips the check."""
    if os.environ.get("CPLFAST_SKIP_MEMORY_CHECK") == "1":
        return
    free = free_memory(x.device)
    if free is None:
        return
    b, _, h, w = x.shape
    need = estimate_restore_bytes(model, b, h, w, x.dtype)
    if need <= free:
        return
    tile = 1024
    while tile > 64 and estimate_restore_bytes(model, b, tile, tile, x.dtype) * 1.5 > free:
        tile //= 2
    gib = 2.0 ** 30
    raise NotEnoughMemoryError(
        f"restoring the whole {w}x{h} image needs about {need / gib:.1f} GiB but {x.device} has "
        f"{free / gib:.1f} GiB free; restore it in tiles instead: --tile {tile} "
        f"(model.restore(image, tile={tile}))")


def _progress_bar(total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=2.0, dynamic_ncols=True, leave=False)


class _BlockProgress:
    """Advances a progress bar each time a top-level block of ``model`` finishes (whole-image restores)."""

    def __init__(self, model, desc: str = "restore"):
        self.blocks = [m for m in model.children()]
        self.bar = _progress_bar(len(self.blocks), desc, "block")
        self.handles = [m.register_forward_hook(self._step) for m in self.blocks]

    def _step(self, *_):
        if self.bar.n < self.bar.total:
            self.bar.update(1)

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.bar.close()


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
            routing: Mapping[str, torch.Tensor] | None = None, routing_size: int = 512,
            progress: bool = False, check_memory_first: bool = True):
    """Restore ``image`` ``(3,H,W)`` or ``(B,3,H,W)`` of any size with ``model`` in eval mode, without grad.

    Args:
        tile: tile side in pixels (a multiple of 8, > ``overlap``), or None for the whole image at once.
        overlap: pixels shared by neighbouring tiles (blended with a raised-cosine window).
        routing: forced routing (``aux["routing"]`` of an earlier call); default: computed by the model —
            on the whole image without tiling, on the image downscaled to ``routing_size`` with tiling
            (that pass also gives the prompt maps every tile takes its region from).
        routing_size: long side of the downscaled image the tiled routing is computed on.
        progress: show a progress bar (tiles, or the model's blocks for a whole image) once a restore
            has run for 2 seconds.
        check_memory_first: before a whole-image restore, raise :class:`NotEnoughMemoryError` (with a
            tile size that fits) when the estimated activation memory exceeds the device's free memory.

    A float image in 0-255 is divided by 255 with a warning; other values outside [0, 1] are an error.

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
            if check_memory_first:
                check_memory(model, padded)
            watcher = _BlockProgress(model) if progress else None
            try:
                out, aux = model(padded, routing=routing, return_aux=True)
            finally:
                if watcher is not None:
                    watcher.close()
            routing = aux["routing"]
        else:
            prompts = _whole_image_prompts(model, x, routing_size, routing)
            routing = prompts.routing
            out = _tiled(model, padded, tile, overlap, prompts, progress=progress)
    finally:
        model.train(was_training)
    out = out[..., :h, :w]
    return (out[0] if squeeze else out), routing


def dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """Transform ``code`` in 0..7 of the last two dims: ``code % 4`` quarter turns, then a horizontal flip
    when ``code >= 4``."""
    y = torch.rot90(x, code % 4, dims=(-2, -1))
    return y.flip(-1) if code >= 4 else y


def undo_dihedral(y: torch.Tensor, code: int) -> torch.Tensor:
    """The inverse of :func:`dihedral`."""
    if code >= 4:
        y = y.flip(-1)
    return torch.rot90(y, -(code % 4), dims=(-2, -1))


@torch.no_grad()
def restore_tta(model, image: torch.Tensor, **kwargs):
    """Test-time augmentation: the mean of the restorations of the 8 flips/rotations of ``image`` (each
    transformed back). The routing of the untransformed image is forced on the other seven, so all eight
    restore the same degradation. ``kwargs`` as :func:`restore`; returns ``(image, routing)``."""
    image = _check_image(model, image)
    out, routing = restore(model, image, **kwargs)
    kwargs = {**kwargs, "routing": routing, "check_memory_first": False}
    total = out.float().clone()
    for code in range(1, 8):
        piece, _ = restore(model, dihedral(image, code), **kwargs)
        total += undo_dihedral(piece.float(), code)
    return (total / 8).to(out.dtype), routing


def _tiled(model, x: torch.Tensor, tile: int, overlap: int, prompts: _WholeImagePrompts, *,
           progress: bool = False) -> torch.Tensor:
    b, _, h, w = x.shape
    out = x.new_zeros(b, model.config.out_channels, h, w)
    weight = x.new_zeros(1, 1, h, w)
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    bar = _progress_bar(len(rows) * len(cols), "restore", "tile") if progress else None
    try:
        _run_tiles(model, x, tile, overlap, prompts, rows, cols, out, weight, bar)
    finally:
        if bar is not None:
            bar.close()
    return out / weight


def _run_tiles(model, x, tile, overlap, prompts, rows, cols, out, weight, bar) -> None:
    h, w = x.shape[-2:]
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
            if bar is not None:
                bar.update(1)


__all__ = ["BYTES_PER_PIXEL_CHANNEL", "NotEnoughMemoryError", "blend_window", "check_memory", "check_value_range",
           "dihedral", "estimate_restore_bytes", "free_memory", "restore", "restore_tta", "tile_starts", "undo_dihedral"]
