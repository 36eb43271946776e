"""Figures drawn with Pillow (matplotlib is not a dependency): a before/after grid and a routing heat-map."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .data.io import tensor_to_uint8

# A few anchor colours of the viridis colour map, interpolated linearly.
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137], [53, 183, 121],
     [110, 206, 88], [181, 222, 43], [253, 231, 37]], dtype=np.float64,
)
_BG = (255, 255, 255)
_FG = (20, 20, 20)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0,1] -> uint8 RGB through viridis."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_VIRIDIS) - 1)
    frac = (v - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[hi] * frac).round().astype(np.uint8)


def _save(image, path: str | os.PathLike) -> Path:
    from .checkpoint import atomic_write_bytes
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def before_after_grid(
    examples: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    captions: Mapping[str, str] | None = None,
    scale: int = 2,
    per_task: int = 1,
) -> Path:
    """One row per task: degraded | restored | clean (``per_task`` examples side by side).

    ``examples[task]`` holds ``input``, ``output``, ``target`` stacks ``(n,3,H,W)``; ``captions[task]``
    is printed under the task name (e.g. the PSNR before and after).
    """
    from PIL import Image, ImageDraw

    if not examples:
        raise ValueError("examples must not be empty")
    tasks = list(examples)
    h, w = next(iter(examples.values()))["input"].shape[-2:]
    th, tw = h * scale, w * scale
    label_w, head_h, gap = 150, 28, 4
    cols = 3 * per_task
    width = label_w + cols * (tw + gap)
    height = head_h + len(tasks) * (th + gap)
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(16), _font(12)
    for c, title in enumerate(["degraded", "restored", "clean"] * per_task):
        draw.text((label_w + c * (tw + gap) + 4, 6), title, fill=_FG, font=font)
    for r, task in enumerate(tasks):
        top = head_h + r * (th + gap)
        draw.text((6, top + 6), task, fill=_FG, font=font)
        if captions and task in captions:
            for k, line in enumerate(str(captions[task]).split("\n")):
                draw.text((6, top + 30 + 16 * k), line, fill=_FG, font=small)
        ex = examples[task]
        for e in range(min(per_task, ex["input"].shape[0])):
            for j, key in enumerate(("input", "output", "target")):
                tile = Image.fromarray(tensor_to_uint8(ex[key][e])).resize((tw, th), Image.Resampling.NEAREST)
                canvas.paste(tile, (label_w + (3 * e + j) * (tw + gap), top))
    return _save(canvas, path)


def routing_heatmap(
    routing: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    cell: int = 44,
    title: str = "mean routing weight per degradation (rows) and prompt (columns)",
) -> Path:
    """Heat-maps of per-task routing statistics, one panel per prompt module.

    ``routing[task][key]`` is a vector ``(N,)`` for the images of ``task`` at prompt module ``key``
    (e.g. ``prompt1..3``): the mean routing weights, or the share of images selecting each prompt.
    Each cell is annotated with its value.
    """
    from PIL import Image, ImageDraw

    tasks = [t for t in routing if routing[t]]
    if not tasks:
        raise ValueError("routing must hold at least one task with routing weights")
    keys = list(routing[tasks[0]])
    sizes = [int(routing[tasks[0]][k].numel()) for k in keys]
    label_w, head_h, panel_gap, bar_h = 110, 64, 24, 16
    panels_w = sum(n * cell for n in sizes) + panel_gap * (len(keys) - 1)
    width = label_w + panels_w + 48
    height = head_h + len(tasks) * cell + 40 + bar_h
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    draw.text((6, 6), title, fill=_FG, font=font)
    vmax = max(float(routing[t][k].max()) for t in tasks for k in keys) or 1.0
    left = label_w
    for key, n in zip(keys, sizes):
        draw.text((left, 28), key, fill=_FG, font=font)
        for j in range(n):
            draw.text((left + j * cell + cell // 2 - 4, head_h - 16), str(j), fill=_FG, font=small)
        for i, task in enumerate(tasks):
            values = routing[task][key].detach().float().cpu().numpy()
            colours = colormap(values / vmax)
            for j in range(n):
                x0, y0 = left + j * cell, head_h + i * cell
                draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=tuple(int(c) for c in colours[j]))
                text_colour = (255, 255, 255) if values[j] / vmax < 0.6 else _FG
                draw.text((x0 + 5, y0 + cell // 2 - 7), f"{values[j]:.2f}", fill=text_colour, font=small)
        left += n * cell + panel_gap
    for i, task in enumerate(tasks):
        draw.text((6, head_h + i * cell + cell // 2 - 8), task, fill=_FG, font=font)
    # colour bar
    y0 = head_h + len(tasks) * cell + 14
    bar = colormap(np.linspace(0, 1, panels_w))[None].repeat(bar_h, 0)
    canvas.paste(Image.fromarray(bar), (label_w, y0))
    draw.text((label_w - 16, y0 + 1), "0", fill=_FG, font=small)
    draw.text((label_w + panels_w + 4, y0 + 1), f"{vmax:.2f}", fill=_FG, font=small)
    return _save(canvas, path)


__all__ = ["before_after_grid", "colormap", "routing_heatmap"]
