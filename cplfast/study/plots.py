"""The study's figures, drawn with Pillow: validation curves and per-task bars (linear axes).

Routing heat-maps reuse :func:`cplfast.figures.routing_heatmap`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

from ..figures import _font

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
WIDTH, HEIGHT = 1100, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 230, 50, 70


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


class _Axes:
    def __init__(self, draw: ImageDraw.ImageDraw, x_range, y_range):
        self.draw, self.x_range, self.y_range = draw, x_range, y_range
        self.box = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)

    def x(self, v: float) -> float:
        lo, hi = self.x_range
        return self.box[0] + (v - lo) / ((hi - lo) or 1.0) * (self.box[2] - self.box[0])

    def y(self, v: float) -> float:
        lo, hi = self.y_range
        return self.box[3] - (v - lo) / ((hi - lo) or 1.0) * (self.box[3] - self.box[1])

    def frame(self, title: str, xlabel: str, ylabel: str, x_ticks: bool = True) -> None:
        font, small = _font(15), _font(12)
        d = self.draw
        d.rectangle(self.box, outline=(0, 0, 0))
        for v in _nice_ticks(*self.y_range):
            yy = self.y(v)
            d.line([(self.box[0], yy), (self.box[2], yy)], fill=(228, 228, 228))
            d.text((self.box[0] - 8 - 7 * len(f"{v:g}"), yy - 7), f"{v:g}", fill=(0, 0, 0), font=small)
        if x_ticks:
            for v in _nice_ticks(*self.x_range):
                xx = self.x(v)
                d.line([(xx, self.box[3]), (xx, self.box[3] + 5)], fill=(0, 0, 0))
                d.text((xx - 3.5 * len(f"{v:g}"), self.box[3] + 8), f"{v:g}", fill=(0, 0, 0), font=small)
        d.text((LEFT, 14), title, fill=(0, 0, 0), font=font)
        d.text(((self.box[0] + self.box[2]) / 2 - 3.5 * len(xlabel), HEIGHT - 30), xlabel, fill=(0, 0, 0), font=small)
        d.text((8, TOP - 22), ylabel, fill=(0, 0, 0), font=small)

    def legend(self, names: Sequence[str]) -> None:
        small = _font(13)
        for i, name in enumerate(names):
            y = TOP + 8 + 22 * i
            x = WIDTH - RIGHT + 16
            self.draw.rectangle([x, y, x + 14, y + 14], fill=PALETTE[i % len(PALETTE)])
            self.draw.text((x + 22, y), name, fill=(0, 0, 0), font=small)


def curves_png(curves: Mapping[str, Sequence[tuple[float, float, float]]], path: str | os.PathLike, *,
               title: str = "validation PSNR (dB) against training step, mean over seeds (band: ± std)") -> Path:
    """One line per variant through ``(step, mean, std)`` points, with a ± std band."""
    names = [n for n in curves if curves[n]]
    if not names:
        raise ValueError("curves must hold at least one non-empty series")
    xs = [p[0] for n in names for p in curves[n]]
    lows = [p[1] - p[2] for n in names for p in curves[n]]
    highs = [p[1] + p[2] for n in names for p in curves[n]]
    pad = 0.05 * ((max(highs) - min(lows)) or 1.0)
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image, "RGBA")
    axes = _Axes(draw, (0.0, max(xs)), (min(lows) - pad, max(highs) + pad))
    axes.frame(title, "training step", "PSNR (dB)")
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        points = sorted(curves[name])
        band = [(axes.x(s), axes.y(m + sd)) for s, m, sd in points] + \
               [(axes.x(s), axes.y(m - sd)) for s, m, sd in reversed(points)]
        if len(points) > 1:
            draw.polygon(band, fill=(*colour, 40))
            draw.line([(axes.x(s), axes.y(m)) for s, m, _ in points], fill=colour, width=2)
        for s, m, _ in points:
            draw.ellipse([axes.x(s) - 3, axes.y(m) - 3, axes.x(s) + 3, axes.y(m) + 3], fill=colour)
    axes.legend(names)
    path = Path(path)
    image.save(path)
    return path


def grouped_bars_png(values: Mapping[str, Mapping[str, tuple[float, float]]], path: str | os.PathLike, *,
                     title: str, ylabel: str) -> Path:
    """Bars per group (x axis: ``values``' outer keys, e.g. tasks) and series (inner keys, e.g. variants);
    each ``(mean, std)`` drawn as a bar with a ± std whisker."""
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    if not groups or not series:
        raise ValueError("values must hold at least one group and series")
    lows = [min(0.0, m - sd) for g in groups for m, sd in values[g].values()]
    highs = [max(0.0, m + sd) for g in groups for m, sd in values[g].values()]
    pad = 0.05 * ((max(highs) - min(lows)) or 1.0)
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    axes = _Axes(draw, (0.0, float(len(groups))), (min(lows) - pad, max(highs) + pad))
    axes.frame(title, "", ylabel, x_ticks=False)
    small = _font(13)
    slot = (axes.box[2] - axes.box[0]) / len(groups)
    width = 0.8 * slot / len(series)
    zero = axes.y(0.0)
    draw.line([(axes.box[0], zero), (axes.box[2], zero)], fill=(0, 0, 0))
    for g, group in enumerate(groups):
        x0 = axes.box[0] + g * slot + 0.1 * slot
        draw.text((axes.box[0] + (g + 0.5) * slot - 3.5 * len(group), axes.box[3] + 10), group, fill=(0, 0, 0), font=small)
        for s, name in enumerate(series):
            if name not in values[group]:
                continue
            mean, std = values[group][name]
            left = x0 + s * width
            top, bottom = sorted((axes.y(mean), zero))
            draw.rectangle([left, top, left + width - 2, bottom], fill=PALETTE[s % len(PALETTE)])
            mid = left + width / 2 - 1
            draw.line([(mid, axes.y(mean - std)), (mid, axes.y(mean + std))], fill=(0, 0, 0), width=1)
    axes.legend(series)
    path = Path(path)
    image.save(path)
    return path


__all__ = ["curves_png", "grouped_bars_png"]
