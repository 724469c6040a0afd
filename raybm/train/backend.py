"""The torch process group of a Ray Train worker group, set up without torch in the Train
controller.

Ray Train's own ``TorchConfig`` lives in a module that imports torch at the top, and the
controller unpickles it: every run's controller (a fresh process) then imports torch only to
tell its workers to join a process group, about 2 s of a 2-core machine before the first
step (bench/run_overhead.py). This backend does what Ray's does for GPUs and CPUs (the
rendezvous address from rank 0, torch's distributed environment variables, one
``init_process_group`` per rank, the shutdown), with the torch work in the workers: each
worker step calls Ray's own function for it, imported there. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30  # Ray's default for a process group's shutdown


@dataclass
class TorchProcessGroupConfig(BackendConfig):
    """What ``ray.train.torch.TorchConfig`` says (the collective backend, its timeout),
    read by a controller that never imports torch."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        """The backend the controller runs (``TorchProcessGroup``)."""
        return TorchProcessGroup

    @property
    def train_func_context(self):
        """Ray's context around the training function, in the worker: its CUDA device."""
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        """The framework Ray Train records for the run."""
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        """The settings as Ray Train's state export records them."""
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class TorchProcessGroup(Backend):
    """Joins every worker of a group into one torch process group (``env://`` rendezvous
    at rank 0's address), and leaves it at the end."""

    share_cuda_visible_devices: bool = True  # ranks on one node see each other's GPUs, as with Ray's

    def on_start(self, worker_group, backend_config: TorchProcessGroupConfig):
        """Rendezvous at rank 0, then every rank calls ``init_process_group``."""
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_distributed_env, address=address, port=port)
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=len(worker_group),
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: TorchProcessGroupConfig):
        """Every rank leaves the process group (and frees its cached CUDA memory)."""
        from ray.exceptions import GetTimeoutError

        futures = worker_group.execute_async(_leave_process_group, destroy=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=SHUTDOWN_TIMEOUT_S)
        except GetTimeoutError:
            logger.warning("the torch process group did not shut down within %d s", SHUTDOWN_TIMEOUT_S)


def _set_distributed_env(address: str, port: int) -> None:
    """In a worker: the rendezvous address, then torch's rank and size variables (Ray's)."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    _set_torch_distributed_env_vars()


def _join_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    """In a worker: ``init_process_group`` as Ray's TorchConfig does it."""
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size,
                               init_method="env://", timeout_s=timeout_s)


def _leave_process_group(destroy: bool) -> None:
    """In a worker: leave the process group as Ray's TorchConfig does."""
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)
