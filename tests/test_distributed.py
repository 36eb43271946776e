"""Cross-rank contrastive keys: two gloo processes must equal one process on the global batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gloo import init_gloo, spawn_two_ranks  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _supcon_rank(rank: int, world: int, port: int, z: torch.Tensor, labels: torch.Tensor,
                 sizes: list[int], reduction: str, queue) -> None:
    import torch.distributed as dist

    init_gloo(rank, world, port)
    try:
        import cplfast

        start = sum(sizes[:rank])
        local = z[start : start + sizes[rank]].clone().requires_grad_()
        loss = cplfast.functional.supcon(local, labels[start : start + sizes[rank]], reduction=reduction, gather=True)
        loss.backward()
        queue.put((rank, loss.item(), local.grad.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[6, 6], [4, 9]])
def test_supcon_gather_equals_global_batch(sizes):
    import cplfast

    n = sum(sizes)
    z = torch.randn(n, 7, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,))
    results = spawn_two_ranks(_supcon_rank, z, labels, sizes, "sum")

    z_global = z.clone().requires_grad_()
    expected = cplfast.functional.supcon(z_global, labels, reduction="sum")
    expected.backward()

    total = sum(loss for _, loss, _ in results)
    grads = torch.tensor([row for _, _, g in results for row in g], dtype=torch.float64)
    assert total == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grads, z_global.grad, rtol=1e-10, atol=1e-12)


def test_supcon_gather_without_process_group_is_local():
    import cplfast

    z = torch.randn(9, 4, dtype=torch.float64)
    labels = torch.randint(0, 2, (9,))
    torch.testing.assert_close(
        cplfast.functional.supcon(z, labels, gather=True), cplfast.functional.supcon(z, labels, gather=False)
    )


def _gather_rows_rank(rank: int, world: int, port: int, x: torch.Tensor, sizes: list[int],
                      weights: torch.Tensor, queue) -> None:
    import torch.distributed as dist

    init_gloo(rank, world, port)
    try:
        from cplfast.distributed import gather_rows

        start = sum(sizes[:rank])
        local = x[start : start + sizes[rank]].clone().requires_grad_()
        rows, offset = gather_rows(local)
        (rows * weights).sum().backward()
        try:  # ranks disagreeing on the trailing shape: every rank raises
            gather_rows(torch.zeros(2, 3 + rank))
            mismatch = ""
        except ValueError as error:
            mismatch = str(error)
        queue.put((rank, rows.detach().numpy(), offset, local.grad.numpy(), mismatch))
    finally:
        dist.destroy_process_group()


def test_gather_rows_unequal_counts_and_gradient_to_owners():
    sizes = [3, 5]
    x = torch.randn(sum(sizes), 4, 2, dtype=torch.float64)
    weights = torch.randn_like(x)
    results = spawn_two_ranks(_gather_rows_rank, x, sizes, weights)
    for rank, rows, offset, grad, mismatch in results:
        start = sum(sizes[:rank])
        torch.testing.assert_close(torch.from_numpy(rows), x, rtol=0, atol=0)
        assert offset == start
        # d(sum over both ranks of <rows, weights>) / d(our rows) = 2 * our slice of weights
        torch.testing.assert_close(torch.from_numpy(grad), 2 * weights[start : start + sizes[rank]])
        assert "same shape apart from the first dimension" in mismatch


def _cpr_rank(rank: int, world: int, port: int, output: torch.Tensor, target: torch.Tensor,
              negatives: torch.Tensor, queue) -> None:
    import torch.distributed as dist

    init_gloo(rank, world, port)
    try:
        import cplfast

        b = output.shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        out = output[rows].clone().requires_grad_()
        neg = negatives[:, rows].clone().requires_grad_()
        loss_fn = cplfast.ContrastivePromptLoss(temperature=0.2, batch_negatives=True, gather=True)
        loss = loss_fn(out, target[rows], neg)
        loss.backward()
        queue.put((rank, loss.item(), out.grad.numpy(), neg.grad.numpy()))
    finally:
        dist.destroy_process_group()


def test_cpr_batch_negatives_gathered_equal_global_batch():
    import cplfast

    b, k = 2, 2
    target = torch.rand(2 * b, 3, 9, 7, dtype=torch.float64)
    output = target + 0.2 * torch.randn_like(target)
    negatives = target + 0.4 * torch.randn(k, *target.shape, dtype=torch.float64)
    results = spawn_two_ranks(_cpr_rank, output, target, negatives)

    out_global, neg_global = output.clone().requires_grad_(), negatives.clone().requires_grad_()
    expected = cplfast.ContrastivePromptLoss(temperature=0.2, batch_negatives=True)(out_global, target, neg_global)
    expected.backward()

    # each rank averages its own locations, so the ranks' sum is world_size x the global mean; the
    # gradients are those of that sum (all-reduced through the gathered keys)
    assert sum(loss for _, loss, _, _ in results) == pytest.approx(2 * expected.item(), rel=1e-12)
    out_grad = torch.cat([torch.from_numpy(g) for _, _, g, _ in results])
    neg_grad = torch.cat([torch.from_numpy(g) for _, _, _, g in results], dim=1)
    torch.testing.assert_close(out_grad, 2 * out_global.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(neg_grad, 2 * neg_global.grad, rtol=1e-10, atol=1e-13)
    # the keys from the other rank matter: rank-local batch negatives give a different loss
    local = cplfast.ContrastivePromptLoss(temperature=0.2, batch_negatives=True)
    local_sum = sum(local(output[r * b : (r + 1) * b], target[r * b : (r + 1) * b], negatives[:, r * b : (r + 1) * b])
                    for r in range(2))
    assert abs(local_sum.item() - 2 * expected.item()) > 1e-6
