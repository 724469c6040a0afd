"""Runs and sweeps recorded in MLflow (``tracking.mlflow_uri``) besides the results folder.

Who logs: the driver, once a run (or a sweep) has ended, from what it has just written to
the results folder (each epoch's record, the test metrics, the model card, the data
report). The driver holds all of it whichever nodes trained, so workers need neither a
route to the tracking server nor its credentials, a lost worker node loses no record, and
a resumed run is logged once, whole (Ray's own MLflow callbacks log from the workers or
Tune's driver as results arrive, and know nothing of raybm's test split or card).

A run is an MLflow run: the resolved config as params (dotted keys), each epoch's metrics
at its epoch (``step_loss`` and ``step_lr`` at each optimizer step noted), the test
metrics, tags (dataset, base model, strategy, kind) and artifacts. A sweep is a parent run
with a child per trial (its status, whether the scheduler stopped it). A server that does
not answer fails the job before Ray starts (``check_tracking``), unless
``tracking.required=false``; a failure while logging is said and never fails the job.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from raybm.config import JobConfig, TrackingConfig
from raybm.errors import RaybmError

if TYPE_CHECKING:
    from mlflow import MlflowClient

EPOCH_METRICS = (
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_f1_macro",
    "val_precision_macro",
    "val_recall_macro",
    "lr",
    "samples_per_s",
)
TEST_METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "ece", "ece_calibrated")
_BATCH = {"params": 100, "metrics": 1000}  # MLflow's limits per log_batch call
_PARAM_CHARS = 6000
_skipped: set[str] = set()  # tracking URIs this process records nothing in (tracking.required=false, a failed check)


def _say(text: str) -> None:
    print(f"raybm: WARNING: {text}", file=sys.stderr, flush=True)


def check_tracking(cfg: TrackingConfig, timeout_s: float = 5.0) -> None:
    """Before Ray starts: the tracking URI is one raybm can use and its server answers
    (``GET /health``). Otherwise a RaybmError that says what to do, or, with
    ``tracking.required=false``, one warning and no MLflow for this job."""
    uri = cfg.mlflow_uri
    if not uri:
        return
    try:
        import mlflow.tracking  # noqa: F401 - the client this job will need
    except ImportError:
        raise RaybmError("tracking.mlflow_uri needs MLflow's client: pip install 'raybm[tracking]'") from None
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                return
        except (urllib.error.URLError, OSError) as e:
            problem = f"the MLflow tracking server at {uri} does not answer ({getattr(e, 'reason', e)})"
    elif uri.startswith("file:"):
        path = os.path.abspath(urllib.parse.urlparse(uri).path or ".")
        folder = path if os.path.isdir(path) else os.path.dirname(path)  # MLflow makes the store itself
        if os.path.isdir(folder) and os.access(folder, os.W_OK):
            return
        problem = f"tracking.mlflow_uri {uri}: {folder} is not a folder this job can write"
    else:
        raise RaybmError(f"tracking.mlflow_uri {uri!r}: give an http(s):// tracking server or a file: folder")
    if cfg.required:
        raise RaybmError(
            f"{problem}: start it, fix tracking.mlflow_uri, or set tracking.required=false to run without MLflow"
        )
    _skipped.add(uri)
    _say(f"{problem}; going on without MLflow (tracking.required=false)")


def mlflow_client(cfg: TrackingConfig) -> MlflowClient:
    """An MlflowClient for ``tracking.mlflow_uri``, its Model Registry at the same address
    (MLflow 3 would otherwise register in a ``mlflow.db`` of the current folder); None
    when MLflow is off for this job (unset, or a failed check with tracking.required=false)."""
    if not cfg.mlflow_uri or cfg.mlflow_uri in _skipped:
        return None
    if cfg.mlflow_uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked (maintenance mode)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise RaybmError("tracking.mlflow_uri needs MLflow's client: pip install 'raybm[tracking]'") from None
    return MlflowClient(tracking_uri=cfg.mlflow_uri, registry_uri=cfg.mlflow_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the MLflow experiment ``name``, made if missing."""

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another job made it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def flat_params(cfg: JobConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as text."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = (value if isinstance(value, str) else json.dumps(value))[:_PARAM_CHARS]

    walk("", cfg.to_dict())
    return out


def run_metrics(history: list[dict[str, Any]], test: dict[str, Any] | None) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp in ms, step) of a run: each epoch's metrics at its epoch, the
    training curve's points at their optimizer step, the test metrics at step 0."""
    out = []
    now = int(time.time() * 1000)
    for record in history:
        at = int(1000 * float(record.get("finished_at") or 0)) or now
        out += [
            (k, float(record[k]), at, int(record["epoch"]))
            for k in EPOCH_METRICS
            if isinstance(record.get(k), (int, float))
        ]
        for step, loss, lr in record.get("steps") or []:
            out += [("step_loss", float(loss), at, int(step)), ("step_lr", float(lr), at, int(step))]
    out += [
        (f"test_{k}", float((test or {})[k]), now, 0)
        for k in TEST_METRICS
        if isinstance((test or {}).get(k), (int, float))
    ]
    return out


def log_run(
    cfg: JobConfig,
    name: str,
    kind: str,
    history: list[dict[str, Any]],
    test: dict[str, Any] | None,
    artifacts: dict[str, str],
    tags: dict[str, str] | None = None,
    parent: str | None = None,
    status: str = "FINISHED",
) -> str | None:
    """Record a run, trial or sweep ``name`` in MLflow (``kind``: run, trial, sweep);
    ``tags`` beside raybm's own (kind, base model, strategy; ``raybm.dataset`` is the
    caller's); ``artifacts``: file name -> text. Returns the MLflow run id, or None when MLflow is off
    or could not be reached (said, never raised)."""
    client = mlflow_client(cfg.tracking)
    if client is None:
        return None
    from mlflow.entities import Metric, Param

    try:
        all_tags = {
            "raybm.kind": kind,
            "raybm.base_model": cfg.model.name,
            "raybm.strategy": cfg.train.strategy,
            **(tags or {}),
        }
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run_id = client.create_run(
            experiment_id(client, cfg.tracking.experiment), run_name=name, tags=all_tags
        ).info.run_id
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), _BATCH["params"]):
            client.log_batch(run_id, params=params[i : i + _BATCH["params"]])
        metrics = [Metric(k, v, at, step) for k, v, at, step in run_metrics(history, test)]
        for i in range(0, len(metrics), _BATCH["metrics"]):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH["metrics"]])
        for file_name, text in artifacts.items():
            client.log_text(run_id, text, file_name)
        client.set_terminated(run_id, status)
        return run_id
    except Exception as e:  # noqa: BLE001 - the results folder has it all; MLflow is a copy
        _say(f"could not record {kind} {name!r} in MLflow at {cfg.tracking.mlflow_uri}: {type(e).__name__}: {e}")
        return None
