"""``torch.distributed`` helpers: cross-rank keys for the contrastive losses (SupCon, CPR batch negatives)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` evaluated on rank 0 only, its result broadcast to every rank.

    If it raises on rank 0, every rank raises that exception, so a check that only rank 0 can make
    (a file on node 0) fails everywhere at once instead of leaving the other ranks waiting in their next
    collective. Outside a process group this is just the call. The result must be picklable.
    """
    rank, world_size = world()
    if world_size == 1:
        return fn(*args, **kwargs)
    payload: list = [None]
    if rank == 0:
        try:
            payload = [(True, fn(*args, **kwargs))]
        except Exception as err:  # re-raised below, on every rank
            payload = [(False, err)]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if not ok:
        raise value
    return value


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


_MAX_DIMS = 8  # rank of the tensors gather_rows accepts; fixes the length of the shape header


def _all_shapes(x: torch.Tensor, world_size: int) -> list[tuple[int, ...]]:
    """Every rank's ``x.shape`` (one collective of a fixed-length header, so ranks may disagree)."""
    header = torch.full((1 + _MAX_DIMS,), -1, device=x.device, dtype=torch.long)
    header[0] = x.dim()
    header[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.long)
    headers = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(headers, header)
    return [tuple(int(v) for v in h[1 : 1 + int(h[0])].tolist()) for h in headers]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``x (n_r, *rest)`` concatenated in rank order ``(sum_r n_r, *rest)``, and
    this rank's row offset in it.

    Ranks may hold different numbers of rows but must agree on ``rest`` (a ``ValueError`` on every rank
    otherwise). Gradients through the result flow back to the rank that owns the rows, summed over ranks:
    the local gradient is ``d(sum_r loss_r) / d x``, so every rank must run backward. Outside an
    initialised process group this returns ``(x, 0)``.
    """
    rank, world_size = world()
    if world_size == 1:
        return x, 0
    if not 1 <= x.dim() <= _MAX_DIMS:
        raise ValueError(f"x must have 1 to {_MAX_DIMS} dimensions, got shape {tuple(x.shape)}")
    shapes = _all_shapes(x, world_size)
    if len({shape[1:] for shape in shapes}) != 1:
        raise ValueError(f"x must have the same shape apart from the first dimension on every rank, got "
                         f"{[list(shape) for shape in shapes]} (by rank)")
    sizes = [shape[0] for shape in shapes]
    rows = _AllGatherRows.apply(x.reshape(x.shape[0], math.prod(x.shape[1:])), sizes, rank)
    return rows.reshape(sum(sizes), *x.shape[1:]), sum(sizes[:rank])


def gather_keys(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's ``z`` and ``labels`` concatenated in rank order, and this rank's row offset.

    Gradients through the gathered keys flow back to the rank that owns them (summed over ranks).
    Ranks may hold different numbers of rows. Outside a process group this returns the inputs.
    """
    keys, offset = gather_rows(z)
    key_labels, _ = gather_rows(labels)
    return keys, key_labels, offset
