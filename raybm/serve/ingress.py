"""Serve's direct ingress: each model replica answers HTTP on a port of its own, beside
the proxy's address.

Through Serve's HTTP proxy a request costs about 8 ms of a small machine's CPU before and
after the model (the proxy parses it, routes it, and makes an actor call to the replica
and back); a replica that listens itself answers a request that does nothing in about
1 ms (measured in BENCHMARKS.md). Ray 2.60 turns this on with an environment variable
that its Serve controller and replicas must both see, so it is chosen when Ray starts:
raybm puts it in the runtime env of the Ray it starts or joins (``ray_env``). The proxy
keeps listening on ``serve.host:serve.port`` (the stable address, for every application),
and each replica of an application also listens on ``serve.host`` at a port Ray picks
from 30000-31000 (``direct_urls``: a new port after an update, so clients that want the
short path ask raybm or /-/routes again, and one replica per URL: no load balancing).

A replica also runs raybm's handlers on the loop that reads its requests (``replica_env``).
These switches are Ray's environment variables, not an API: they live here alone,
written for the Ray version raybm pins; on another version raybm says once that it
serves through the proxy only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from raybm.config import ServeConfig, is_loopback
from raybm.serve.running import ingress_targets

WRITTEN_FOR_RAY = "2.60."
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # Ray waits at least 30 s before stopping a replica that listens itself (for an outside
    # load balancer to notice); raybm's clients ask for the address again instead.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
# Each replica runs raybm's handlers on the event loop that reads its requests, not on a
# second loop in a thread of its own (Ray's default): two hand-overs between threads fewer
# per request, 0.9-1.5 ms off a request at concurrency 1 on 2 cores (BENCHMARKS.md). Safe
# because no handler blocks its loop: the model, explanations and health checks run in
# threads of their own.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
_warned = False


def replica_env() -> dict[str, str]:
    """The environment variables of a model replica's process for Ray's request path
    (``REPLICA_ENV``); none on a Ray this was not written for."""
    import ray

    return dict(REPLICA_ENV) if ray.__version__.startswith(WRITTEN_FOR_RAY) else {}


def ray_env(s: ServeConfig) -> dict[str, str]:
    """The runtime env variables that turn on direct ingress (``serve.ingress=direct``) on
    the Ray raybm starts or joins; none for ``proxy`` or on a Ray this was not written for."""
    global _warned
    if s.ingress != "direct":
        return {}
    import ray

    if not ray.__version__.startswith(WRITTEN_FOR_RAY):
        if not _warned:
            print(
                f"raybm: serve.ingress=direct was written for Ray {WRITTEN_FOR_RAY}x, this is Ray "
                f"{ray.__version__}: serving through Serve's proxy only",
                file=sys.stderr,
                flush=True,
            )
            _warned = True
        return {}
    return dict(DIRECT_INGRESS_ENV)


def direct_urls(s: ServeConfig, wait_s: float = 10.0) -> list[str]:
    """The URLs of the application's replicas that listen themselves (``s`` resolved:
    ``for_model``), one per replica, waiting up to ``wait_s`` for Serve to list them after a
    deployment; empty when Serve runs without direct ingress (a Ray started without
    ``ray_env``, or ``serve.ingress=proxy``)."""
    deadline = time.monotonic() + wait_s
    targets = ingress_targets(s.app_name, s.route_prefix)
    while targets is None and time.monotonic() < deadline:
        time.sleep(0.2)
        targets = ingress_targets(s.app_name, s.route_prefix)
    loopback = is_loopback(s.host)
    prefix = s.route_prefix.rstrip("/")
    return [f"http://{'127.0.0.1' if loopback else ip}:{port}{prefix}" for ip, port in targets or []]


def say_direct_urls(s: ServeConfig, say: Callable[[str], object]) -> list[str]:
    """Tell (``say``) where the application's replicas also answer themselves (``s``
    resolved); returns those URLs."""
    urls = direct_urls(s)
    if urls:
        say(
            f"  and straight to the replica{'s' if len(urls) > 1 else ''}, without the proxy's hop: "
            f"{', '.join(u + '/predict' for u in urls)} (a new port after each redeploy)"
        )
    return urls
