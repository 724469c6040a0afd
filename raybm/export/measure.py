"""Measuring a variant: accuracy and macro-F1 on the source dataset's test split, and
single-sentence latency at one thread (also the serving cost of a sweep's winner)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raybm.config import JobConfig, build_config
from raybm.errors import RaybmError
from raybm.export.folders import PROBE_TEXTS
from raybm.export.trained import source_config
from raybm.inference.loading import load_predictor, read_label_map
from raybm.metrics import confusion_matrix, metrics_from_confusion
from raybm.storage.results import Results


def eval_split(model_dir: str, cfg: JobConfig) -> tuple[list[str], np.ndarray] | None:
    """The test split of the dataset the model was trained on, when it is prepared here."""
    from raybm.data.pipeline import dataset_name
    from raybm.data.sources import resolve_source

    try:
        job = build_config(source_config(model_dir, cfg))
        results = Results.from_config(job.storage)
        name = dataset_name(job, resolve_source(job.data, job.storage))
    except RaybmError:
        return None
    if name not in results.list_datasets() or results.dataset_label_map(name)["labels"] != read_label_map(model_dir):
        return None
    table = pq.read_table(results.dataset_split_dir(name, "test"), filesystem=results.fs, columns=["text", "label"])
    return table.column("text").to_pylist(), table.column("label").to_numpy()


def measure(
    folder: str,
    backend: str,
    texts: list[str] | None,
    labels: np.ndarray | None,
    latency_samples: int,
    threads: int = 2,
) -> dict[str, Any]:
    """Accuracy / macro-F1 on ``texts`` and single-sentence latency at 1 thread."""
    import torch

    out: dict[str, Any] = {}
    saved = torch.get_num_threads()
    try:
        if texts is not None and labels is not None:
            p = load_predictor(folder, backend, threads=threads)
            pred = p.predict(texts).argmax(-1)
            m = metrics_from_confusion(confusion_matrix(labels, pred, len(p.labels)), p.labels)
            out.update(accuracy=m["accuracy"], f1_macro=m["f1_macro"], examples=m["examples"], _pred=pred)
        sample = (texts or PROBE_TEXTS * (latency_samples // len(PROBE_TEXTS) + 1))[:latency_samples]
        p = load_predictor(folder, backend, threads=1)
        p.predict(sample[:5])  # warm-up
        times = []
        for t in sample:
            t0 = time.perf_counter()
            p.predict([t])
            times.append(time.perf_counter() - t0)
        out.update(
            latency_p50_ms=round(1000 * float(np.percentile(times, 50)), 2),
            latency_p95_ms=round(1000 * float(np.percentile(times, 95)), 2),
            latency_threads=1,
        )
    finally:
        torch.set_num_threads(saved)
    return out
