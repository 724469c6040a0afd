"""The serving cost of a sweep's trials: parameters, size and single-sentence latency of
each trial's best checkpoint, and which trials meet the latency budget."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from raybm.config import JobConfig
from raybm.export.measure import measure
from raybm.storage.fs import copy_to_local, is_s3
from raybm.storage.layout import weight_files
from raybm.storage.records import LeaderboardRow
from raybm.train.checkpoints import as_model_folder


def is_model_folder(uri: str) -> bool:
    """Whether a checkpoint is a model folder on this machine already (not on S3, not LoRA adapters)."""
    return not is_s3(uri) and weight_files(uri) is not None


def architecture(folder: str) -> tuple[str, int]:
    """(fingerprint, parameter count) of a checkpoint's weights: the names and shapes of its
    tensors, read from the safetensors header without loading them."""
    from safetensors import safe_open

    shapes: list = []
    for path in weight_files(folder) or []:
        with safe_open(path, framework="pt") as f:
            shapes.extend((k, list(f.get_slice(k).get_shape())) for k in f.keys())
    shapes.sort()
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16], sum(math.prod(s) for _, s in shapes)


def measure_costs(cfg: JobConfig, rows: list[LeaderboardRow], log: Callable[[str], None]) -> None:
    """Add each row's serving cost: ``params``, ``size_mb`` (weights file) and
    ``latency_p50_ms`` (median single-sentence latency, PyTorch at 1 thread). Latency depends
    on the architecture only, so it is measured once per architecture, one after another on
    the driver (trials that share an architecture share the number, free of the noise of
    measuring them apart)."""
    latency: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="raybm-cost-") as tmp:
        for row in rows:
            uri = row.best_checkpoint or ""
            folder = (
                uri
                if is_model_folder(uri)
                else as_model_folder(copy_to_local(uri, cfg.storage, os.path.join(tmp, row.trial)))
            )
            key, params = architecture(folder)
            if key not in latency:
                latency[key] = measure(folder, "torch", None, None, cfg.tune.latency_samples)["latency_p50_ms"]
            row.params = params
            row.size_mb = round(sum(map(os.path.getsize, weight_files(folder) or [])) / 1e6, 2)
            row.latency_p50_ms = latency[key]
            if folder != uri:
                shutil.rmtree(folder, ignore_errors=True)
    log(
        f"Serving cost measured for {len(rows)} trial(s), {len(latency)} architecture(s): median single-sentence "
        f"latency {', '.join(f'{v:.1f}' for v in sorted(latency.values()))} ms (PyTorch, 1 thread)"
    )


def within_budget(
    ranked: list[LeaderboardRow], max_latency_ms: float | None
) -> tuple[list[LeaderboardRow], dict[str, Any] | None]:
    """The ranked trials the winner may come from under a latency budget, best first, and
    what the budget did (None without one). Marks each row ``within_budget``. When no trial
    meets the budget, all of them stay (the best wins) and ``met`` is False."""
    if max_latency_ms is None or not ranked:
        return ranked, None
    for row in ranked:
        row.within_budget = row.latency_p50_ms is not None and row.latency_p50_ms <= max_latency_ms
    ok = [row for row in ranked if row.within_budget]
    budget = {
        "max_latency_ms": max_latency_ms,
        "met": bool(ok),
        "trials_within": len(ok),
        "fastest_ms": min((row.latency_p50_ms for row in ranked if row.latency_p50_ms is not None), default=None),
    }
    return (ok or ranked), budget
