"""One PNG per op, drawn with Pillow (a project dependency): bars for the SPEC shapes, lines for the sweep.

Left panel: median time per provider for every training case (forward+backward) and inference case
(forward), log scale. Right panel (when the op has a sweep): median forward+backward time against the
swept size, log-log. Failed providers are marked with an ``x`` at the axis.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "eager": (220, 90, 60),
    "compile": (70, 130, 200),
    "cplfast": (40, 160, 90),
    "sdpa": (150, 100, 190),
}
FALLBACK_COLORS = [(200, 160, 40), (120, 120, 120), (200, 80, 160)]
WIDTH, HEIGHT = 1400, 560
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 80, 20, 60, 120


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()


def _color(provider: str, order: list[str]):
    if provider in COLORS:
        return COLORS[provider]
    extras = [p for p in order if p not in COLORS]
    return FALLBACK_COLORS[extras.index(provider) % len(FALLBACK_COLORS)]


def _log_range(values: list[float]) -> tuple[float, float]:
    lo = math.floor(math.log10(min(values)))
    hi = math.ceil(math.log10(max(values)))
    return float(lo), float(max(hi, lo + 1))


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill=(0, 0, 0), anchor="la") -> None:
    try:
        draw.text(xy, text, font=font, fill=fill, anchor=anchor)
    except ValueError:  # bitmap fonts do not support anchors
        draw.text(xy, text, font=font, fill=fill)


class _Panel:
    """A rectangle of the image with a log10 y axis (and optionally a log10 x axis)."""

    def __init__(self, draw, box, y_range, x_range=None):
        self.draw, self.box, self.y_range, self.x_range = draw, box, y_range, x_range

    def y(self, value: float) -> float:
        x0, y0, x1, y1 = self.box
        lo, hi = self.y_range
        return y1 - (math.log10(value) - lo) / (hi - lo) * (y1 - y0)

    def x(self, value: float) -> float:
        x0, _, x1, _ = self.box
        lo, hi = self.x_range
        return x0 + (math.log10(value) - lo) / (hi - lo) * (x1 - x0)

    def frame(self, font, ylabel: str) -> None:
        x0, y0, x1, y1 = self.box
        self.draw.rectangle(self.box, outline=(0, 0, 0))
        lo, hi = self.y_range
        for power in range(int(lo), int(hi) + 1):
            yy = self.y(10.0 ** power)
            self.draw.line([(x0, yy), (x1, yy)], fill=(225, 225, 225))
            _text(self.draw, (x0 - 6, yy), f"{10.0 ** power:g}", font, anchor="rm")
        _text(self.draw, (x0, y0 - 8), ylabel, font, anchor="ld")


def _legend(draw, providers, order, font, x, y) -> None:
    for provider in providers:
        draw.rectangle([x, y, x + 14, y + 14], fill=_color(provider, order))
        _text(draw, (x + 20, y + 7), provider, font, anchor="lm")
        x += 30 + int(draw.textlength(provider, font=font))


def draw_op_png(path: Path, op: str, bars: list[tuple[str, dict]], lines: dict[str, list[tuple[float, float | None]]],
                sweep_label: str, subtitle: str = "") -> None:
    """``bars``: ``[(label, {provider: ms or None})]``; ``lines``: ``{provider: [(x, ms or None)]}``."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    big, small = _font(18), _font(12)
    _text(draw, (MARGIN_L, 12), f"{op}: median time (ms, log scale)", big)
    if subtitle:
        _text(draw, (MARGIN_L, 36), subtitle, small, fill=(90, 90, 90))
    order: list[str] = []
    for _, values in bars:
        order += [p for p in values if p not in order]
    order += [p for p in lines if p not in order]
    _legend(draw, order, order, small, WIDTH - 420, 14)

    has_lines = any(y is not None for pts in lines.values() for _, y in pts)
    split = int(WIDTH * 0.6) if has_lines else WIDTH - MARGIN_R
    bar_values = [v for _, vals in bars for v in vals.values() if v]
    if bars and bar_values:
        panel = _Panel(draw, (MARGIN_L, MARGIN_T + 10, split - 20, HEIGHT - MARGIN_B), _log_range(bar_values))
        panel.frame(small, "ms")
        x0, _, x1, y1 = panel.box
        slot = (x1 - x0) / len(bars)
        width = slot * 0.8 / max(1, len(order))
        floor = 10.0 ** panel.y_range[0]
        for i, (label, values) in enumerate(bars):
            left = x0 + i * slot + slot * 0.1
            for j, provider in enumerate(order):
                if provider not in values:
                    continue
                bx = left + j * width
                value = values[provider]
                if value:
                    draw.rectangle([bx, panel.y(max(value, floor)), bx + width - 2, y1], fill=_color(provider, order))
                else:
                    _text(draw, (bx + width / 2, y1 - 8), "x", small, fill=(200, 0, 0), anchor="mm")
            _text(draw, (x0 + (i + 0.5) * slot, y1 + 8), label[:28], small, anchor="ma")
    if has_lines:
        xs = [x for pts in lines.values() for x, y in pts if y]
        ys = [y for pts in lines.values() for _, y in pts if y]
        x_lo, x_hi = math.log10(min(xs)), math.log10(max(xs))
        pad = max(0.1, (x_hi - x_lo) * 0.05)
        panel = _Panel(draw, (split + 60, MARGIN_T + 10, WIDTH - MARGIN_R, HEIGHT - MARGIN_B), _log_range(ys),
                       (x_lo - pad, x_hi + pad))
        panel.frame(small, "ms (forward+backward)")
        _, _, _, y1 = panel.box
        for x in sorted(set(xs)):
            _text(draw, (panel.x(x), y1 + 8), f"{x:g}", small, anchor="ma")
        _text(draw, ((panel.box[0] + panel.box[2]) / 2, y1 + 30), sweep_label[:70], small, anchor="ma")
        for provider, pts in lines.items():
            color = _color(provider, order)
            good = [(panel.x(x), panel.y(y)) for x, y in sorted(pts) if y]
            if len(good) > 1:
                draw.line(good, fill=color, width=3)
            for px, py in good:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
    image.save(path)


def plot_document(doc: dict, out_dir: Path) -> list[Path]:
    """Write ``<op>.png`` for every op of ``doc``; returns the paths written."""
    written = []
    medians = {(r["op"], r["mode"], r["shape"], r["provider"]): r["median_ms"] for r in doc["results"]}
    providers: dict[str, list[str]] = {}
    for r in doc["results"]:
        providers.setdefault(r["op"], [])
        if r["provider"] not in providers[r["op"]]:
            providers[r["op"]].append(r["provider"])
    for op, names in providers.items():
        cases = [c for c in doc.get("cases", []) if c["op"] == op]
        bars, lines, label = [], {p: [] for p in names}, ""
        for case in cases:
            if case["group"] in ("train", "infer"):
                mode = "forward" if case["group"] == "infer" else ("forward+backward" if "forward+backward" in
                                                                    case["modes"] else case["modes"][0])
                values = {p: medians.get((op, mode, case["shape"], p)) for p in names
                          if (op, mode, case["shape"], p) in medians}
                tag = "infer" if case["group"] == "infer" else ("fwd+bwd" if mode == "forward+backward" else mode)
                if values:
                    bars.append((f'{case["name"]} {tag}', values))
            if case.get("sweep_value") is not None:
                label = case.get("sweep_label") or ""
                for p in names:
                    key = (op, "forward+backward", case["shape"], p)
                    if key in medians:
                        lines[p].append((float(case["sweep_value"]), medians[key]))
        if not bars and not any(lines.values()):
            continue
        path = Path(out_dir) / f"{op}.png"
        subtitle = f'{doc["device"]} · torch {doc["torch"]} · {doc.get("conditions", {}).get("dtype", "")}'
        draw_op_png(path, op, bars, {p: pts for p, pts in lines.items() if pts}, label, subtitle)
        written.append(path)
    return written
