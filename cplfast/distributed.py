"""``torch.distributed`` helpers: cross-rank keys for the contrastive losses."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_keys(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's ``z`` and ``labels`` concatenated in rank order, and this rank's row offset.

    Gradients through the gathered keys flow back to the rank that owns them (summed over ranks).
    Ranks may hold different numbers of rows. Outside a process group this returns the inputs.
    """
    rank, world_size = world()
    if world_size == 1:
        return z, labels, 0
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    count = torch.tensor([z.shape[0]], device=z.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    rows = max(sizes)
    z_pad = torch.nn.functional.pad(z, (0, 0, 0, rows - z.shape[0]))
    labels_pad = torch.nn.functional.pad(labels, (0, rows - labels.shape[0]))
    z_all = all_gather_with_grad(z_pad)
    label_all = [torch.empty_like(labels_pad) for _ in range(world_size)]
    dist.all_gather(label_all, labels_pad)
    keys = torch.cat([part[:n] for part, n in zip(z_all, sizes)])
    key_labels = torch.cat([part[:n] for part, n in zip(label_all, sizes)])
    return keys, key_labels, sum(sizes[:rank])
