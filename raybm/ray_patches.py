"""Every use raybm makes of Ray's private code, in one place, guarded by the Ray version it
was written for.

Ray 2.60 starts helper processes for every training run that a run on a small machine
does not need, and its ``TorchConfig`` makes each run's Train controller (a fresh process)
import torch only to tell its workers to join a process group. Together about 3-4 s of a
2-core machine before the first step (bench/run_overhead.py). What saves them reaches
into Ray's private modules, which change without notice between versions; so it lives
here alone, and only on the Ray version it was written for (``WRITTEN_FOR_RAY``). On any
other version, or with ``RAYBM_RAY_PATCHES=0`` in the environment, raybm says so once and
runs Ray Train's public path: ``TorchTrainer`` as it is, ``ray.train.torch.TorchConfig``.

What is here:

- ``trainer_class``: ``TorchTrainer`` less the dataset manager (when the workers read
  their splits whole), the autoscaling coordinator and the placement-group cleaner (on a
  Ray raybm started, which has no autoscaler and ends a run with its driver);
- ``process_group_config``: a torch process-group backend the controller unpickles
  without importing torch (``TorchProcessGroupConfig``), doing in the workers what Ray's
  does;
- ``set_train_env``: Ray Train's settings read from the driver's environment (the only
  process-wide environment changes raybm makes for Ray);
- ``quiet_train_context_logs``, ``quiet_tune_sync_warning``: log lines that repeat what
  raybm says once;
- ``ray_job_ended``: whether a Ray job of this cluster has ended (the GCS job table, no
  dashboard needed), for the lease of a results folder;
- ``serve_http_address``, ``serve_instance_details``: what the running Serve controller
  says of itself (the address its proxies listen on, its applications and the replicas that
  listen themselves), which Serve's public API does not tell; None where Ray no longer
  does (``raybm.serve.running`` then falls back to ``serve.status``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.train.backend import Backend, BackendConfig

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.train.torch import TorchConfig, TorchTrainer

logger = logging.getLogger(__name__)

WRITTEN_FOR_RAY = "2.60."
SWITCH_ENV = "RAYBM_RAY_PATCHES"  # "0": Ray's public path only, on any version
SHUTDOWN_TIMEOUT_S = 30  # Ray's default for a process group's shutdown

# Ray Train reads these from the driver's environment and passes them to its controller.
PLACEMENT_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # public: bounded placement
# How often the controller polls its workers. Each state change of a run (workers started,
# training finished) waits for a poll: at Ray's 2 s, a run's start and end cost about 3 s
# more on a 2-core machine. A poll is one small RPC per worker; a missed one is tolerated.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.5"
# A preemption watcher per run (an actor polling whether Ray drains a node, as a cloud does
# before reclaiming a spot instance): a Ray raybm started on one machine drains no node.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
TUNE_SYNC_WARNING_ENV = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"

_applies: bool | None = None


def applies() -> bool:
    """Whether raybm uses Ray's private pieces on this Ray (the version they were written
    for, all of them importable, not switched off); says once why not."""
    global _applies
    if _applies is None:
        why = _why_not()
        _applies = why is None
        if why:
            print(
                f"raybm: {why}: training runs Ray Train's public TorchTrainer path (a few seconds "
                f"more a run on a small machine)",
                file=sys.stderr,
                flush=True,
            )
    return _applies


def _other_ray() -> str | None:
    """Why Ray's private pieces are not for this process (switched off, another Ray), or None."""
    if os.environ.get(SWITCH_ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return f"{SWITCH_ENV}={os.environ[SWITCH_ENV]}"
    if not ray.__version__.startswith(WRITTEN_FOR_RAY):
        return f"this is Ray {ray.__version__}, raybm's shortcuts into Ray Train were written for {WRITTEN_FOR_RAY}x"
    return None


def _why_not() -> str | None:
    if other := _other_ray():
        return other
    try:
        import ray.train._internal.utils as train_utils
        import ray.train.torch.config as torch_config
        from ray.train.torch import TorchTrainer
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy  # noqa: F401
        from ray.train.v2._internal.util import TrainingFramework  # noqa: F401
    except ImportError as e:
        return f"Ray {ray.__version__} lacks a piece raybm's shortcuts use ({e})"
    wanted = [
        (train_utils, "get_address_and_port"),
        (TorchTrainer, "_create_default_callbacks"),
        (TorchTrainer, "_initialize_and_run_controller"),
    ]
    wanted += [
        (torch_config, name)
        for name in ("_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch")
    ]
    missing = [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, name in wanted
        if not callable(getattr(owner, name, None))
    ]
    if missing:
        return f"Ray {ray.__version__} has no {', '.join(missing)}"
    return None


def reset() -> None:
    """Decide ``applies`` again (after a change of ``RAYBM_RAY_PATCHES``)."""
    global _applies
    _applies = None


def set_train_env(placement_timeout_s: float, *, cluster: bool) -> None:
    """Ray Train's settings for the next run, in the driver's environment (Ray passes them
    to the run's controller): a bounded wait for the worker group's placement (Ray retries
    without end otherwise); with the shortcuts, a faster poll and, off a cluster, no
    preemption watcher. A poll interval or watcher setting of the user's own wins."""
    os.environ[PLACEMENT_TIMEOUT_ENV] = f"{placement_timeout_s:g}"
    if applies():
        os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
        if not cluster:
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def quiet_tune_sync_warning() -> None:
    """Tune warns at every checkpoint of a short epoch that saving its experiment state took
    long: with a checkpoint per epoch kept by Tune that is the intended cost."""
    os.environ.setdefault(TUNE_SYNC_WARNING_ENV, "0")


def trainer_class(*, ray_data: bool, autoscaling: bool, placement_group_cleaner: bool) -> type[TorchTrainer]:
    """Ray Train's ``TorchTrainer``, less the helper processes a run does not need (each a
    new Python process per run, about a second of CPU on 2 cores before the first step):

    - without ``ray_data`` (the workers read their splits whole), no dataset manager;
    - without ``autoscaling``, no autoscaling coordinator: it forwards the worker group's
      resource requests to an autoscaler, and a Ray raybm started has none (kept while Ray
      Data runs, whose budget reads it);
    - without ``placement_group_cleaner``, no detached actor polling the state API every
      second to remove the run's placement group should its controller die: on a Ray
      raybm started a run ends with its driver, and a sweep's driver removes a stopped
      trial's group itself. Kept on a cluster.

    ``TorchTrainer`` itself where the shortcuts do not apply."""
    from ray.train.torch import TorchTrainer

    if not applies():
        return TorchTrainer
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    dropped = set()
    if not ray_data:
        dropped.add("DatasetsCallback")
    if not placement_group_cleaner:
        dropped.add("PlacementGroupCleanerCallback")

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in dropped]

        def _initialize_and_run_controller(self, **kwargs):
            if not autoscaling and type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = _policy_without_autoscaler(FixedScalingPolicy)(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


def _policy_without_autoscaler(fixed_policy: type) -> type:
    """Ray Train's fixed-size scaling policy, minus its requests to the autoscaling
    coordinator (and so minus that actor)."""

    class FixedWithoutAutoscaler(fixed_policy):
        def after_controller_start(self, train_run_context):
            pass

        def _maybe_send_resource_request(self):
            pass

        def _send_resource_request(self):
            pass

        def _cancel_resource_request(self):
            pass

    return FixedWithoutAutoscaler


def process_group_config(backend: str) -> TorchProcessGroupConfig | TorchConfig:
    """The torch process group of a run's workers (``gloo`` or ``nccl``): raybm's
    ``TorchProcessGroupConfig``, or Ray's ``TorchConfig`` where the shortcuts do not apply."""
    if applies():
        return TorchProcessGroupConfig(backend=backend)
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=backend)


@dataclass
class TorchProcessGroupConfig(BackendConfig):
    """What ``ray.train.torch.TorchConfig`` says (the collective backend, its timeout),
    read by a controller that never imports torch: Ray's own lives in a module that
    imports torch at the top."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[TorchProcessGroup]:
        """The backend the controller runs (``TorchProcessGroup``)."""
        return TorchProcessGroup

    @property
    def train_func_context(self) -> type:
        """Ray's context around the training function, in the worker: its CUDA device."""
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        """The framework Ray Train records for the run."""
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        """The settings as Ray Train's state export records them."""
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class TorchProcessGroup(Backend):
    """Joins every worker of a group into one torch process group (``env://`` rendezvous
    at rank 0's address), and leaves it at the end, as Ray's ``TorchConfig`` does, with the
    torch work in the workers (each step calls Ray's own function for it, imported there)."""

    share_cuda_visible_devices: bool = True  # ranks on one node see each other's GPUs, as with Ray's

    def on_start(self, worker_group: Any, backend_config: TorchProcessGroupConfig) -> None:
        """Rendezvous at rank 0, then every rank calls ``init_process_group``."""
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_distributed_env, address=address, port=port)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join_process_group,
                    backend=backend_config.backend,
                    world_rank=rank,
                    world_size=len(worker_group),
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: TorchProcessGroupConfig) -> None:
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

    _setup_torch_process_group(
        backend=backend, world_rank=world_rank, world_size=world_size, init_method="env://", timeout_s=timeout_s
    )


def _leave_process_group(destroy: bool) -> None:
    """In a worker: leave the process group as Ray's TorchConfig does."""
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


def quiet_train_context_logs() -> None:
    """In a worker: Ray Train's context logs each report with its whole metrics dict (the
    history included, so the line grows every epoch) under its file's name; warnings and
    errors still show. Its lines stay on another Ray layout."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def ray_job_ended(job_id: str) -> bool | None:
    """Whether the Ray job ``job_id`` of the connected cluster has ended (GCS job table);
    None when that cannot be told (a job not found, another Ray layout)."""
    try:
        from ray._private.state import jobs
    except ImportError:
        return None
    for info in jobs():
        if info.get("JobID") == job_id:
            return bool(info.get("IsDead"))
    return None


def serve_http_address(controller: ActorHandle) -> tuple[str, int] | None:
    """(host, port) the running Serve's proxies listen on, from its controller; None on
    another Ray or where the controller no longer tells."""
    if _other_ray():
        return None
    try:
        http = ray.get(controller.get_http_config.remote(), timeout=30)
        return http.host, int(http.port)
    except Exception:  # noqa: BLE001 - a controller that changed: unknown
        return None


def serve_instance_details(controller: ActorHandle) -> dict | None:
    """The running Serve's own account of itself (``applications`` with their route
    prefixes, ``target_groups`` with the replicas that answer HTTP themselves); None on
    another Ray or where the controller no longer tells."""
    if _other_ray():
        return None
    try:
        details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a controller that changed: unknown
        return None
    return details if isinstance(details, dict) else None
