"""Routing health: does each degradation pick its own prompt, or has the router collapsed?

CPL's top-1 router tends to collapse in training (every degradation selects the same prompt), in the
official code as in cplfast. These functions measure it from *which prompt each image chose* (the
largest routing weight; for top-k > 1 the first of the kept ones), grouped by the image's task:

* ``distribution[t][n]``: share of task t's images that chose prompt n (rows sum to 1);
* ``entropy_bits``: H(prompt), the entropy of the chosen prompt over all images, in bits
  (0: one prompt for everything);
* ``conditional_entropy_bits``: H(prompt | task), how undecided the router is within a task;
* ``mutual_information_bits``: I(task; prompt) = H(prompt) − H(prompt | task), with the tasks weighted
  by their image counts. **0 bits = collapsed** (the choice says nothing about the task);
  ``log2(T)`` bits (log2 5 ≈ 2.32 for five equally frequent tasks and N ≥ 5 prompts) = perfectly
  task-specific (each task its own prompt). ``normalized_mi`` divides by ``min(H(task), log2 N)``, the
  largest value reachable, giving 0..1.

All entropies use log base 2 with 0·log 0 = 0.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch


def chosen_prompt(routing: torch.Tensor) -> torch.Tensor:
    """The prompt each image chose: ``argmax`` of ``routing (B,N)``, lower index first on ties ``(B,)``."""
    if not isinstance(routing, torch.Tensor) or routing.dim() != 2 or routing.shape[1] == 0:
        raise ValueError(f"routing must be a (B, N) tensor, got {getattr(routing, 'shape', type(routing).__name__)}")
    return torch.sort(routing.detach(), dim=1, descending=True, stable=True).indices[:, 0]


def routing_counts(tasks: torch.Tensor, routing: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Counts ``(T, N)`` (float64) of images of task t (``tasks (B,)`` ints) that chose prompt n."""
    choice = chosen_prompt(routing)
    if not isinstance(tasks, torch.Tensor) or tasks.shape != choice.shape:
        raise ValueError(f"tasks must be a ({choice.shape[0]},) tensor of task indices")
    tasks = tasks.to(choice.device, torch.long)
    if tasks.numel() and (int(tasks.min()) < 0 or int(tasks.max()) >= num_tasks):
        raise ValueError(f"tasks must be indices in [0, {num_tasks - 1}]")
    counts = torch.zeros(num_tasks * routing.shape[1], dtype=torch.float64, device=choice.device)
    counts.index_add_(0, tasks * routing.shape[1] + choice, torch.ones_like(choice, dtype=torch.float64))
    return counts.view(num_tasks, routing.shape[1])


def _entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum()) + 0.0 if p.numel() else 0.0


def routing_health(counts: torch.Tensor | Sequence[Sequence[float]], tasks: Sequence[str] | None = None) -> dict:
    """Health of one router from its counts ``(T, N)`` (:func:`routing_counts`, or per-task shares).

    Returns a JSON-friendly dict: ``distribution`` (``{task: [N shares]}``, tasks without images
    left out), ``entropy_bits``, ``conditional_entropy_bits``, ``mutual_information_bits``,
    ``max_mutual_information_bits`` (``min(H(task), log2 N)``), ``normalized_mi`` (0..1) and
    ``images``. Rows are weighted by their counts; pass shares times image counts to weigh tasks.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
    if counts.dim() != 2 or counts.shape[1] == 0:
        raise ValueError(f"counts must be a (T, N) table, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("counts must be finite and >= 0")
    names = list(tasks) if tasks is not None else [str(t) for t in range(counts.shape[0])]
    if len(names) != counts.shape[0]:
        raise ValueError(f"tasks names {len(names)} rows, counts has {counts.shape[0]}")
    total = float(counts.sum())
    if total == 0:
        return {"distribution": {}, "entropy_bits": 0.0, "conditional_entropy_bits": 0.0,
                "mutual_information_bits": 0.0, "max_mutual_information_bits": 0.0, "normalized_mi": 0.0, "images": 0}
    rows = counts.sum(dim=1)
    task_p = rows / total
    h_prompt = _entropy_bits(counts.sum(dim=0) / total)
    h_cond = sum(float(task_p[t]) * _entropy_bits(counts[t] / rows[t]) for t in range(counts.shape[0]) if rows[t] > 0)
    mi = max(0.0, h_prompt - h_cond)
    reachable = min(_entropy_bits(task_p), math.log2(counts.shape[1]))
    distribution = {names[t]: [round(float(v), 5) for v in counts[t] / rows[t]]
                    for t in range(counts.shape[0]) if rows[t] > 0}
    return {
        "distribution": distribution,
        "entropy_bits": round(h_prompt, 5),
        "conditional_entropy_bits": round(h_cond, 5),
        "mutual_information_bits": round(mi, 5),
        "max_mutual_information_bits": round(reachable, 5),
        "normalized_mi": round(mi / reachable, 5) if reachable > 0 else 0.0,
        "images": int(round(total)),
    }


def format_routing_health(health: Mapping[str, Mapping], *, digits: int = 2) -> str:
    """A small text table: one row per router key with H(prompt), H(prompt|task), I(task; prompt)."""
    lines = ["routing health (bits; I(task; prompt) = 0: collapsed, max: task-specific)",
             f"{'router':<12} {'H(prompt)':>10} {'H(p|task)':>10} {'I(task;p)':>10} {'max':>6}  per-task choice"]
    for key, h in health.items():
        chosen = ", ".join(f"{task}->{max(range(len(d)), key=d.__getitem__)}" for task, d in h["distribution"].items())
        lines.append(f"{key:<12} {h['entropy_bits']:>10.{digits}f} {h['conditional_entropy_bits']:>10.{digits}f} "
                     f"{h['mutual_information_bits']:>10.{digits}f} {h['max_mutual_information_bits']:>6.{digits}f}  {chosen}")
    return "\n".join(lines)


__all__ = ["chosen_prompt", "format_routing_health", "routing_counts", "routing_health"]
