"""Inference on images of any size: whole, exactly streamed in chunks, or in blended tiles (SPEC §5).

Whole image: reflect-pad the bottom/right to a multiple of 8, run, crop back.

Exact chunks (``tile=N`` or ``max_memory=...``, ``tile_mode="exact"``, the default): the whole-image
forward computed block by block over row bands by :func:`cplfast.models.streaming.stream_forward`; the
result equals the whole-image restore up to float rounding, in bounded memory. ``tile=N`` gives bands
of about ``N x N`` pixels (full width, ``max(8, N²/W)`` rows rounded down to a multiple of 8);
``max_memory`` picks the largest band whose estimated peak (weights + activations) fits, or restores
the whole image at once when that fits.

Blended tiles (``tile_mode="blend"``, approximate): the routing (which prompt / degradation the model picks) is computed once, on the whole image
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
what the device has free; if it does not fit, :class:`NotEnoughMemoryError` names a memory budget and a
chunk size that do. A ``max_memory`` too small for even 8-row chunks is a :class:`NotEnoughMemoryError`
naming the smallest budget that works. ``stats={}`` is filled with the mode, the chunking, the
estimate and the measured peak (CUDA: ``torch.cuda.max_memory_allocated``; otherwise
:class:`cplfast.models.streaming.LiveTensorBytes`, the peak of live tensor bytes).

Progress: ``progress=True`` shows a tqdm bar (after 2 s) over the chunks of every sweep (exact), the tiles
(blend), or for a whole image over the model's top-level blocks as they run.
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


TILE_MODES = ("exact", "blend")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class NotEnoughMemoryError(MemoryError):
    """A restore that would not fit in the device's free memory or in ``max_memory`` (the message says
    what would)."""


def parse_memory(value) -> int:
    """Bytes from an int or a string such as ``"4GB"`` (10^9), ``"4GiB"`` / ``"4G"`` (2^30), ``"512MB"``."""
    if isinstance(value, bool):
        raise TypeError(f"max_memory must be a number of bytes or a string like '4GB', got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        import re

        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"max_memory must look like 4GB, 4GiB, 512MB or a number of bytes, got {value!r}")
        number = float(match.group(1)) * _UNITS[unit]
    else:
        raise TypeError(f"max_memory must be a number of bytes or a string like '4GB', got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(number)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


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
    budget = int(free * 0.9)
    gib = 2.0 ** 30
    hint = f"--max-memory {budget / gib:.2f}GiB (model.restore(image, max_memory={budget}))"
    from .streaming import chunk_rows_for_budget, estimate_streaming_bytes

    rows = chunk_rows_for_budget(model, b, h, w, budget, x.dtype)
    if rows is not None:
        tile = max(MULTIPLE, int(math.isqrt(rows * w)) // MULTIPLE * MULTIPLE)
        hint += f" or --tile {tile}"
    else:
        least = estimate_streaming_bytes(model, b, h, w, MULTIPLE, x.dtype)
        hint += f"; even the smallest chunks (--tile {MULTIPLE}) need about {least / gib:.2f} GiB"
    raise NotEnoughMemoryError(
        f"restoring the whole {w}x{h} image at once needs about {need / gib:.1f} GiB but {x.device} has "
        f"{free / gib:.1f} GiB free; restore it exactly in chunks instead: {hint}")


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


def tile_chunk_rows(tile: int, height: int, width: int) -> int:
    """Rows of an exact-mode band holding about ``tile x tile`` pixels of a ``height x width`` image
    (padded to 8): ``max(8, tile² // width)`` rounded down to a multiple of 8, at most the height."""
    h, w = -(-height // MULTIPLE) * MULTIPLE, -(-width // MULTIPLE) * MULTIPLE
    rows = max(MULTIPLE, tile * tile // w // MULTIPLE * MULTIPLE)
    return min(rows, h)


def _parameter_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _plan_budget(model, x: torch.Tensor, max_memory: int) -> int | None:
    """Chunk rows for ``max_memory`` bytes (weights + input + activations), None for the whole image."""
    from .streaming import chunk_rows_for_budget, estimate_streaming_bytes

    b, _, h, w = x.shape
    fixed = _parameter_bytes(model) + 2 * x.numel() * x.element_size()
    budget = max_memory - fixed
    if budget >= estimate_restore_bytes(model, b, h, w, x.dtype):
        return None
    rows = chunk_rows_for_budget(model, b, h, w, budget, x.dtype) if budget > 0 else None
    if rows is None:
        least = fixed + estimate_streaming_bytes(model, b, h, w, MULTIPLE, x.dtype)
        raise NotEnoughMemoryError(
            f"max_memory={format_bytes(max_memory)} is too small for a {w}x{h} image even in the smallest "
            f"exact chunks (8 rows): they need about {format_bytes(least)} (weights and input "
            f"{format_bytes(fixed)}); give at least --max-memory {math.ceil(least / 2**20)}MiB")
    return rows


class _PeakMemory:
    """Peak memory of what runs inside: CUDA allocator statistics, else live tensor bytes."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.peak, self.method = device, enabled, None, None

    def __enter__(self):
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            from .streaming import LiveTensorBytes

            self.tracker = LiveTensorBytes().__enter__()
            self.method = "live tensor bytes (TorchDispatchMode)"
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.tracker.__exit__(*exc)
            self.peak = self.tracker.peak
        return False


@torch.no_grad()
def restore(model, image: torch.Tensor, *, tile: int | None = None, overlap: int | None = None,
            routing: Mapping[str, torch.Tensor] | None = None, routing_size: int = 512,
            progress: bool = False, check_memory_first: bool = True, max_memory=None,
            tile_mode: str = "exact", stats: dict | None = None):
    """Restore ``image`` ``(3,H,W)`` or ``(B,3,H,W)`` of any size with ``model`` in eval mode, without grad.

    Args:
        tile: chunk size in pixels (a multiple of 8), or None. ``tile_mode="exact"``: bands of about
            ``tile x tile`` pixels (:func:`tile_chunk_rows`), the whole-image result in bounded memory.
            ``tile_mode="blend"``: independent ``tile x tile`` tiles blended over ``overlap`` pixels.
        overlap: pixels shared by neighbouring blended tiles (raised-cosine window; default 32); blend mode
            only (checked whenever given).
        routing: forced routing (``aux["routing"]`` of an earlier call); default: computed by the model —
            on the whole image (whole, exact), on the image downscaled to ``routing_size`` (blend;
            that pass also gives the prompt maps every tile takes its region from).
        routing_size: long side of the downscaled image the blended tiles' routing is computed on.
        progress: show a progress bar (chunks, tiles, or the model's blocks for a whole image) once a
            restore has run for 2 seconds.
        check_memory_first: before a whole-image restore without ``max_memory``, raise
            :class:`NotEnoughMemoryError` (naming a budget and chunk size that fit) when the estimated
            activation memory exceeds the device's free memory.
        max_memory: a memory budget (bytes, or a string like ``"4GB"``, ``"4GiB"``) for weights, input and
            activations: the whole image at once when its estimate fits, else exact chunks of the largest
            size that fits; :class:`NotEnoughMemoryError` when 8-row chunks do not. Not with ``tile``.
        tile_mode: ``"exact"`` (default) or ``"blend"`` (approximate; needs ``tile``).
        stats: a dict to fill with ``mode`` ("whole" / "exact" / "blend"), ``chunk_rows``, ``chunks``,
            ``estimated_bytes``, ``peak_bytes`` and ``peak_method`` (measuring costs a little time on
            the CPU).

    A float image in 0-255 is divided by 255 with a warning; other values outside [0, 1] are an error.

    Returns ``(restored image, same shape as image, routing dict)``.
    """
    image = _check_image(model, image)
    squeeze = image.dim() == 3
    x = image.unsqueeze(0) if squeeze else image
    if tile_mode not in TILE_MODES:
        raise ValueError(f"tile_mode must be one of {TILE_MODES}, got {tile_mode!r}")
    if tile is not None:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < MULTIPLE or tile % MULTIPLE:
            raise ValueError(f"tile must be None or a positive multiple of {MULTIPLE}, got {tile!r}")
        if overlap is None and tile_mode == "blend":
            overlap = 32
        if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int)
                                    or not 0 <= overlap < tile):
            raise ValueError(f"overlap must be an int in [0, tile={tile}), got {overlap!r}")
    elif tile_mode == "blend":
        raise ValueError("tile_mode='blend' needs a tile size (tile=N)")
    if max_memory is not None:
        max_memory = parse_memory(max_memory)
        if tile is not None:
            raise ValueError("give tile or max_memory, not both (max_memory picks the chunk size)")
    if isinstance(routing_size, bool) or not isinstance(routing_size, int) or routing_size < MULTIPLE:
        raise ValueError(f"routing_size must be an int >= {MULTIPLE}, got {routing_size!r}")
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)

    was_training = model.training
    model.eval()
    try:
        h, w = x.shape[-2:]
        padded = _pad_to_multiple(x)
        rows = None
        if tile is not None and tile_mode == "exact":
            rows = tile_chunk_rows(tile, h, w)
        elif max_memory is not None:
            rows = _plan_budget(model, padded, max_memory)
        mode = "blend" if tile is not None and tile_mode == "blend" else ("whole" if rows is None else "exact")
        meter = _PeakMemory(padded.device, stats is not None)
        if mode == "whole":
            if check_memory_first and max_memory is None:
                check_memory(model, padded)
            with meter:
                watcher = _BlockProgress(model) if progress else None
                try:
                    out, aux = model(padded, routing=routing, return_aux=True)
                finally:
                    if watcher is not None:
                        watcher.close()
            routing = aux["routing"]
        elif mode == "exact":
            with meter:
                out, routing = _exact(model, padded, rows, routing, progress)
        else:
            with meter:
                prompts = _whole_image_prompts(model, x, routing_size, routing)
                routing = prompts.routing
                out = _tiled(model, padded, tile, overlap, prompts, progress=progress)
    finally:
        model.train(was_training)
    if stats is not None:
        from .streaming import estimate_streaming_bytes

        b, _, ph, pw = padded.shape
        stats.clear()
        stats.update(mode=mode, chunk_rows=rows, chunks=None if rows is None else -(-ph // rows),
                     estimated_bytes=(estimate_streaming_bytes(model, b, ph, pw, rows, padded.dtype) if mode == "exact"
                                      else estimate_restore_bytes(model, b, ph, pw, padded.dtype) if mode == "whole"
                                      else None),
                     peak_bytes=meter.peak, peak_method=meter.method)
    out = out[..., :h, :w]
    return (out[0] if squeeze else out), routing


def _exact(model, x: torch.Tensor, rows: int, routing, progress: bool):
    from .streaming import count_sweeps, stream_forward

    bar = _progress_bar(count_sweeps(model) * -(-x.shape[2] // rows), "restore", "chunk") if progress else None
    try:
        return stream_forward(model, x, chunk_rows=rows, routing=routing, return_routing=True,
                              progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()


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
    stats = kwargs.get("stats")
    first = dict(stats) if stats is not None else None
    kwargs = {**kwargs, "routing": routing, "check_memory_first": False}
    total = out.float().clone()
    for code in range(1, 8):
        piece, _ = restore(model, dihedral(image, code), **kwargs)
        total += undo_dihedral(piece.float(), code)
        if first is not None and stats.get("peak_bytes") is not None:
            first["peak_bytes"] = max(first["peak_bytes"] or 0, stats["peak_bytes"])
    if first is not None:
        stats.clear()
        stats.update(first)  # the first restore's plan, the largest peak of the eight
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


__all__ = ["BYTES_PER_PIXEL_CHANNEL", "NotEnoughMemoryError", "TILE_MODES", "blend_window", "check_memory",
           "check_value_range", "dihedral", "estimate_restore_bytes", "format_bytes", "free_memory", "parse_memory",
           "restore", "restore_tta", "tile_chunk_rows", "tile_starts", "undo_dihedral"]
