"""Helpers for the tests that run gloo process groups in processes spawned on this machine."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group of ``world`` local processes rendezvousing on ``port`` (in a spawned worker)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn_two_ranks(worker, *args, timeout: float = 120) -> list:
    """Run ``worker(rank, 2, port, *args, queue)`` in two spawned processes; their queued results by rank.

    Each worker puts one tuple whose first item is its rank.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=timeout) for _ in procs), key=lambda result: result[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
