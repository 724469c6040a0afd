"""Driver side of training: ``run_training`` builds and fits a ``TorchTrainer``.

1. prepare (or reuse) the data and tokenize it lazily on Ray Data,
2. fit a TorchTrainer whose workers run ``raybm.train.loop.train_loop_per_worker``,
3. copy the best checkpoint to ``runs/<run>/model`` and score it on the test split.

Re-running with the same run name resumes an interrupted run from its last checkpoint
(Ray Train restores the run's checkpoint state from storage).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import yaml

from raybm.config import JobConfig, run_name_for
from raybm.errors import RaybmError
from raybm.inference.loading import read_label_map
from raybm.metrics import drift_reference
from raybm.models.card import write_model_card
from raybm.runtime import on_cluster
from raybm.storage.layout import (
    CONFIG_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUNS,
    weight_files,
)
from raybm.storage.lease import hold_lease
from raybm.storage.records import DataReport, RunRecord
from raybm.storage.results import Results, job_for_workers
from raybm.tracking import log_run
from raybm.train.loop import train_loop_per_worker
from raybm.train.memory import check_memory_fits
from raybm.train.publish import (
    best_epoch,
    publish_model,
    run_artifacts,
    run_history,
    score_model_uri,
    scored_checkpoint,
    worker_nodes_of,
)
from raybm.train.resources import (
    asks_for_gpus,
    check_workers_fit,
    not_placed,
    placement_failure,
    torch_backend,
    worker_resources,
)
from raybm.train.tensorboard import write_events

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

    from raybm.data import PreparedData


@dataclass
class TrainResult:
    """What a training run made: its name and folder, the published model, its metrics."""

    run_name: str
    run_dir: str  # URI
    model_dir: str  # URI of the best model folder
    metrics: RunRecord  # what metrics.json says: the best epoch, the test scores
    history: list[dict[str, Any]]


def balanced_class_weights(report: DataReport, labels: list[str]) -> list[float]:
    """n / (classes x n_class) from the training split's label counts."""
    counts = report.label_counts("train")
    total = sum(counts[lab] for lab in labels)
    return [total / (len(labels) * max(1, counts[lab])) for lab in labels]


def load_prepared(
    cfg: JobConfig, *, log: Callable[[str], None] = print, prepared: PreparedData | None = None
) -> tuple[PreparedData, list[str]]:
    """Prepare (or reuse) the data, unless ``prepared`` already is; log its report and
    return (prepared, labels)."""
    from raybm.data import format_report, run_data_stage

    if prepared is None:
        prepared = run_data_stage(cfg, log=log)
    log(format_report(prepared.report))
    labels = Results.from_config(cfg.storage).dataset_label_map(prepared.name)["labels"]
    return prepared, labels


def load_text_splits(cfg: JobConfig, prepared: PreparedData) -> dict:
    """The training and validation splits' text and labels, in Ray's object store."""
    from raybm.data import load_split

    results = Results.from_config(cfg.storage)
    return {s: load_split(results, prepared.name, s).materialize() for s in ("train", "validation")}


def stored_ids_fit(cfg: JobConfig, report: DataReport) -> bool:
    """Whether the token ids stored with the prepared splits are what ``cfg`` trains on
    (same tokenizer and max_length; datasets prepared before ids were stored have none)."""
    tokens = report.tokens
    return (
        bool(tokens.get("ids_stored"))
        and tokens.get("model") == cfg.model.name
        and tokens.get("max_length") == cfg.data.max_length
    )


def reads_whole_splits(cfg: JobConfig, report: DataReport) -> bool:
    """Whether the workers read the splits whole from the results folder
    (``raybm.data.whole``) rather than through Ray Data: see ``train.data_feed``."""
    from raybm.data.whole import WHOLE_SPLIT_MAX_BYTES, whole_split_bytes

    feed = cfg.train.data_feed
    if feed == "ray_data" or cfg.data.augment.enabled:
        return False
    if not stored_ids_fit(cfg, report):
        if feed == "whole":
            tokens = report.tokens
            stored = (
                f"for {tokens.get('model')} at max_length {tokens.get('max_length')}"
                if tokens.get("ids_stored")
                else "none"
            )
            raise RaybmError(
                f"train.data_feed=whole needs the token ids stored with the prepared dataset for "
                f"{cfg.model.name} at max_length {cfg.data.max_length} (stored: {stored}); prepare "
                f"the data with this model (raybm data, same config) or set train.data_feed=auto"
            )
        return False
    return (
        feed == "whole" or whole_split_bytes(report.split_rows("train"), cfg.data.max_length) <= WHOLE_SPLIT_MAX_BYTES
    )


def training_datasets(cfg: JobConfig, prepared: PreparedData) -> dict:
    """The training and validation datasets the workers read, as token ids and labels.

    The ids the data stage stored are read as they are: no tokenizing. Otherwise both
    splits are tokenized once into Ray's object store, so no epoch tokenizes again. With
    augmentation the training split stays text: the workers augment it anew every epoch
    and tokenize it themselves (``raybm.data.tokenizing.AugmentCollate``)."""
    from raybm.data import load_split

    results = Results.from_config(cfg.storage)
    if stored_ids_fit(cfg, prepared.report):
        out = {
            s: load_split(results, prepared.name, s, columns=("input_ids", "label")).materialize()
            for s in ("train", "validation")
        }
        if cfg.data.augment.enabled:
            out["train"] = load_split(results, prepared.name, "train", columns=("text", "label")).materialize()
        return out
    return {name: ds.materialize() for name, ds in tokenized_datasets(cfg, load_text_splits(cfg, prepared)).items()}


def tokenized_datasets(cfg: JobConfig, splits: dict) -> dict:
    """Lazily tokenized training and validation datasets; with augmentation the training
    split stays text, which the workers augment per epoch and tokenize."""
    from raybm.data import tokenize_dataset

    train = (
        splits["train"]
        if cfg.data.augment.enabled
        else tokenize_dataset(splits["train"], cfg.data, cfg.model, cfg.storage)
    )
    return {"train": train, "validation": tokenize_dataset(splits["validation"], cfg.data, cfg.model, cfg.storage)}


def worker_config(
    cfg: JobConfig, labels: list[str], report: DataReport, predictions_to: str | None, whole_splits: str | None
) -> dict[str, Any]:
    """What every training worker is handed (``raybm.train.loop.run_worker``)."""
    return {
        "job": job_for_workers(cfg),
        "labels": labels,
        "n_train": report.split_rows("train"),
        "drift_reference": drift_reference(report.dataset, report.label_counts("train"), report.tokens),
        "class_weights": balanced_class_weights(report, labels) if cfg.train.class_weights == "balanced" else None,
        "predictions_to": predictions_to,
        "whole_splits": whole_splits,
    }


def build_trainer(
    cfg: JobConfig,
    *,
    labels: list[str],
    report: DataReport,
    datasets: dict,
    run_name: str,
    storage_path: str,
    storage_filesystem: pafs.FileSystem | None,
    callbacks: list | None = None,
    predictions_to: str | None = None,
    whole_splits: str | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one training run (a plain run or one sweep trial). With
    ``predictions_to`` (and a ``test`` dataset, or ``whole_splits``) rank 0 scores the best
    epoch on the test split and writes every prediction there. With ``whole_splits`` (a
    prepared dataset's name) the workers read that dataset's splits whole and ``datasets``
    is empty."""
    import ray.train

    from raybm.ray_patches import process_group_config, set_train_env, trainer_class

    t = cfg.train
    gpu = asks_for_gpus(t.use_gpu)
    cluster = on_cluster()
    # Bounded: Ray Train retries a worker group it cannot place every minute, without end.
    set_train_env(t.placement_timeout_s, cluster=cluster)
    trainer = trainer_class(
        ray_data=bool(datasets), autoscaling=cluster or bool(datasets), placement_group_cleaner=cluster
    )
    return trainer(
        train_loop_per_worker,
        train_loop_config=worker_config(cfg, labels, report, predictions_to, whole_splits),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=gpu, resources_per_worker=worker_resources(t, gpu)
        ),
        # Ray's TorchConfig would have the Train controller import torch (about 2 s here).
        torch_config=process_group_config(torch_backend(t, gpu)),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=t.metric, checkpoint_score_order=t.mode
            ),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures, controller_failure_limit=0),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        # Only the training split is sharded. Every worker validates on the whole
        # validation split: sharding it would either drop examples (equal shards) or, in
        # Ray 2.60, hang (unequal streaming shards), and every worker needs the same
        # numbers anyway to agree on early stopping.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


# Settings a rerun may change and still resume the same run: where and how it runs, how
# long (train on for more epochs), not what it trains.
RESUMABLE_KEYS = {
    "num_workers",
    "cpus_per_worker",
    "torch_threads",
    "use_gpu",
    "gpus_per_worker",
    "backend",
    "max_failures",
    "fail_at_epoch",
    "log_every_steps",
    "epochs",
    "early_stopping_patience",
    "keep_checkpoints",
    "worker_resources",
    "placement_timeout_s",
    "data_feed",
}


def recipe_differences(old: dict, new: dict) -> list[str]:
    """Dotted ``model.*`` / ``train.*`` keys whose values differ between two job dicts."""
    out = []
    for section in ("model", "train"):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RESUMABLE_KEYS:
                continue
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def check_same_recipe(results: Results, run_dir: str, run_name: str, cfg: JobConfig) -> None:
    """Refuse to resume a run that was started with another model or training recipe
    (Ray Train would resume it from its checkpoints without looking)."""
    path = results.join(run_dir, CONFIG_FILE)
    if not results.exists(path):
        return
    old = yaml.safe_load(results.read_text(path)) or {}
    diff = recipe_differences(old, cfg.to_dict())
    if diff:
        raise RaybmError(
            f"run {run_name!r} already exists in {results.uri(run_dir)} with another training "
            f"recipe ({'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}). Rerun with the same "
            f"settings to resume it, set another name, or delete the run folder."
        )


def failure_reason(e: BaseException) -> str:
    """The worker's own exception line out of Ray's wrapped error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def teacher_labels(folder: str | None) -> list[str] | None:
    """The labels of the ``train.distill_from`` teacher; a clear error, before any data or
    worker work, when the folder is not a raybm model folder."""
    if not folder:
        return None

    if weight_files(folder) is None:
        raise RaybmError(
            f"train.distill_from={folder}: no model.safetensors there; the teacher must be a "
            f"raybm model folder on this machine (a run's model/ folder)"
        )
    return read_label_map(folder)


def resume_hint(results: Results, run_dir: str) -> str:
    """What a rerun of a failed run does: resume, when the run wrote a checkpoint."""
    found = results.fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    return ": it resumes from the last checkpoint" if any(f.base_name.startswith("checkpoint_") for f in found) else ""


def _record_elsewhere(
    cfg: JobConfig,
    results: Results,
    run_dir: str,
    run_name: str,
    dataset: str,
    history: list[dict[str, Any]],
    test: dict[str, Any],
) -> None:
    """The run's curves as TensorBoard files in its folder, and the run in MLflow when set."""
    write_events(results, run_dir, history)
    log_run(
        cfg,
        run_name,
        "run",
        history,
        test,
        run_artifacts(results, run_dir, dataset),
        tags={"raybm.dataset": dataset, "raybm.results": results.uri(run_dir)},
    )


def run_training(cfg: JobConfig, *, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg`` end to end and return where the model and its test metrics are."""
    from raybm.data import load_split

    started = time.time()
    t = cfg.train
    teacher = teacher_labels(t.distill_from)
    check_workers_fit(cfg, f"training ({t.num_workers} worker(s))")
    check_memory_fits(cfg, asks_for_gpus(t.use_gpu), log)
    # 1. Data: prepared (and tokenized) once per dataset, then read by the workers.
    prepared, labels = load_prepared(cfg, log=log)
    if teacher is not None and teacher != labels:
        raise RaybmError(
            f"train.distill_from={t.distill_from}: the teacher's labels {teacher} differ from this "
            f"dataset's {labels}; distil from a model trained on the same labels"
        )
    results = Results.from_config(cfg.storage)

    # 2. The trainer: one worker per data-parallel replica.
    run_name = run_name_for(cfg, prepared.name)
    run_dir = results.run_dir(run_name)
    whole = reads_whole_splits(cfg, prepared.report)
    datasets = {} if whole else training_datasets(cfg, prepared)
    scores_test = worker_scores_test(cfg, prepared.report)
    predictions_to = results.join(run_dir, PREDICTIONS_FILE)
    if scores_test and not whole:
        datasets["test"] = load_split(
            results, prepared.name, "test", columns=("text", "label", "input_ids")
        ).materialize()
    trainer = build_trainer(
        cfg,
        labels=labels,
        report=prepared.report,
        datasets=datasets,
        run_name=run_name,
        storage_path=results.path(RUNS),
        storage_filesystem=results.fs,
        predictions_to=predictions_to if scores_test else None,
        whole_splits=prepared.name if whole else None,
    )
    log(
        f"Training run {run_name!r}: {cfg.model.name}, strategy {t.strategy}, {t.num_workers} worker(s)"
        f"{' on GPU' if asks_for_gpus(t.use_gpu) else ''}, {t.epochs} epoch(s), "
        f"{'splits read whole by each worker' if whole else 'splits streamed by Ray Data'} -> {results.uri(run_dir)}"
    )
    # One writer per run: a second job with the same run name is refused while this one lives.
    with hold_lease(results, RUNS, run_name, f"training run {run_name!r}", log=log) as lease:
        check_same_recipe(results, run_dir, run_name, cfg)
        results.unmark_complete(run_dir)  # a rerun: the old run no longer reads as complete while this one writes
        results.write_text(results.join(run_dir, CONFIG_FILE), cfg.to_yaml())
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError wraps the worker's exception
            if not_placed(e):
                raise RaybmError(
                    f"training run {run_name!r}: {placement_failure(t, asks_for_gpus(t.use_gpu))}"
                ) from None
            raise RaybmError(
                f"training run {run_name!r} failed: {failure_reason(e)}. Fix the cause and rerun the "
                f"same command{resume_hint(results, run_dir)}."
            ) from e
        history = run_history(result)
        # The epoch the workers scored on the test split, and its checkpoint (see scored_checkpoint).
        best, test = scored_checkpoint(result)
        if best is None:
            best = result.get_best_checkpoint(metric=t.metric, mode=t.mode) or result.checkpoint
        if best is None:
            raise RaybmError(f"training run {run_name!r} produced no checkpoint")

        # 3. Publish the best checkpoint as the run's model; score it on the test split
        # unless the workers already did.
        lease.check()  # fencing: nothing is published by a job that lost its lease
        model_uri = publish_model(results, run_dir, best)
        if test is None:
            log("Scoring the best checkpoint on the test split")
            test = score_model_uri(
                results,
                model_uri,
                load_split(results, prepared.name, "test"),
                cfg.data.max_length,
                predictions_to=predictions_to,
            )
        else:
            log(
                f"Scored the best checkpoint on the test split in the training worker: "
                f"accuracy {test['accuracy']:.4f}, macro-F1 {test['f1_macro']:.4f}"
            )
        metrics = RunRecord(
            run=run_name,
            dataset=prepared.name,
            model=cfg.model.name,
            best_epoch=best_epoch(history, t.metric, t.mode),
            epochs_run=len(history),
            early_stopped=bool(history and history[-1].get("early_stopped")),
            worker_nodes=worker_nodes_of(history),
            train_seconds=round(time.time() - started, 1),
            test=test,
        )
        results.write_json(results.join(run_dir, HISTORY_FILE), history)
        results.write_json(results.join(run_dir, METRICS_FILE), metrics.to_json())
        chosen = next((h for h in history if h.get("epoch") == metrics.best_epoch), {})
        notes = (
            [
                f"the checkpoint of epoch {metrics.best_epoch} of {len(history)}, best by validation {t.metric} "
                f"({chosen[t.metric]:.4f})"
            ]
            if t.metric in chosen
            else []
        )
        write_model_card(
            results,
            results.join(run_dir, MODEL_DIR),
            name=run_name,
            kind="run",
            dataset=prepared.name,
            test=test,
            notes=notes,
            trained_precision=chosen.get("precision"),
        )
        _record_elsewhere(cfg, results, run_dir, run_name, prepared.name, history, test)
        lease.check()
        results.mark_complete(run_dir)
        return TrainResult(run_name, results.uri(run_dir), model_uri, metrics, history)


def worker_scores_test(cfg: JobConfig, report: DataReport) -> bool:
    """Whether rank 0 scores the best epoch on the test split once training ends (from the
    stored token ids); if not, the driver scores the published model instead: ids stored
    for another tokenizer or length, or FSDP (rank 0 alone cannot run a sharded model, and
    a whole copy next to its shard may not fit)."""
    return stored_ids_fit(cfg, report) and cfg.train.parallelism != "fsdp"
