"""What a run's Ray Train workers reserve, and whether the cluster can hold them: refused
before any work when no node can, bounded in time when the cluster is busy."""

from __future__ import annotations

import importlib.util

from raybm.config import JobConfig, TrainConfig
from raybm.errors import RaybmError
from raybm.placement import alive_nodes, check_placeable
from raybm.runtime import on_cluster


def asks_for_gpus(setting: str) -> bool:
    """Whether training asks for GPUs. ``yes`` on a cluster is taken as given even with no
    GPU node up yet: the autoscaler starts GPU workers when trials ask for them."""
    import ray

    has = ray.cluster_resources().get("GPU", 0) > 0
    if setting == "yes" and not has and not on_cluster():
        raise RaybmError("train.use_gpu=yes, but this local Ray has no GPUs; set train.use_gpu=auto or no")
    return has if setting == "auto" else setting == "yes"


def check_workers_fit(cfg: JobConfig, what: str, extra: list[dict[str, float]] | None = None) -> None:
    """Refuse, before any work, a run or trial whose workers (plus ``extra`` bundles, e.g. a
    trial's tokenizer actors) no node of the cluster can hold: Ray Train would wait for them
    forever, retrying every minute. GPUs an autoscaler will add (``train.use_gpu=yes`` on a
    cluster, ``tune.cluster_gpus``) and anything with ``ray.autoscaling`` are not held against it."""
    t = cfg.train
    check_gpu_settings(cfg, asks_for_gpus(t.use_gpu))
    check_placeable(
        [worker_resources(t, asks_for_gpus(t.use_gpu))] * t.num_workers + list(extra or []),
        alive_nodes(),
        what,
        "Lower train.cpus_per_worker, train.gpus_per_worker or train.num_workers, drop "
        "train.worker_resources a node lacks, or add nodes (ray.num_cpus on a local Ray)",
        resources_that_may_appear(cfg),
    )


def check_gpu_settings(cfg: JobConfig, use_gpu: bool) -> None:
    """Refuse, before any work, settings that only GPU workers can run when the run gets none
    (``train.cpu_offload``, ``train.quantize_base``), and 4-bit weights without bitsandbytes."""
    t = cfg.train
    if not use_gpu and t.cpu_offload:
        raise RaybmError(
            "train.cpu_offload needs GPU workers (it moves their state to host memory), and this "
            "cluster has no GPUs: drop train.cpu_offload (CPU workers keep everything in host memory)"
        )
    if not use_gpu and t.quantize_base != "none":
        raise RaybmError(
            f"train.quantize_base={t.quantize_base} needs GPU workers (bitsandbytes' 4-bit kernels), "
            f"and this cluster has no GPUs: set train.quantize_base=none (LoRA on the full-precision base)"
        )
    if t.quantize_base != "none" and not on_cluster() and importlib.util.find_spec("bitsandbytes") is None:
        raise RaybmError("train.quantize_base needs bitsandbytes: pip install 'raybm[qlora]'")


def resources_that_may_appear(cfg: JobConfig) -> frozenset[str]:
    """Resources the cluster may add while the job waits, not held against its work: all of
    them (``"*"``) on an autoscaling cluster; GPUs for ``train.use_gpu=yes`` or
    ``tune.cluster_gpus`` on a cluster."""
    if not on_cluster():
        return frozenset()
    may_appear: set[str] = set()
    if cfg.ray.autoscaling:
        may_appear.add("*")
    if asks_for_gpus(cfg.train.use_gpu) and (cfg.train.use_gpu == "yes" or cfg.tune.cluster_gpus):
        may_appear.add("GPU")
    return frozenset(may_appear)


def worker_resources(t: TrainConfig, use_gpu: bool) -> dict[str, float]:
    """Resources one training worker reserves (its bundle)."""
    res = {"CPU": t.cpus_per_worker, **t.worker_resources}
    if use_gpu:
        res["GPU"] = t.gpus_per_worker
    return res


def not_placed(e: BaseException) -> bool:
    """Whether a Ray Train failure is its worker group not being placed in time."""
    return "worker group startup timed out" in str(e)


def placement_failure(t: TrainConfig, use_gpu: bool) -> str:
    """The error of workers that were not placed within ``train.placement_timeout_s``."""
    bundle = ", ".join(f"{v:g} {k}" for k, v in worker_resources(t, use_gpu).items())
    return (
        f"{t.num_workers} worker(s) of {bundle} each could not be placed within train.placement_timeout_s="
        f"{t.placement_timeout_s:g} s: the cluster has no room for them now (other jobs, or no node with "
        f"all of that). Lower train.cpus_per_worker / train.gpus_per_worker / train.num_workers, free or add "
        f"nodes, or raise train.placement_timeout_s"
    )


def torch_backend(t: TrainConfig, use_gpu: bool) -> str:
    """The collective backend: NCCL on GPUs unless workers share one (NCCL refuses two ranks
    on the same device), gloo on CPUs (FSDP too)."""
    if t.parallelism == "fsdp" and use_gpu:
        if t.backend == "gloo":
            raise RaybmError("train.parallelism=fsdp on GPUs needs NCCL; set train.backend=auto")
        if t.gpus_per_worker < 1 and t.num_workers > 1:
            raise RaybmError(
                "train.parallelism=fsdp needs one GPU per worker (NCCL); set "
                "train.gpus_per_worker=1 or use parallelism ddp"
            )
    if t.backend != "auto":
        return t.backend
    if not use_gpu:
        return "gloo"
    if t.gpus_per_worker < 1 and t.num_workers > 1:
        return "gloo"
    return "nccl"
