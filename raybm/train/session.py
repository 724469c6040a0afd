"""Where a training worker runs, and what it asks of it: its rank, its device, the checkpoint
to resume from, where each epoch is reported, its data.

Two places run the same loop (``raybm.train.loop.run_worker``):

* ``RayTrainSession``: a rank of a Ray Train worker group (every ``raybm train`` run, and
  every sweep trial that needs a worker group: ``tune.trial_runner``).
* ``TrialSession``: the one worker of a sweep trial, run in the Tune trial's own process.
  A Ray Train worker group per trial costs a controller, a worker, a placement-group
  cleaner, a synchronization actor and more, each a new Python process: about 10 seconds
  a trial on a 2-core machine (BENCHMARKS.md). A trial of one worker needs none of them:
  Tune persists its checkpoints (to S3 too), restarts it from the last one when it fails
  and stops it when the scheduler says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from ray.data import DataIterator
    from ray.train import Checkpoint


class RayTrainSession:
    """A rank of a Ray Train worker group."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        """This rank's torch device (its GPU, or the CPU)."""
        import ray.train.torch

        return ray.train.torch.get_device()

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint to resume from (a restarted worker group, a rerun), or None."""
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str | None = None) -> None:
        """Report an epoch; ``folder``: rank 0's checkpoint, uploaded and left in place."""
        import ray.train

        if folder is None:
            ray.train.report(metrics, checkpoint=None)
        else:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                delete_local_checkpoint_after_upload=False,
            )

    def dataset(self, name: str) -> DataIterator:
        """This rank's shard of the Ray Data dataset ``name`` (validation and test: whole)."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    def wrap_ddp(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.nn.Module:
        """``model`` replicated with DDP across the worker group."""
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy="ddp", parallel_strategy_kwargs=kwargs
        )

    def placement_group(self) -> str | None:
        """The worker group's placement group (hex): a sweep frees a stopped trial's by it."""
        import ray

        pg = ray.util.get_current_placement_group()
        return None if pg is None else pg.id.hex()


class TrialSession:
    """The one worker of a sweep trial, in the trial's own process (a Tune function
    trainable holding the worker's resources)."""

    rank, world = 0, 1

    def device(self) -> torch.device:
        """The trial's GPU when Tune gave it one (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
        import ray
        import torch

        return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")

    def checkpoint(self) -> Checkpoint | None:
        """The trial's last checkpoint when Tune restarts it (a failure, a resumed sweep), or None."""
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str | None = None) -> None:
        """Report an epoch to Tune, which persists ``folder`` (the trial's storage: S3 too)
        and leaves the local copy in place."""
        import ray.tune

        ray.tune.report(metrics, checkpoint=None if folder is None else ray.tune.Checkpoint.from_directory(folder))

    def dataset(self, name: str) -> DataIterator:
        """Never asked: a trial runs in its own process only when it reads the splits whole."""
        raise RuntimeError(
            f"a sweep trial run in its own process has no Ray Data dataset {name!r}; set tune.trial_runner=ray_train"
        )

    def wrap_ddp(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.nn.Module:
        """One worker: nothing to replicate."""
        return model

    def placement_group(self) -> str | None:
        """None: Tune owns the trial's placement group and frees it itself."""
        return None


WorkerSession = RayTrainSession | TrialSession  # where a worker runs (``run_worker``)
