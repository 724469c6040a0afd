"""Connecting to Ray: join a cluster when one is named, else start a local Ray.

Never called at import time: each driver entrypoint calls ``ensure_ray`` once.
"""

from __future__ import annotations

import os
import socket

from raybm.config import RayConfig
from raybm.errors import RaybmError

# Variables workers need that a local driver has but a cluster worker would not.
_FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                  "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")


def worker_env() -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    return env


def quiet_ray_data() -> None:
    """Ray Data's own progress lines drown our step messages when output is not a terminal."""
    import logging
    import sys

    import ray.data

    if not sys.stdout.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


_JOINED = False  # this process joined a running cluster (ray.address / RAY_ADDRESS)


def joined_cluster() -> bool:
    """Whether this process runs on a cluster it joined, rather than on a Ray it started
    (whose resources are all there is: no autoscaler adds GPUs)."""
    return _JOINED or bool(os.environ.get("RAY_ADDRESS"))


def ensure_ray(cfg: RayConfig) -> str:
    """Initialize Ray once; returns a short description of where it runs."""
    import ray

    if ray.is_initialized():
        return "an already running Ray"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
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
    # The dashboard also serves the state API that Ray Train's run monitor polls.
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env)
    return "a local Ray (embedded)"


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when the named Ray cluster cannot be reached."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RaybmError(f"ray.address / RAY_ADDRESS {address!r}: give host:port (the head's GCS port, 6379), "
                         f"ray://host:port, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RaybmError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}). Is the head node "
                         f"running (`ray status` on it), and are ray.address / RAY_ADDRESS right? Unset both to "
                         f"start a local Ray instead.") from None
