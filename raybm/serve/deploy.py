"""Deploying the model server on the Ray this process runs on, and keeping it up."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable

from raybm.config import JobConfig, ServeConfig, StorageConfig, is_loopback
from raybm.errors import RaybmError
from raybm.serve.app import DEFAULT_LOADER, build_application, for_model
from raybm.serve.running import RunningServe, running_serve


def url_of(s: ServeConfig) -> str:
    """The URL clients on this machine reach the API at (``s`` resolved: ``for_model``)."""
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


def check_running_serve(s: ServeConfig, running: RunningServe) -> None:
    """Refuse, before anything is replaced, a deployment the running Serve would not host
    as configured: one it would expose beyond loopback without a key, one on another
    address than it listens on (Serve keeps its first), one on a route another model holds."""
    if running.host is not None and not is_loopback(running.host) and not s.api_key_env and not s.allow_without_key:
        raise RaybmError(
            f"Serve on this Ray listens on {running.host}:{running.port}, beyond this machine: "
            f"{s.app_name!r} without an API key would be open to anyone there. Set serve.api_key_env "
            f"(and serve.host={running.host}), or stop that Serve first"
        )
    if (running.host, running.port) != (None, None) and (running.host != s.host or running.port != s.port):
        raise RaybmError(
            f"Serve on this Ray already listens on {running.host}:{running.port} and keeps that "
            f"address for every application; set serve.host={running.host} serve.port={running.port} "
            f"to add {s.app_name!r} beside the others, or stop them first (raybm serve --list)"
        )
    taken = {route.rstrip("/") or "/": app for app, route in running.apps.items() if route and app != s.app_name}
    holder = taken.get(s.route_prefix.rstrip("/") or "/")
    if holder is not None:
        raise RaybmError(
            f"route {s.route_prefix} is served by the application {holder!r}; pick another "
            f"serve.route_prefix (or serve.app_name={holder} to update that one)"
        )


def deploy(
    cfg: JobConfig, model_dir: str, loader: str | Callable = DEFAULT_LOADER, storage: StorageConfig | None = None
) -> str:
    """Start Serve (if needed) on the configured host and port and deploy ``model_dir`` as
    an application of its own (``for_model``): a running Serve is checked first
    (``check_running_serve``), and the same name again is an update. Returns the API's URL
    once a replica answers. Ray must already be initialized."""
    from ray import serve

    s = for_model(cfg.serve, model_dir)
    running = running_serve()
    if running is not None:
        check_running_serve(s, running)
    app = build_application(model_dir, s, loader, storage)
    if not is_loopback(s.host) and not s.api_key_env:  # allowed only by serve.allow_without_key
        print(
            f"raybm: WARNING: serving on {s.host}:{s.port} without an API key (serve.allow_without_key=true): "
            f"anyone who reaches the port can use the model",
            file=sys.stderr,
            flush=True,
        )
    if running is None:
        if not _port_free(s.host, s.port):
            raise RaybmError(f"port {s.port} on {s.host} is in use; pick another with serve.port=<port>")
        serve.start(
            http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s},
            proxy_location=s.proxy_location,
        )
    try:
        serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
    except RuntimeError as e:
        raise RaybmError(f"the model server did not start: {str(e).strip().splitlines()[-1]}") from None
    return url_of(s)


def list_apps() -> list[dict[str, str | None]]:
    """The applications of the running Serve (none when it does not run): name, route
    prefix, status and the URL on this machine."""
    from ray import serve

    running = running_serve()
    if running is None:
        return []
    statuses = serve.status().applications
    host = "127.0.0.1" if running.host in (None, "0.0.0.0", "::") else running.host
    return [
        {
            "name": name,
            "route_prefix": route,
            "status": str(getattr(statuses.get(name), "status", "")),
            "url": f"http://{host}:{running.port}{(route or '').rstrip('/')}" if route else None,
        }
        for name, route in sorted(running.apps.items())
    ]


def stop_app(name: str) -> None:
    """Stop the application ``name`` of the running Serve; the others keep serving."""
    from ray import serve

    running = running_serve()
    if running is None or name not in running.apps:
        known = ", ".join(sorted(running.apps)) if running else "none: Serve is not running"
        raise RaybmError(f"no application {name!r} on this Ray's Serve (running: {known}); see raybm serve --list")
    serve.delete(name)


def wait_until_interrupted() -> None:
    """Block until Ctrl-C: what keeps a deployment up on a local Ray, whose Serve lives
    only as long as the process that started it."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
