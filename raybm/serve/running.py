"""What the Serve already running on this Ray is: the address its HTTP proxies listen on
and the applications it hosts, each under its route prefix.

Ray Serve keeps the HTTP options it started with (a later ``serve.start`` with others
only logs "New http_options ... will not be applied"), and its public API does not say
which they are. The running controller does (``get_http_config``,
``get_serve_instance_details``, whose target groups also name the replicas that listen
themselves under direct ingress): those two calls are private to Ray, so they live here
alone, checked against the Ray version raybm pins, each with a fallback to what the public
API tells (``serve.status``) where the private call is gone.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTROLLER = "SERVE_CONTROLLER_ACTOR"
NAMESPACE = "serve"


@dataclass(frozen=True)
class RunningServe:
    """A running Serve: where it listens (None where Ray no longer tells) and its
    applications (name -> route prefix; the prefix None where Ray no longer tells)."""
    host: str | None
    port: int | None
    apps: dict[str, str | None]


def _controller():
    import ray

    try:
        return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        return None


def running_serve() -> RunningServe | None:
    """The Serve running on the Ray this process is connected to, or None (without
    starting Serve, which ``serve.status`` would)."""
    import ray

    controller = _controller()
    if controller is None:
        return None
    host = port = None
    try:
        http = ray.get(controller.get_http_config.remote(), timeout=30)
        host, port = http.host, int(http.port)
    except Exception:  # noqa: BLE001 - a Ray whose controller changed: the address is unknown
        pass
    try:
        details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
        apps = {name: app.get("route_prefix") for name, app in (details.get("applications") or {}).items()}
    except Exception:  # noqa: BLE001 - fall back to the public status: names only
        from ray import serve

        apps = {name: None for name in serve.status().applications}
    return RunningServe(host, port, apps)



def ingress_targets(app: str, route_prefix: str) -> list[tuple[str, int]] | None:
    """(node address, port) of each replica of ``app`` that answers HTTP itself (Serve's
    direct ingress), from the controller's target groups: empty when the app is reached
    through proxies only (Serve without direct ingress lists its proxies there, or Ray no
    longer tells), None while the app has no target group yet."""
    import ray

    controller = _controller()
    if controller is None:
        return []
    try:
        groups = ray.get(controller.get_serve_instance_details.remote(), timeout=30).get("target_groups")
    except Exception:  # noqa: BLE001 - a Ray whose controller changed: no direct addresses known
        return []
    if groups is None:
        return []
    mine = [g for g in groups if g.get("app_name") == app and g.get("route_prefix") == route_prefix
            and getattr(g.get("protocol"), "value", g.get("protocol")) == "HTTP"]
    if not mine:
        return None
    targets = [t for g in mine for t in g.get("targets") or []]
    if not targets:
        return None
    return [(t["ip"], int(t["port"])) for t in targets if str(t.get("name", "")).startswith("SERVE_REPLICA::")]
