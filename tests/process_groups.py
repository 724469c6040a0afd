"""Real gloo process groups on this machine for the tests of sharded (FSDP2) code."""

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
        # Every rank's collectives are finished before any rank tears its group down: a rank
        # that exits while gloo still holds another's pending work aborts (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in one gloo group
    (CPU, loopback); raises if any rank fails. ``fn`` must be a module-level function."""
    mp.spawn(_rank_main, args=(fn, world, _free_port(), args), nprocs=world)
