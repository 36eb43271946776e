"""Cross-rank contrastive keys: two gloo processes must equal one process on the global batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _supcon_rank(rank: int, world: int, port: int, z: torch.Tensor, labels: torch.Tensor,
                 sizes: list[int], reduction: str, queue) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import cplfast

        start = sum(sizes[:rank])
        local = z[start : start + sizes[rank]].clone().requires_grad_()
        loss = cplfast.functional.supcon(local, labels[start : start + sizes[rank]], reduction=reduction, gather=True)
        loss.backward()
        queue.put((rank, loss.item(), local.grad.tolist()))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(z, labels, sizes, reduction):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_supcon_rank, args=(r, 2, port, z, labels, sizes, reduction, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("sizes", [[6, 6], [4, 9]])
def test_supcon_gather_equals_global_batch(sizes):
    import cplfast

    n = sum(sizes)
    z = torch.randn(n, 7, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,))
    results = _run_two_ranks(z, labels, sizes, "sum")

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
