"""``torch.distributed`` helpers: cross-rank keys for the contrastive losses."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's ``(n_r, D)`` rows; backward sums the gradient over ranks, keeps ours.

    ``sizes`` are the row counts of every rank; rows are padded to the largest for the collective.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        rows = max(sizes)
        padded = torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss may depend on our rows: d(sum_r loss_r)/d x_local = all-reduced slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_keys(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's ``z`` and ``labels`` concatenated in rank order, and this rank's row offset.

    Gradients through the gathered keys flow back to the rank that owns them (summed over ranks).
    Ranks may hold different numbers of rows. Outside a process group this returns the inputs.
    """
    rank, world_size = world()
    if world_size == 1:
        return z, labels, 0
    count = torch.tensor([z.shape[0]], device=z.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    keys = _AllGatherRows.apply(z, sizes, rank)
    labels_pad = torch.nn.functional.pad(labels, (0, max(sizes) - labels.shape[0])).contiguous()
    label_parts = [torch.empty_like(labels_pad) for _ in range(world_size)]
    dist.all_gather(label_parts, labels_pad)
    key_labels = torch.cat([part[:n] for part, n in zip(label_parts, sizes)])
    return keys, key_labels, sum(sizes[:rank])
