"""Driver side of sweeps: ``run_sweep`` searches config values with Ray Tune.

Each trial is a Tune function trainable reporting every epoch's validation metrics (and
checkpoint) to Tune, so ASHA or the median rule can stop weak trials early. A trial of one
worker that reads the splits whole trains in the trial's own process; otherwise the trial
builds and fits one ``TorchTrainer`` from the training stage, with ``TuneReportCallback``
forwarding its reports (Ray 2.60's supported pattern; a Trainer handed to a Tuner is not).
``tune.trial_runner`` chooses (raybm.tune.trial).

Layout under ``sweeps/<sweep>/`` (docs/tuning.md)::
    config.yaml           the resolved job config, search space included
    tune/                 Tune's experiment state (what --resume restores); a trial that
                          trains in its own process keeps its checkpoints in tune/<trial_id>/
    trials/<trial_id>/    a trial's Ray Train run (tune.trial_runner=ray_train): checkpoints
    leaderboard.csv/.json every trial: searched values, best metric, epochs, status, time
    model/                the winner's best checkpoint, or the soup of the best trials
                          (tune.soup; complete or absent)
    winner.json           pointer to the winner: trial, values, checkpoint, soup, test metrics
    _SUCCESS
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raybm.config import JobConfig, sweep_name_for
from raybm.config.search_space import Distribution, grid_size, parse_space
from raybm.errors import RaybmError
from raybm.metrics import soup_metric
from raybm.models.card import write_model_card
from raybm.storage.fs import copy_to_local
from raybm.storage.layout import (
    CONFIG_FILE,
    LEADERBOARD_JSON,
    MODEL_CARD_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    SWEEPS,
    TRIALS_DIR,
    TUNE_DIR,
    WINNER_FILE,
)
from raybm.storage.lease import hold_lease
from raybm.storage.records import LeaderboardRow, Winner
from raybm.storage.results import Results, job_for_workers
from raybm.tracking import log_run
from raybm.train.checkpoints import as_model_folder
from raybm.train.driver import load_prepared, load_text_splits, reads_whole_splits, training_datasets
from raybm.train.memory import check_memory_fits, largest_trial
from raybm.train.publish import publish_model, score_model_uri
from raybm.train.resources import asks_for_gpus, check_workers_fit
from raybm.train.tensorboard import write_events
from raybm.tune.cost import measure_costs, within_budget
from raybm.tune.leaderboard import format_values, leaderboard, trial_histories, write_leaderboard
from raybm.tune.sealed_state import check_sealed, sealed_filesystem
from raybm.tune.soup import Soup, make_soup
from raybm.tune.trial import (
    IN_TRIAL,
    RAY_TRAIN,
    TRIAL_DRIVER_MEMORY,
    TRIAL_TOKENIZER_BUNDLES,
    concurrent_trials,
    in_trial_resources,
    resource_releaser,
    run_trial,
    run_trial_in_process,
    trial_config,
    trial_runner,
)

if TYPE_CHECKING:
    from ray.tune import Tuner
    from ray.tune.schedulers import TrialScheduler

    from raybm.data.pipeline import PreparedData

# Keys whose change needs the data tokenized again for each trial.
_TOKENIZATION_KEYS = ("data.", "model.name", "model.trust_remote_code")


@dataclass
class SweepResult:
    """What a sweep made: its name and folder, the winner's model, the leaderboard, the winner record."""

    name: str
    sweep_dir: str  # URI
    model_dir: str  # URI of the winner's model folder
    leaderboard: list[LeaderboardRow]
    winner: Winner


def _scheduler(cfg: JobConfig) -> TrialScheduler:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    tc = cfg.tune
    # Trials report once per epoch; the epoch number (not Tune's report count) is the
    # clock, so a trial resumed from a checkpoint keeps its place.
    if tc.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.epochs,
            grace_period=tc.grace_period,
            reduction_factor=tc.reduction_factor,
        )
    if tc.scheduler == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=tc.grace_period, min_samples_required=2)
    return FIFOScheduler()


def run_sweep(
    cfg: JobConfig, *, resume: bool = False, retry_errored: bool = False, log: Callable[[str], None] = print
) -> SweepResult:
    """Run (or resume) the sweep of ``cfg`` and hand on its winner, scored on test."""
    from ray import tune

    from raybm.data import run_data_stage

    dists = parse_space(cfg.tune.search_space)
    if not dists:
        raise RaybmError(
            "tune.search_space is empty: add the settings to search to the config, e.g. "
            "tune.search_space: {train.lr: 'loguniform(1e-5, 1e-3)'} (docs/tuning.md)"
        )
    started = time.time()
    # Trials share the tokenized data unless the search changes how it is tokenized.
    tokenizes = any(d.key.startswith(_TOKENIZATION_KEYS) for d in dists) or cfg.data.augment.enabled
    check_workers_fit(
        cfg,
        f"one trial ({cfg.train.num_workers} worker(s)"
        f"{', plus 2 x 0.25 CPU of tokenizer actors' if tokenizes else ''})",
        TRIAL_TOKENIZER_BUNDLES if tokenizes else None,
    )
    trial_runner(cfg, dists, tokenizes, whole=True)  # a tune.trial_runner the settings rule out: before any work
    check_memory_fits(
        largest_trial(cfg, dists),
        asks_for_gpus(cfg.train.use_gpu),
        lambda line: log(f"{line} (the sweep's most demanding trial)"),
    )
    prepared = run_data_stage(cfg, log=log)
    results = Results.from_config(cfg.storage)
    name = sweep_name_for(cfg, prepared.name)
    sweep_dir = results.sweep_dir(name)
    can_restore = tune.Tuner.can_restore(results.join(sweep_dir, TUNE_DIR), storage_filesystem=results.fs)
    if can_restore:  # before Ray reads any of it: Tune's state holds pickles (raybm.tune.sealed_state)
        check_sealed(results.fs, results.join(sweep_dir, TUNE_DIR), f"sweep {name!r}")
    # One writer per sweep: a second job with the same sweep name is refused while this one lives.
    with hold_lease(results, SWEEPS, name, f"sweep {name!r}", log=log) as lease:
        done = _finished_sweep(results, name, retry_errored)
        if done is not None:
            log(f"Sweep {name!r} is already complete: {results.uri(sweep_dir)}")
            return done
        if resume and not can_restore:
            raise RaybmError(
                f"--resume: no interrupted sweep {name!r} under {results.uri(results.path(SWEEPS))}; "
                f"run without --resume to start it"
            )
        trainable, prepared, runner = _trainable(cfg, prepared, results, sweep_dir, dists, tokenizes, log)
        results.write_text(results.join(sweep_dir, CONFIG_FILE), cfg.to_yaml())
        tuner = _tuner(
            cfg,
            trainable,
            dists,
            results,
            name,
            can_restore,
            concurrent_trials(cfg, tokenizes),
            retry_errored,
            runner,
            log,
        )
        grid = tuner.fit()
        # A trial's checkpoints: in its Ray Train run, or in Tune's trial folder (in_trial).
        trials_root = results.join(sweep_dir, TRIALS_DIR if runner != IN_TRIAL else TUNE_DIR)
        board = leaderboard(grid, cfg, dists, results, trials_root)
        for trial_id, history in trial_histories(grid, cfg.tune.metric).items():
            write_events(results, results.join(trials_root, trial_id), history)
        finished = grid.num_terminated + grid.num_errors
        if finished < len(grid) and not cfg.tune.time_budget_s:
            raise RaybmError(
                f"sweep {name!r} was interrupted with {len(grid) - finished} trial(s) unfinished; "
                f"run the same command with --resume to finish it"
            )
        ranked, budget = _rank(cfg, name, board, log)
        lease.check()  # fencing: nothing is published by a job that lost its lease
        write_leaderboard(results, sweep_dir, board)  # the callers print it (cli, pipeline)
        winner = _publish_winner(results, sweep_dir, cfg, prepared.name, ranked, log)
        winner.latency_budget = budget
        winner.sweep_seconds = round(time.time() - started, 1)
        lease.check()
        results.write_json(results.join(sweep_dir, WINNER_FILE), winner.to_json())
        log_sweep(cfg, name, dists, board, trial_histories(grid, cfg.tune.metric), winner, results, sweep_dir)
        results.mark_complete(sweep_dir)
        return SweepResult(name, results.uri(sweep_dir), winner.model_dir, board, winner)


def log_sweep(
    cfg: JobConfig,
    name: str,
    dists: list[Distribution],
    board: list[LeaderboardRow],
    histories: dict[str, list[dict[str, Any]]],
    winner: Winner,
    results: Results,
    sweep_dir: str,
) -> None:
    """Record the sweep in MLflow (``raybm.tracking``): a parent run (the config, the
    winner's test metrics, the leaderboard, the winner record and card) with a child run
    per trial (its searched values in its config, each epoch, its status)."""
    if not cfg.tracking.mlflow_uri:
        return
    tags = {"raybm.dataset": winner.dataset or "", "raybm.results": results.uri(sweep_dir)}
    card = results.join(sweep_dir, MODEL_DIR, MODEL_CARD_FILE)
    artifacts = {
        LEADERBOARD_JSON: json.dumps([row.to_json() for row in board], indent=2, default=str),
        WINNER_FILE: json.dumps(winner.to_json(), indent=2, default=str),
    }
    if results.exists(card):
        artifacts["model_card.md"] = results.read_text(card)
    parent = log_run(cfg, name, "sweep", [], winner.test, artifacts, tags={**tags, "raybm.winner": winner.trial})
    base = cfg.to_dict()
    for row in board:
        trial_cfg = trial_config(base, {k: v for k, v in row.searched([d.key for d in dists]).items() if v is not None})
        log_run(
            trial_cfg,
            row.trial,
            "trial",
            histories.get(row.trial, []),
            None,
            {},
            tags={
                **tags,
                "raybm.trial_status": row.status,
                "raybm.stopped_by_scheduler": str(row.status == "stopped").lower(),
            },
            parent=parent,
            status="FAILED" if row.status == "error" else "FINISHED",
        )


def _finished_sweep(results: Results, name: str, retry_errored: bool) -> SweepResult | None:
    """The sweep ``name`` when it is complete and nothing is to be retried; a complete sweep
    with failed trials and ``retry_errored`` is reopened (None)."""
    if not results.is_complete(results.sweep_dir(name)):
        return None
    done = load_sweep(results, name)
    if not (retry_errored and any(row.status == "error" for row in done.leaderboard)):
        return done
    results.unmark_complete(results.sweep_dir(name))  # reopened to retry failed trials
    return None


def _trainable(
    cfg: JobConfig,
    prepared: PreparedData | None,
    results: Results,
    sweep_dir: str,
    dists: list[Distribution],
    tokenizes: bool,
    log: Callable[[str], None],
) -> tuple[Any, PreparedData, str]:
    """(the trial function with the data it shares and its resources, the prepared dataset
    with its labels read, where the trials train: raybm.tune.trial.trial_runner). Read only
    now: a finished sweep needs no data (and reading asks Ray for CPUs)."""
    from ray import tune

    prepared, labels = load_prepared(cfg, log=log, prepared=prepared)
    whole = reads_whole_splits(cfg, prepared.report)
    runner = trial_runner(cfg, dists, tokenizes, whole)
    if runner == IN_TRIAL and cfg.tune.trial_runner == "auto" and results.exists(results.join(sweep_dir, TRIALS_DIR)):
        # A sweep begun with a worker group per trial (before raybm ran trials in their own
        # process) resumes as it began: its trials' checkpoints are in their Train runs.
        runner = RAY_TRAIN
    base = job_for_workers(cfg)
    # Each trial keeps (and reports) its best checkpoint by the sweep's metric.
    base["train"].update(metric=cfg.tune.metric, mode=cfg.tune.mode)
    if runner == IN_TRIAL:  # the trial's own process is its one worker, reading the splits whole
        log("Each trial trains in its own process (one worker, splits read whole: tune.trial_runner)")
        trainable = tune.with_parameters(
            run_trial_in_process, base=base, labels=labels, report=prepared.report, dataset=prepared.name
        )
        return tune.with_resources(trainable, in_trial_resources(cfg)), prepared, runner
    # Trials share one tokenized copy, unless the search changes how text is tokenized.
    splits = load_text_splits(cfg, prepared) if tokenizes else None
    # Or none at all, where each trial's workers read the splits whole.
    tokenized = None if tokenizes or whole else training_datasets(cfg, prepared)
    trainable = tune.with_parameters(
        run_trial,
        base=base,
        labels=labels,
        report=prepared.report,
        dataset=prepared.name,
        text_splits=splits,
        tokenized=tokenized,
        trials_path=results.join(sweep_dir, TRIALS_DIR),
    )
    return tune.with_resources(trainable, {"memory": TRIAL_DRIVER_MEMORY}), prepared, runner


def _tuner(
    cfg: JobConfig,
    trainable: Any,
    dists: list[Distribution],
    results: Results,
    name: str,
    can_restore: bool,
    concurrency: int,
    retry_errored: bool,
    runner: str,
    log: Callable[[str], None],
) -> Tuner:
    """The Ray Tune Tuner of the sweep: restored from its experiment state (finished trials
    kept, unfinished ones continued from their last checkpoint), or a new one."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from raybm.ray_patches import quiet_tune_sync_warning

    t = cfg.train
    failures = cfg.tune.max_failures
    checkpoints = None
    if runner == IN_TRIAL:
        # The trial is its worker: a worker failure is the trial's, retried by Tune from its
        # last checkpoint (as Ray Train would restart its worker group), and Tune keeps the
        # checkpoints by the sweep's metric.
        failures = -1 if -1 in (failures, t.max_failures) else failures + t.max_failures
        checkpoints = tune.CheckpointConfig(
            num_to_keep=t.keep_checkpoints,
            checkpoint_score_attribute=cfg.tune.metric,
            checkpoint_score_order=cfg.tune.mode,
        )
        # Tune then saves its experiment state at each checkpoint (so the ones it drops stay
        # dropped), and warns each time when epochs are short: that is the intended cost.
        quiet_tune_sync_warning()

    sweep_dir = results.sweep_dir(name)
    # Tune's own state is sealed as it is written and checked as it is read back.
    state_fs = sealed_filesystem(results.fs, results.join(sweep_dir, TUNE_DIR))
    if can_restore:
        log(
            f"Resuming sweep {name!r}: finished trials are kept, unfinished ones continue from the "
            f"last checkpoint Tune recorded{'; failed trials are retried' if retry_errored else ''}"
        )
        return tune.Tuner.restore(
            results.join(sweep_dir, TUNE_DIR),
            trainable,
            resume_unfinished=True,
            resume_errored=retry_errored,
            storage_filesystem=state_fs,
        )
    n_trials = cfg.tune.num_samples * grid_size(dists)
    log(
        f"Sweep {name!r}: {n_trials} trial(s) of {cfg.train.epochs} epoch(s), {cfg.tune.scheduler} scheduler, "
        f"up to {concurrency} at once, ranking by {cfg.tune.metric} ({cfg.tune.mode}) -> {results.uri(sweep_dir)}"
    )
    for d in dists:
        log(f"  {d.key}: {d}")
    return tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune() for d in dists},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            scheduler=_scheduler(cfg),
            num_samples=cfg.tune.num_samples,  # concurrency: the search generator's max_concurrent
            time_budget_s=cfg.tune.time_budget_s,
            search_alg=BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrency),
            trial_name_creator=lambda trial: trial.trial_id,
            trial_dirname_creator=lambda trial: trial.trial_id,
            # A trial that trains in its own process hands that process, its imports done
            # (torch, transformers: seconds), to the next trial. A trial the scheduler stops
            # ends at its next report, so nothing of it lingers there.
            reuse_actors=runner == IN_TRIAL,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=sweep_dir,  # stripped of s3://: the filesystem is given
            storage_filesystem=state_fs,
            failure_config=tune.FailureConfig(max_failures=failures),
            checkpoint_config=checkpoints,
            callbacks=[resource_releaser()],
            verbose=1,
        ),
    )


def _rank(
    cfg: JobConfig, name: str, board: list[LeaderboardRow], log: Callable[[str], None]
) -> tuple[list[LeaderboardRow], dict | None]:
    """(the trials that may win, best first; the latency budget's outcome): finished trials
    with a checkpoint, their serving cost measured when asked, within the budget when one
    is set. A RaybmError when no trial finished."""
    ranked = [row for row in board if row.best_checkpoint and row.status != "error"]
    if cfg.tune.measure_cost and ranked:
        measure_costs(cfg, ranked, log)
    ranked, budget = within_budget(ranked, cfg.tune.max_latency_ms)
    failed = [row for row in board if row.status == "error"]
    if not ranked:
        raise RaybmError(
            f"sweep {name!r}: no trial finished"
            + (f"; {len(failed)} failed, the first with: {failed[0].error}" if failed else "")
            + ". Fix the cause and run the same command with --resume --retry-errored"
        )
    if failed:
        log(
            f"{len(failed)} trial(s) failed (first error: {failed[0].error}); the winner is the best of "
            f"the rest. --resume --retry-errored runs the failed ones again from their last checkpoint"
        )
    if budget and not budget["met"]:
        log(
            f"No trial meets tune.max_latency_ms {budget['max_latency_ms']} (the fastest: "
            f"{budget['fastest_ms']} ms): the winner is the best trial regardless; winner.json says so"
        )
    elif budget:
        log(
            f"{len(ranked)} trial(s) within tune.max_latency_ms {budget['max_latency_ms']}: "
            "the winner is the best of them"
        )
    return ranked, budget


def _publish_winner(
    results: Results,
    sweep_dir: str,
    cfg: JobConfig,
    dataset: str,
    ranked: list[LeaderboardRow],
    log: Callable[[str], None],
) -> Winner:
    """Copy the winner's best checkpoint (or, with ``tune.soup``, the soup of the best trials)
    to <sweep>/model and score it on the test split."""
    import ray.train

    from raybm.data import load_split

    row = ranked[0]
    metric = cfg.tune.metric
    score = row.score() or 0.0
    log(f"Winner: trial {row.trial} ({metric} {score:.4f} at epoch {row.best_epoch})")
    soup = None
    with tempfile.TemporaryDirectory(prefix="raybm-soup-") as tmp:
        if cfg.tune.soup != "none" and len(ranked) > 1:
            soup = _make_soup(results, cfg, dataset, ranked[: cfg.tune.soup_size], tmp, log)
        if soup is not None and soup.used:
            checkpoint = ray.train.Checkpoint.from_directory(soup.folder)
            log(
                f"Handing on the {soup.method} soup of {len(soup.ingredients)} trial(s) "
                f"({', '.join(soup.ingredients)}): validation {soup.validation:.4f} against "
                f"{soup.best_single:.4f} for the best trial alone"
            )
        else:
            if soup is not None:
                log("No other trial improved the soup: handing on the best trial alone")
            path = row.best_checkpoint or ""
            if path.startswith("s3://"):
                path = path[len("s3://") :]
            checkpoint = ray.train.Checkpoint(path, filesystem=results.fs)
        model_uri = publish_model(results, sweep_dir, checkpoint)
    log("Scoring the winning model on the test split")
    test = score_model_uri(
        results,
        model_uri,
        load_split(results, dataset, "test"),
        cfg.data.max_length,
        predictions_to=results.join(sweep_dir, PREDICTIONS_FILE),
    )
    searched = row.searched(list(cfg.tune.search_space))
    used = soup if soup is not None and soup.used else None  # the soup handed on, if one was
    values = format_values(searched)
    notes = [
        f"a sweep of {len(ranked)} finished trial(s) over {', '.join(cfg.tune.search_space)}; trial "
        f"{row.trial} ({values}) was best by validation {metric} ({score:.4f}, epoch {row.best_epoch})"
    ]
    if used is not None:
        notes.append(
            f"handed on: the {used.method} soup of trials {', '.join(used.ingredients)} "
            f"(validation {metric} {used.validation:.4f})"
        )
    if row.latency_p50_ms is not None:
        notes.append(
            f"serving cost: {row.params or 0:,} parameters, {row.size_mb} MB, median "
            f"single-sentence latency {row.latency_p50_ms} ms (PyTorch, 1 thread, measured on the driver)"
        )

    write_model_card(
        results,
        results.join(sweep_dir, MODEL_DIR),
        name=os.path.basename(sweep_dir.rstrip("/")),
        kind="sweep",
        dataset=dataset,
        test=test,
        notes=notes,
        trained_precision=_trained_precision(
            [r for r in ranked if r.trial in used.ingredients] if used is not None else [row]
        ),
    )
    return Winner(
        trial=row.trial,
        values=searched,
        dataset=dataset,
        model=cfg.model.name,
        metric=metric,
        validation=used.validation if used is not None else row.score(),
        best_epoch=row.best_epoch,
        checkpoint=row.best_checkpoint,
        model_dir=model_uri,
        soup=soup.to_dict() if soup is not None else None,
        test=test,
        cost={k: row.get(k) for k in ("params", "size_mb", "latency_p50_ms") if row.get(k) is not None} or None,
    )


def _trained_precision(rows: list[LeaderboardRow]) -> str | None:
    """The precision the published weights trained in: their trials', when they agree."""
    found = {r.precision for r in rows}
    return found.pop() if len(found) == 1 else None


def _make_soup(
    results: Results, cfg: JobConfig, dataset: str, rows: list[LeaderboardRow], workdir: str, log: Callable[[str], None]
) -> Soup:
    """The soup of ``rows``' best checkpoints (best first), scored on the validation split."""
    from raybm.data import load_split
    from raybm.inference.evaluate import calibrate_folder, score_dataset

    candidates = [
        (r.trial, as_model_folder(copy_to_local(r.best_checkpoint or "", cfg.storage, os.path.join(workdir, r.trial))))
        for r in rows
    ]
    validation = load_split(results, dataset, "validation").materialize()
    soup = make_soup(
        candidates,
        lambda folder: score_dataset(folder, validation, cfg.data.max_length),
        metric=soup_metric(cfg.tune.metric),
        mode=cfg.tune.mode,
        method=cfg.tune.soup,
        workdir=workdir,
        log=log,
    )
    calibrate_folder(soup.folder, validation, cfg.data.max_length)  # new weights: their own temperature
    return soup


def load_sweep(results: Results, name: str) -> SweepResult:
    """A finished sweep's leaderboard and winner, as written."""
    sweep_dir = results.sweep_dir(name)
    path = results.join(sweep_dir, LEADERBOARD_JSON)
    board = [LeaderboardRow.from_json(row, results.uri(path)) for row in results.read_json(path)]
    path = results.join(sweep_dir, WINNER_FILE)
    winner = Winner.from_json(results.read_json(path), results.uri(path))
    return SweepResult(name, results.uri(sweep_dir), winner.model_dir, board, winner)
