"""Whether work fits the cluster, node by node, before any of it starts.

Ray places each training worker (a *bundle* of CPUs, GPUs and custom resources) on one
node. Work whose bundle no node can hold never starts: Ray Train would retry the worker
group without end. Bundles that fit in total but not node by node (two 0.6-CPU workers on
two 1-CPU nodes beside a third) wait. So raybm checks bundles against each alive node's
resources: before a run or sweep starts (a clear error instead of a wait), and to count the
trials that fit at once.

Pure functions over ``{resource: amount}`` dicts; only ``alive_nodes`` asks Ray.
"""

from __future__ import annotations

from raybm.errors import RaybmError

Bundle = dict[str, float]
_EPS = 1e-9


def alive_nodes() -> list[Bundle]:
    """Each alive node's total resources (what a bundle placed there can use at most)."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def _fits(bundle: Bundle, free: Bundle) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in bundle.items() if v)


def place(bundles: list[Bundle], free: list[Bundle]) -> bool:
    """Place ``bundles`` on the nodes' ``free`` resources (first fit, biggest bundles first,
    fullest-fitting node first); updates ``free`` and returns True when all fit."""
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0))):
        fitting = [node for node in free if _fits(bundle, node)]
        if not fitting:
            return False
        node = min(fitting, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
        for k, v in bundle.items():
            if v:
                node[k] = node.get(k, 0.0) - v
    return True


def copies_that_fit(bundles: list[Bundle], nodes: list[Bundle], limit: int = 10_000) -> int:
    """How many copies of a set of bundles (one trial's workers) run at once on ``nodes``."""
    free = [dict(n) for n in nodes]
    count = 0
    while count < limit and place(bundles, free):
        count += 1
    return count


def _describe(bundle: Bundle) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in bundle.items() if v)


def unplaceable(bundle: Bundle, nodes: list[Bundle], may_appear: frozenset[str] = frozenset()) -> str | None:
    """Why no node can ever hold ``bundle`` (as a phrase), or None when one can. Resources in
    ``may_appear`` (GPUs an autoscaler will add, or all with ``"*"``) are not held against it."""
    if "*" in may_appear or any(_fits(bundle, node) for node in nodes):
        return None
    for res, amount in bundle.items():
        if not amount or res in may_appear:
            continue
        most = max((node.get(res, 0.0) for node in nodes), default=0.0)
        if most + _EPS < amount:
            where = "no node has any" if most == 0 else f"the largest node has {most:g}"
            return f"{amount:g} {res} per worker, but {where} (nodes: {node_summary(nodes)})"
    checked = {k: v for k, v in bundle.items() if k not in may_appear}
    if not checked or any(_fits(checked, node) for node in nodes):
        return None
    return f"{_describe(checked)} on one node, but no node has all of that (nodes: {node_summary(nodes)})"


def node_summary(nodes: list[Bundle]) -> str:
    """``3 nodes with 0, 1, 1 CPU`` (plus GPUs when any)."""
    nodes = sorted(nodes, key=lambda n: (n.get("CPU", 0.0), n.get("GPU", 0.0)))
    cpus = ", ".join(f"{n.get('CPU', 0.0):g}" for n in nodes)
    text = f"{len(nodes)} node(s) with {cpus} CPU"
    if any(n.get("GPU") for n in nodes):
        gpus = ", ".join(f"{n.get('GPU', 0.0):g}" for n in nodes)
        text += f" and {gpus} GPU"
    return text


def check_placeable(
    bundles: list[Bundle], nodes: list[Bundle], what: str, fix: str, may_appear: frozenset[str] = frozenset()
) -> None:
    """Raise a clear error, before any work, when ``bundles`` (one run's or trial's workers)
    can never all be placed on ``nodes``."""
    for bundle in bundles:
        why = unplaceable(bundle, nodes, may_appear)
        if why:
            raise RaybmError(f"{what} needs {why}. {fix}")
    if not may_appear and not place([dict(b) for b in bundles], [dict(n) for n in nodes]):
        raise RaybmError(
            f"{what} needs {len(bundles)} x ({_describe(bundles[0])}) placed at once, more than "
            f"the nodes hold ({node_summary(nodes)}). {fix}"
        )
