"""Ray Data transforms that load something heavy (a tokenizer, a model) once per worker process.

Ray Data runs a callable class in a pool of actors: each actor loads once, but starting a
pool costs a process start and a load (4-8 s on 2 cores) every time a dataset runs, which
dominated short jobs (tokenizing a split, scoring a validation split). ``map_batches_cached``
runs the same class as plain Ray tasks instead: each task builds the class through a small
per-process cache, so a worker process that ran the transform before (Ray keeps idle
workers) reuses the loaded object, and the first run costs no actor start.

The class must be importable (defined at module level) and built from JSON-able keyword
arguments; the cache keeps the last ``_KEEP`` objects of each process.
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.data import Dataset

_KEEP = 2
_INSTANCES: OrderedDict[tuple[str, str], Any] = OrderedDict()


def cached_instance(cls_path: str, kwargs_json: str) -> Any:
    """``cls(**kwargs)`` for the class at ``module:qualname``, built once per process."""
    key = (cls_path, kwargs_json)
    inst = _INSTANCES.get(key)
    if inst is None:
        module, name = cls_path.split(":")
        cls = getattr(importlib.import_module(module), name)
        inst = cls(**json.loads(kwargs_json))
        _INSTANCES[key] = inst
        while len(_INSTANCES) > _KEEP:
            _INSTANCES.popitem(last=False)
    else:
        _INSTANCES.move_to_end(key)
    return inst


def _apply(batch: Any, cls_path: str, kwargs_json: str) -> Any:
    return cached_instance(cls_path, kwargs_json)(batch)


def map_batches_cached(
    ds: Dataset, cls: type, kwargs: dict[str, Any], *, concurrency: int | None = None, **options: Any
) -> Dataset:
    """``ds.map_batches(cls, fn_constructor_kwargs=kwargs, ...)`` on tasks with a
    per-process instance cache; ``concurrency`` caps the tasks running at once (empty:
    Ray Data decides)."""
    import ray.data

    path = f"{cls.__module__}:{cls.__qualname__}"
    if "." in cls.__qualname__ or cls.__module__ == "__main__":
        raise ValueError(f"{cls!r}: map_batches_cached needs a module-level class")
    return ds.map_batches(
        _apply,
        fn_kwargs={"cls_path": path, "kwargs_json": json.dumps(kwargs, sort_keys=True)},
        compute=ray.data.TaskPoolStrategy(size=concurrency),
        **options,
    )
