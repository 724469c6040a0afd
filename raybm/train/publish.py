"""A finished run's results: the epoch Ray Train ranks best, the model published from its
checkpoint into the results folder, and that model scored on the test split. Training
runs, sweeps and soups publish the same way."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from raybm.storage.layout import HISTORY_FILE, METRICS_FILE, MODEL_CARD_FILE, MODEL_DIR, TRAIN_STATE_FILE
from raybm.storage.records import RunRecord
from raybm.storage.results import Results
from raybm.train.checkpoints import as_model_folder

if TYPE_CHECKING:
    from ray.data import Dataset
    from ray.train import Checkpoint, Result


def scored_checkpoint(result: Result) -> tuple[Any, dict | None]:
    """The checkpoint whose weights rank 0 scored on the test split, with the test metrics;
    ``(None, None)`` when it scored none or that checkpoint is not among those kept (Ray's
    best by the metric can differ from the loop's on a tie: both keep the first, but a
    checkpoint Ray deleted cannot be published)."""
    scored = (result.return_value or {}).get("test") if isinstance(result.return_value, dict) else None
    if not scored:
        return None, None
    for checkpoint, metrics in result.best_checkpoints or []:
        if (metrics or {}).get("epoch") == scored["epoch"]:
            return checkpoint, scored["metrics"]
    return None, None


def run_history(result: Result) -> list[dict[str, Any]]:
    """Every epoch's metrics: the loop carries the full history in each report (Ray keeps
    only the metrics of the checkpoints it retains)."""
    metrics = result.metrics or {}
    return json.loads(metrics["history"]) if "history" in metrics else []


def worker_nodes_of(history: list[dict[str, Any]]) -> list[str]:
    """The Ray node id of each rank in the last epoch (rank 0 first); [] before any epoch."""
    return json.loads(history[-1]["worker_nodes"]) if history and history[-1].get("worker_nodes") else []


def best_epoch(history: list[dict], metric: str, mode: str) -> int | None:
    """The epoch whose checkpoint Ray Train ranks best by ``metric``: on a tie, the later one."""
    scored = [h for h in history if metric in h]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return int(pick(reversed(scored), key=lambda h: h[metric])["epoch"])


def publish_model(results: Results, run_dir: str, checkpoint: Checkpoint) -> str:
    """Copy a checkpoint (minus optimizer state; a LoRA run's adapters merged into the base
    model) to <run_dir>/model, atomically."""
    final = results.join(run_dir, MODEL_DIR)

    def build(folder: str) -> None:
        as_model_folder(checkpoint.to_directory(folder))  # LoRA: merged; FSDP: the shards joined
        if os.path.exists(os.path.join(folder, TRAIN_STATE_FILE)):
            os.remove(os.path.join(folder, TRAIN_STATE_FILE))

    results.publish(final, build, local_build=True)  # _SUCCESS last: a replica never loads half a model
    return results.uri(final)


def score_model_uri(
    results: Results, model_uri: str, ds: Dataset, max_length: int, predictions_to: str | None = None
) -> dict[str, Any]:
    """Score a model folder (local or in the results store) on a Dataset; with
    ``predictions_to`` (a path in the results store) also write every example's prediction
    there as Parquet (``PREDICTIONS_FILE``)."""
    from raybm.inference.evaluate import score_dataset

    # An s3:// model is fetched by each scoring task on its own node (on a cluster the
    # driver's disk is not theirs).
    if predictions_to is None:
        return score_dataset(model_uri, ds, max_length, storage=results.storage)
    metrics, frame = score_dataset(model_uri, ds, max_length, predictions=True, storage=results.storage)
    results.write_parquet(predictions_to, frame)
    return metrics


def run_artifacts(results: Results, run_dir: str, dataset: str) -> dict[str, str]:
    """A finished run's files worth keeping beside its record elsewhere (MLflow): the model
    card, the test metrics, the confusion matrix, the epochs, the data report; name -> text."""
    path = results.join(run_dir, METRICS_FILE)
    metrics = RunRecord.from_json(results.read_json(path), results.uri(path))
    test = metrics.test or {}
    out = {
        "model_card.md": results.read_text(results.join(run_dir, MODEL_DIR, MODEL_CARD_FILE)),
        METRICS_FILE: json.dumps(metrics.to_json(), indent=2),
        "confusion_matrix.json": json.dumps(
            {"labels": list(test.get("per_class") or {}), "matrix": test.get("confusion_matrix")}, indent=2
        ),
        HISTORY_FILE: results.read_text(results.join(run_dir, HISTORY_FILE)),
    }
    try:
        out["data_report.json"] = json.dumps(results.dataset_report(dataset).to_json(), indent=2)
    except (OSError, ValueError):  # a soup's or an external dataset: no report to add
        pass
    return out
