"""Deploying the model server on the Ray this process runs on, and keeping it up."""

from __future__ import annotations

import socket
import sys
import time
from typing import Callable

from raybm.config import JobConfig, ServeConfig, StorageConfig, is_loopback
from raybm.errors import RaybmError
from raybm.serve.app import DEFAULT_LOADER, build_application


def url_of(s: ServeConfig) -> str:
    """The URL clients on this machine reach the API at."""
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _serve_running() -> bool:
    """Whether Serve already runs on this Ray (without starting it, as serve.status would)."""
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return False
    return True


def deploy(cfg: JobConfig, model_dir: str, loader: str | Callable = DEFAULT_LOADER,
           storage: StorageConfig | None = None) -> str:
    """Start Serve (if needed) on the configured host and port and deploy ``model_dir``;
    returns the API's URL once a replica answers. Ray must already be initialized."""
    from ray import serve

    s = cfg.serve
    app = build_application(model_dir, s, loader, storage)
    if not is_loopback(s.host) and not s.api_key_env:  # allowed only by serve.allow_without_key
        print(f"raybm: WARNING: serving on {s.host}:{s.port} without an API key (serve.allow_without_key=true): "
              f"anyone who reaches the port can use the model", file=sys.stderr, flush=True)
    if not _serve_running():
        if not _port_free(s.host, s.port):
            raise RaybmError(f"port {s.port} on {s.host} is in use; pick another with serve.port=<port>")
        serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s},
                    proxy_location=s.proxy_location)
    try:
        serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
    except RuntimeError as e:
        raise RaybmError(f"the model server did not start: {str(e).strip().splitlines()[-1]}") from None
    return url_of(s)


def wait_until_interrupted() -> None:
    """Block until Ctrl-C: what keeps a deployment up on a local Ray, whose Serve lives
    only as long as the process that started it."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
