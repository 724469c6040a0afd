"""What the Serve already running on this Ray is: the address its HTTP proxies listen on
and the applications it hosts, each under its route prefix.

Ray Serve keeps the HTTP options it started with (a later ``serve.start`` with others
only logs "New http_options ... will not be applied"), and its public API does not say
which they are. The running controller does (its HTTP config, and its instance details,
whose target groups also name the replicas that listen themselves under direct ingress):
those calls are private to Ray, so they live in ``raybm.ray_patches`` with Ray's other
private pieces, and this falls back to what the public API tells (``serve.status``) where
they answer nothing.
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
    from raybm.ray_patches import serve_http_address, serve_instance_details

    controller = _controller()
    if controller is None:
        return None
    host, port = serve_http_address(controller) or (None, None)
    details = serve_instance_details(controller)
    if details is not None:
        apps = {name: app.get("route_prefix") for name, app in (details.get("applications") or {}).items()}
    else:  # the public status: names only
        from ray import serve

        apps = {name: None for name in serve.status().applications}
    return RunningServe(host, port, apps)


def ingress_targets(app: str, route_prefix: str) -> list[tuple[str, int]] | None:
    """(node address, port) of each replica of ``app`` that answers HTTP itself (Serve's
    direct ingress), from the controller's target groups: empty when the app is reached
    through proxies only (Serve without direct ingress lists its proxies there, or Ray no
    longer tells), None while the app has no target group yet."""
    from raybm.ray_patches import serve_instance_details

    controller = _controller()
    if controller is None:
        return []
    groups = (serve_instance_details(controller) or {}).get("target_groups")
    if groups is None:
        return []
    mine = [
        g
        for g in groups
        if g.get("app_name") == app
        and g.get("route_prefix") == route_prefix
        and getattr(g.get("protocol"), "value", g.get("protocol")) == "HTTP"
    ]
    if not mine:
        return None
    targets = [t for g in mine for t in g.get("targets") or []]
    if not targets:
        return None
    return [(t["ip"], int(t["port"])) for t in targets if str(t.get("name", "")).startswith("SERVE_REPLICA::")]
