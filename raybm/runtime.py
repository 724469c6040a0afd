"""Connecting to Ray: join a cluster when one is named, else start a local Ray.

Never called at import time: each driver entrypoint calls ``ensure_ray`` once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from raybm.config import JobConfig, RayConfig
from raybm.errors import RaybmError

# Settings (never secrets) workers need that a driver joining a cluster has but the
# cluster's workers may not. Credentials are not among them: Ray keeps a runtime env in
# its control store and shows it on its dashboard, so nodes use their own credential chain
# (an instance profile on cloud nodes; a local Ray's workers inherit the driver's
# environment anyway).
_FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")
# Fast tokenizers' own threads off in every raybm process: each worker, replica and actor
# already has its CPU share, and a tokenizer that used threads before a fork warns and stalls.
TOKENIZER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def quiet_tokenizers() -> None:
    """Set ``TOKENIZER_ENV`` in this process unless the user set those variables."""
    for key, value in TOKENIZER_ENV.items():
        os.environ.setdefault(key, value)


def worker_env() -> dict[str, str]:
    """The runtime env variables raybm hands workers when it joins or starts a Ray."""
    env = dict(TOKENIZER_ENV)
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    return env


def quiet_ray_data() -> None:
    """Ray Data's own progress lines drown our step messages when output is not a terminal."""
    import ray.data

    if not sys.stdout.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


_JOINED = False  # this process joined a running cluster (ray.address / RAY_ADDRESS)


def cluster_address(cfg: RayConfig) -> str | None:
    """The Ray cluster a job joins (``ray.address``, else ``RAY_ADDRESS``), or None when it
    starts a local Ray of its own. The one answer before Ray starts."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def on_cluster() -> bool:
    """Whether this process runs on a cluster (one it joined, or any Ray of more than one
    node) rather than on a Ray it started, whose resources are all there is: no autoscaler
    adds GPUs or nodes. The one answer once Ray runs."""
    import ray

    if _JOINED or os.environ.get("RAY_ADDRESS"):
        return True
    if not ray.is_initialized():  # asking Ray's runtime context would start a Ray with Ray's defaults
        return False
    try:
        return ray.get_runtime_context().gcs_address is not None and len(ray.nodes()) > 1
    except Exception:  # noqa: BLE001 - no Ray here: not on a cluster
        return False


def ensure_ray(cfg: RayConfig, env: dict[str, str] | None = None) -> str:
    """Initialize Ray once; returns a short description of where it runs. ``env``: more
    runtime env variables for every worker (Serve's switches: ``raybm.serve.ingress``)."""
    import ray

    if ray.is_initialized():
        return "an already running Ray"
    quiet_tokenizers()
    address = cluster_address(cfg)
    runtime_env: dict | None = {"env_vars": {**worker_env(), **(env or {})}}
    if address:
        check_address(address)
        if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            # A driver started by `ray job submit`: the job's runtime env (working dir, env
            # vars given with --runtime-env-json) already applies to every worker, and Ray
            # refuses a second one that sets the same variables.
            runtime_env = None
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as e:
            raise RaybmError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        global _JOINED
        _JOINED = True
        return f"the Ray cluster at {address}"
    # No dashboard unless asked: nothing raybm runs on a Ray of its own reads the state API
    # it serves (Ray Train's placement-group cleaner, which polls it, runs on clusters only).
    ray.init(
        num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, dashboard_host="127.0.0.1", runtime_env=runtime_env
    )
    return "a local Ray (embedded)"


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when the named Ray cluster cannot be reached."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RaybmError(
            f"ray.address / RAY_ADDRESS {address!r}: give host:port (the head's GCS port, 6379), "
            f"ray://host:port, or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RaybmError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}). Is the head node "
            f"running (`ray status` on it), and are ray.address / RAY_ADDRESS right? Unset both to "
            f"start a local Ray instead."
        ) from None


def node_count() -> int:
    """Alive nodes of the Ray this process runs on."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def job_working_dir() -> str | None:
    """The submitted job's working_dir as unpacked here (every node unpacks the same one), or
    None outside a job that has one."""
    import ray

    try:
        env = ray.get_runtime_context().runtime_env or {}
    except Exception:  # noqa: BLE001
        return None
    return os.getcwd() if env.get("working_dir") else None


def check_shared_paths(cfg: JobConfig, models: dict[str, str] | None = None, *, root: bool = True) -> None:
    """On a Ray of more than one node, refuse before any work the local paths the other
    nodes cannot see: a local ``storage.root`` (unless ``root`` is false: the command
    reads and writes nothing there), a local data file or model folder (outside the
    submitted working_dir, which every node unpacks). ``models`` names more paths to
    check, ``{setting or flag: path}``."""
    nodes = node_count()
    if nodes < 2:
        return
    if root and not cfg.storage.root.startswith("s3://"):
        raise RaybmError(
            f"storage.root={cfg.storage.root!r} is a local folder, but this Ray cluster has {nodes} "
            f"nodes, which do not share it (each writes its own disk). Set storage.root=s3://<bucket>/"
            f"<prefix> so every node reads and writes the same results."
        )
    workdir = job_working_dir()
    local = {}
    source = cfg.data.source
    if "://" not in source and os.path.exists(os.path.expanduser(source)):
        local["data.source"] = source
    if os.path.isdir(os.path.expanduser(cfg.model.name)):
        local["model.name"] = cfg.model.name
    if cfg.train.distill_from:
        local["train.distill_from"] = cfg.train.distill_from
    local.update({k: v for k, v in (models or {}).items() if v and not v.startswith("s3://")})
    for setting, path in local.items():
        full = os.path.realpath(os.path.expanduser(path))
        if workdir and (full + os.sep).startswith(os.path.realpath(workdir) + os.sep):
            continue
        raise RaybmError(
            f"{setting}={path!r} is on this node's disk only, but this Ray cluster has {nodes} nodes "
            f"and the work runs on the others. Put it on S3 (s3://...) or inside the job's "
            f"working_dir (`ray job submit --working-dir .`: every node gets a copy) and use a "
            f"path relative to it."
        )
