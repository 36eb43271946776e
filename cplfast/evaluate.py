"""Per-task evaluation: PSNR / SSIM of the degraded input and of the restored output (SPEC §6).

``evaluate(model, dataset)`` restores every item with ``model.restore`` (any size, optional tiles),
clamps the output to [0,1], scores input and output against the target with :mod:`cplfast.metrics`
(RGB — PromptIR's protocol — or Y — CPL's), and averages per task. It also averages the routing
(which prompt each degradation selects) per task. Tables come out as markdown and CSV.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .checkpoint import atomic_write_bytes
from .metrics import psnr, ssim


@dataclass
class TaskScores:
    """Mean scores of one task over ``count`` images."""

    task: str
    count: int
    psnr_in: float
    psnr_out: float
    ssim_in: float
    ssim_out: float

    @property
    def psnr_gain(self) -> float:
        return self.psnr_out - self.psnr_in


@dataclass
class EvalResult:
    rows: list[TaskScores]
    channel: str
    crop_border: int
    # task -> routing key -> mean routing (N,) of the images of that task
    routing: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # task -> routing key -> share of the task's images whose largest routing weight is each prompt (N,)
    selection: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    examples: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> input/output/target
    interrupted: bool = False  # Ctrl-C stopped the evaluation: the rows cover the images scored before it

    def mean(self) -> TaskScores:
        n = len(self.rows)
        return TaskScores(
            "mean", sum(r.count for r in self.rows),
            *(sum(getattr(r, k) for r in self.rows) / n for k in ("psnr_in", "psnr_out", "ssim_in", "ssim_out")),
        )

    def routing_health(self) -> dict[str, dict]:
        """Per router key, :func:`cplfast.routing.routing_health` of the prompts the images chose.

        ``{}`` for a model without routing. Tasks weigh by their image counts.
        """
        from .routing import routing_health

        counts = {r.task: r.count for r in self.rows}
        keys = sorted({k for per_task in self.selection.values() for k in per_task})
        health = {}
        for key in keys:
            names = [t for t in self.selection if key in self.selection[t]]
            table = torch.stack([self.selection[t][key].double() * counts.get(t, 0) for t in names])
            health[key] = routing_health(table, names)
        return health

    def to_json(self) -> dict:
        """``{"<task>": {"psnr_in", "psnr_out", "ssim_in", "ssim_out"}}`` rounded to 4 decimals."""
        return {
            r.task: {k: round(getattr(r, k), 4) for k in ("psnr_in", "psnr_out", "ssim_in", "ssim_out")} for r in self.rows
        }


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 100.0  # identical images: cap PSNR like BasicSR does


def _batches(dataset: Dataset, batch_size: int):
    """Consecutive items of equal size grouped into batches (whole images of any size stay alone)."""
    group: list[dict] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if group and (item["input"].shape != group[0]["input"].shape or len(group) == batch_size):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str | None = None,
    channel: str = "rgb",
    crop_border: int = 0,
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 8,
    tasks: Sequence[str] | None = None,
    keep_examples: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Score ``model`` on every item of ``dataset`` and average per task (see the module docstring).

    ``keep_examples`` keeps the first that many (input, output, target) triples of each task for
    figures.
    """
    if channel not in ("rgb", "y"):
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    tasks = list(tasks if tasks is not None else getattr(dataset, "tasks", []))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    sums: dict[int, list[float]] = {}
    routing_sums: dict[int, dict[str, torch.Tensor]] = {}
    selection_sums: dict[int, dict[str, torch.Tensor]] = {}
    examples: dict[str, dict[str, list[torch.Tensor]]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), desc="eval", unit="img", dynamic_ncols=True)
    interrupted = False
    try:
        for group in _batches(dataset, batch_size):
            x = torch.stack([g["input"] for g in group]).to(device)
            y = torch.stack([g["target"] for g in group]).to(device)
            labels = [int(g["task"]) for g in group]
            out, routing = model.restore(x, tile=tile, overlap=overlap)
            out = out.float().clamp(0, 1)
            scores = [
                psnr(x, y, channel=channel, crop_border=crop_border), psnr(out, y, channel=channel, crop_border=crop_border),
                ssim(x, y, channel=channel, crop_border=crop_border), ssim(out, y, channel=channel, crop_border=crop_border),
            ]
            for i, t in enumerate(labels):
                acc = sums.setdefault(t, [0.0, 0.0, 0.0, 0.0, 0.0])
                acc[0] += 1
                for j in range(4):
                    acc[j + 1] += _finite(float(scores[j][i]))
                per_task = routing_sums.setdefault(t, {})
                chosen = selection_sums.setdefault(t, {})
                for key, value in (routing or {}).items():
                    row = value[i].detach().float().cpu()
                    per_task[key] = per_task.get(key, torch.zeros_like(row)) + row
                    chosen[key] = chosen.get(key, torch.zeros_like(row))
                    chosen[key][int(row.argmax())] += 1
                name = tasks[t] if t < len(tasks) else str(t)
                ex = examples.setdefault(name, {"input": [], "output": [], "target": []})
                if len(ex["input"]) < keep_examples:
                    ex["input"].append(x[i].cpu())
                    ex["output"].append(out[i].cpu())
                    ex["target"].append(y[i].cpu())
            if bar is not None:
                bar.update(len(group))
    except KeyboardInterrupt:
        if not sums:
            raise
        interrupted = True  # the images scored so far are still a result
    if bar is not None:
        bar.close()
    if not sums:
        raise ValueError("the evaluation dataset is empty")
    rows = []
    routing_means, selection = {}, {}
    for t in sorted(sums):
        n, p_in, p_out, s_in, s_out = sums[t]
        name = tasks[t] if t < len(tasks) else str(t)
        rows.append(TaskScores(name, int(n), p_in / n, p_out / n, s_in / n, s_out / n))
        routing_means[name] = {k: v / n for k, v in routing_sums[t].items()}
        selection[name] = {k: v / n for k, v in selection_sums[t].items()}
    kept = {k: {kk: torch.stack(vv) for kk, vv in v.items()} for k, v in examples.items() if v["input"]}
    return EvalResult(rows, channel, crop_border, routing_means, selection, kept, interrupted)


@torch.no_grad()
def routing_profile(model: torch.nn.Module, dataset: Dataset, *, per_task: int = 8, batch_size: int = 8,
                    device: torch.device | str | None = None) -> dict[str, dict[str, list[float]]]:
    """Mean routing per task over the first ``per_task · T`` items of an index-addressed training set.

    ``{task: {routing key: [N floats]}}`` — stored in a checkpoint's config so ``restore`` can name
    the degradation whose routing an image's routing is closest to.
    """
    tasks = list(getattr(dataset, "tasks", []))
    count = per_task * max(1, len(tasks))
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    result = evaluate(model, _ItemList(items, tasks), device=device, batch_size=batch_size)
    return {task: {k: [round(float(v), 5) for v in vec] for k, vec in keys.items()} for task, keys in result.routing.items()}


class _ItemList(Dataset):
    def __init__(self, items: list[dict], tasks: list[str]):
        self.items, self.tasks = items, tasks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def closest_task(routing: dict[str, torch.Tensor], profile: dict[str, dict[str, list[float]]], index: int = 0) -> tuple[str, float] | None:
    """The task whose mean routing (``profile``) is nearest (L1, summed over keys) to image ``index`` of ``routing``."""
    best = None
    for task, keys in profile.items():
        if set(keys) != set(routing):
            continue
        dist = sum(float((routing[k][index].detach().float().cpu() - torch.tensor(keys[k])).abs().sum()) for k in keys)
        if best is None or dist < best[1]:
            best = (task, dist)
    return best


# ------------------------------------------------------------------------------------------ tables
_HEADER = ("task", "images", "PSNR in", "PSNR out", "gain", "SSIM in", "SSIM out")


def _cells(r: TaskScores) -> list[str]:
    return [r.task, str(r.count), f"{r.psnr_in:.2f}", f"{r.psnr_out:.2f}", f"{r.psnr_gain:+.2f}", f"{r.ssim_in:.4f}",
            f"{r.ssim_out:.4f}"]


def format_table(result: EvalResult) -> str:
    """A fixed-width table for the terminal (with a mean row)."""
    rows = [list(_HEADER)] + [_cells(r) for r in result.rows] + [_cells(result.mean())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(result: EvalResult) -> str:
    title = f"PSNR (dB) / SSIM on {'RGB' if result.channel == 'rgb' else 'Y (BT.601)'}"
    if result.crop_border:
        title += f", {result.crop_border}-pixel border cropped"
    lines = [f"{title}", "", "| " + " | ".join(_HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * 6) + "|"]
    for r in result.rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    mean = _cells(result.mean())
    lines.append("| " + " | ".join(f"**{c}**" for c in mean) + " |")
    return "\n".join(lines) + "\n"


def csv_table(result: EvalResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["task", "images", "psnr_in", "psnr_out", "psnr_gain", "ssim_in", "ssim_out", "channel", "crop_border"])
    for r in result.rows + [result.mean()]:
        writer.writerow([r.task, r.count, f"{r.psnr_in:.4f}", f"{r.psnr_out:.4f}", f"{r.psnr_gain:.4f}",
                         f"{r.ssim_in:.6f}", f"{r.ssim_out:.6f}", result.channel, result.crop_border])
    return buf.getvalue()


def write_tables(result: EvalResult, folder: str | os.PathLike, stem: str = "results") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` into ``folder`` (atomically)."""
    folder = Path(folder)
    md = atomic_write_bytes(folder / f"{stem}.md", markdown_table(result).encode())
    cs = atomic_write_bytes(folder / f"{stem}.csv", csv_table(result).encode())
    return md, cs


__all__ = ["EvalResult", "TaskScores", "closest_task", "csv_table", "evaluate", "routing_profile", "format_table", "markdown_table", "write_tables"]
