"""Driver side of sweeps: ``run_sweep`` searches config values with Ray Tune.

Each trial is a Tune function trainable that builds and fits one ``TorchTrainer`` from the
training stage, with ``TuneReportCallback`` forwarding every epoch's validation metrics
(and the checkpoint path) to Tune, so ASHA or the median rule can stop weak trials early.
This is Ray 2.60's supported pattern; a Trainer handed to a Tuner is not.

Layout under ``sweeps/<sweep>/`` (docs/tuning.md)::

    config.yaml           the resolved job config, search space included
    tune/                 Tune's experiment state (what --resume restores)
    trials/<trial_id>/    each trial's Ray Train run: checkpoints
    leaderboard.csv/.json every trial: searched values, best metric, epochs, status, time
    model/                the winner's best checkpoint, or the soup of the best trials
                          (tune.soup; complete or absent)
    winner.json           pointer to the winner: trial, values, checkpoint, soup, test metrics
    _SUCCESS
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raybm.config import JobConfig, build_config, merge_raw, sweep_name_for
from raybm.errors import RaybmError
from raybm.lease import hold_lease
from raybm.results import (CONFIG_FILE, LEADERBOARD, MODEL_DIR, SWEEPS, TRIALS_DIR, TUNE_DIR, WEIGHTS_FILE,
                           WINNER_FILE, Results)
from raybm.config.search_space import Distribution, grid_size, nested, parse_space

# Each trial's function only waits on its TorchTrainer; the workers reserve the real CPUs.
# It reserves memory, not a fraction of a CPU: fractions left on nodes add up to no node
# with a whole CPU for a 1-CPU worker (seen on a cluster of 1-CPU nodes).
TRIAL_DRIVER_MEMORY = 512 * 1024 * 1024
# Tokenizer actors of a trial that tokenizes its own data (two splits, 0.25 CPU each).
TRIAL_TOKENIZER_BUNDLES = [{"CPU": 0.25}, {"CPU": 0.25}]
# Serving-cost columns of the leaderboard (tune.measure_cost, tune.max_latency_ms).
COST_COLUMNS = ("params", "size_mb", "latency_p50_ms", "within_budget")
# Where and when a trial ran (the leaderboard files carry them; the printed table does not).
PLACEMENT_COLUMNS = ("worker_nodes", "started_at", "finished_at")
# Keys whose change needs the data tokenized again for each trial.
_TOKENIZATION_KEYS = ("data.", "model.name", "model.trust_remote_code")


@dataclass
class SweepResult:
    name: str
    sweep_dir: str  # URI
    model_dir: str  # URI of the winner's model folder
    leaderboard: list[dict[str, Any]]
    winner: dict[str, Any]


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> JobConfig:
    """The job config of one trial: the base config with the trial's sampled values."""
    raw = merge_raw(base, nested(params))
    raw["tune"] = dict(raw["tune"], search_space={})
    raw["pipeline"] = dict(raw.get("pipeline") or {}, stages=[])
    return build_config(raw)


# ------------------------------------------------------------------------- one trial


def _trial(params: dict[str, Any], *, base: dict[str, Any], labels: list[str], report: dict[str, Any],
           dataset: str, text_splits: dict, tokenized: dict | None, trials_path: str) -> None:
    """One Tune trial: a full Ray Train run of the trial's config; its workers read the
    prepared dataset ``dataset`` whole where they can (``train.data_feed``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raybm.train.driver import build_trainer, reads_whole_splits, tokenized_datasets

    cfg = trial_config(base, params)
    results = Results.from_config(cfg.storage)
    # The trial id is stable across a resumed sweep, so the Train run of the same name
    # picks up its own last checkpoint.
    run_name = ray.tune.get_context().get_trial_id()
    whole = reads_whole_splits(cfg, report)
    if whole:
        datasets = {}
    else:
        datasets = tokenized if tokenized is not None else tokenized_datasets(cfg, text_splits)
    trainer = build_trainer(cfg, labels=labels, report=report, datasets=datasets, run_name=run_name,
                            storage_path=trials_path, storage_filesystem=results.fs,
                            callbacks=[TuneReportCallback()], whole_splits=dataset if whole else None)
    trainer.fit()


def _release_placement_group(pg_hex: str | None) -> None:
    """Remove a trial's Ray Train placement group if it is still there."""
    if not pg_hex:
        return
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        pg_id = ray.PlacementGroupID(bytes.fromhex(pg_hex))
        if ray.util.placement_group_table(PlacementGroup(pg_id)).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(pg_id))
    except Exception:  # already gone
        pass


def _resource_releaser():
    """A Tune callback that frees a stopped trial's training workers.

    When the scheduler stops a trial, Tune ends the trial's actor at once, and the Ray
    Train run inside it never shuts its worker group down. Ray Train leaves the cleanup to
    a detached actor that polls the state API, which fails when the machine runs more than
    one Ray (and is slow under load); until then the stopped trial's CPUs or GPUs stay
    reserved and the next trials wait. Each training worker reports its placement group,
    so the driver removes it as soon as the trial ends.
    """
    from ray import tune

    class ReleaseTrialResources(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _release_placement_group((trial.last_result or {}).get("placement_group"))

        def on_trial_error(self, iteration, trials, trial, **info):
            _release_placement_group((trial.last_result or {}).get("placement_group"))

    return ReleaseTrialResources()


# --------------------------------------------------------------------------- sweeping


def _scheduler(cfg: JobConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    tc = cfg.tune
    # Trials report once per epoch; the epoch number (not Tune's report count) is the
    # clock, so a trial resumed from a checkpoint keeps its place.
    if tc.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=tc.grace_period,
                             reduction_factor=tc.reduction_factor)
    if tc.scheduler == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=tc.grace_period, min_samples_required=2)
    return FIFOScheduler()


def trial_bundles(cfg: JobConfig, tokenizes: bool) -> list[dict[str, float]]:
    """What one running trial holds, bundle by bundle: its workers, its tokenizer actors
    (the trial's own function reserves memory only)."""
    from raybm.train.resources import asks_for_gpus, worker_resources

    t = cfg.train
    return [worker_resources(t, asks_for_gpus(t.use_gpu))] * t.num_workers + (TRIAL_TOKENIZER_BUNDLES if tokenizes else [])


def concurrent_trials(cfg: JobConfig, tokenizes: bool) -> int:
    """Trials that fit the cluster at once (``tune.max_concurrent_trials`` wins if set)."""
    from raybm.placement import alive_nodes
    from raybm.runtime import cluster_address

    return trials_that_fit(cfg, trial_bundles(cfg, tokenizes), alive_nodes(), bool(cluster_address(cfg.ray)))


def trials_that_fit(cfg: JobConfig, bundles: list[dict[str, float]], nodes: list[dict[str, float]],
                    on_cluster: bool) -> int:
    """Trials whose bundles fit the nodes at once, node by node. GPU sweeps on an autoscaling
    cluster: ``tune.cluster_gpus`` over a trial's GPUs. At least 1."""
    from raybm.placement import copies_that_fit

    gpus = sum(b.get("GPU", 0.0) for b in bundles)
    if gpus and cfg.tune.cluster_gpus:
        fits = max(1, int(cfg.tune.cluster_gpus // gpus))
    else:
        fits = max(1, copies_that_fit(bundles, nodes))
    wanted = cfg.tune.max_concurrent_trials
    if not wanted:
        return fits
    # A local Ray cannot grow: trials beyond what fits would only wait for workers. A
    # cluster may autoscale, so there the setting is taken as given.
    if wanted > fits and not cfg.tune.cluster_gpus and not on_cluster:
        return fits
    return wanted


def run_sweep(cfg: JobConfig, *, resume: bool = False, retry_errored: bool = False,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep of ``cfg`` and hand on its winner, scored on test."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from raybm.data import run_data_stage
    from raybm.train.driver import load_prepared, load_text_splits, reads_whole_splits, training_datasets
    from raybm.train.resources import check_workers_fit

    dists = parse_space(cfg.tune.search_space)
    if not dists:
        raise RaybmError("tune.search_space is empty: add the settings to search to the config, e.g. "
                         "tune.search_space: {train.lr: 'loguniform(1e-5, 1e-3)'} (docs/tuning.md)")
    started = time.time()
    keys = [d.key for d in dists]
    # Trials share the tokenized data unless the search changes how it is tokenized.
    tokenizes = any(k.startswith(_TOKENIZATION_KEYS) for k in keys) or cfg.data.augment.enabled
    check_workers_fit(cfg, f"one trial ({cfg.train.num_workers} worker(s)"
                           f"{', plus 2 x 0.25 CPU of tokenizer actors' if tokenizes else ''})",
                      TRIAL_TOKENIZER_BUNDLES if tokenizes else None)
    prepared = run_data_stage(cfg, log=log)
    results = Results.from_config(cfg.storage)
    name = sweep_name_for(cfg, prepared.name)
    sweep_dir = results.sweep_dir(name)
    tune_path = results.join(sweep_dir, TUNE_DIR)
    can_restore = tune.Tuner.can_restore(tune_path,
                                         storage_filesystem=results.fs)
    # One writer per sweep: a second job with the same sweep name is refused while this one lives.
    with hold_lease(results, SWEEPS, name, f"sweep {name!r}", log=log):
        if results.is_complete(sweep_dir):
            done = load_sweep(results, name)
            if not (retry_errored and any(row["status"] == "error" for row in done.leaderboard)):
                log(f"Sweep {name!r} is already complete: {results.uri(sweep_dir)}")
                return done
            results.unmark_complete(sweep_dir)  # reopened to retry failed trials
        if resume and not can_restore:
            raise RaybmError(f"--resume: no interrupted sweep {name!r} under {results.uri(results.path('sweeps'))}; "
                             f"run without --resume to start it")
        # Read only now: a finished sweep needs no data (and reading asks Ray for CPUs).
        prepared, labels = load_prepared(cfg, log=log, prepared=prepared)
        # Trials share one tokenized copy, unless the search changes how text is tokenized.
        splits = load_text_splits(cfg, prepared) if tokenizes else None
        # Or none at all, where each trial's workers read the splits whole.
        tokenized = None if tokenizes or reads_whole_splits(cfg, prepared.report) else training_datasets(cfg, prepared)
        base = cfg.to_dict()
        # Each trial keeps (and reports) its best checkpoint by the sweep's metric.
        base["train"].update(metric=cfg.tune.metric, mode=cfg.tune.mode)
        trainable = tune.with_parameters(_trial, base=base, labels=labels, report=prepared.report,
                                         dataset=prepared.name, text_splits=splits, tokenized=tokenized,
                                         trials_path=results.join(sweep_dir, TRIALS_DIR))
        trainable = tune.with_resources(trainable, {"memory": TRIAL_DRIVER_MEMORY})
        concurrency = concurrent_trials(cfg, tokenizes)
        n_trials = cfg.tune.num_samples * grid_size(dists)
        results.write_text(results.join(sweep_dir, CONFIG_FILE), cfg.to_yaml())

        if can_restore:
            log(f"Resuming sweep {name!r}: finished trials are kept, unfinished ones continue from their "
                f"last checkpoint{'; failed trials are retried' if retry_errored else ''}")
            tuner = tune.Tuner.restore(tune_path, trainable,
                                       resume_unfinished=True, resume_errored=retry_errored,
                                       storage_filesystem=results.fs)
        else:
            log(f"Sweep {name!r}: {n_trials} trial(s) of {cfg.train.epochs} epoch(s), {cfg.tune.scheduler} scheduler, "
                f"up to {concurrency} at once, ranking by {cfg.tune.metric} ({cfg.tune.mode}) -> {results.uri(sweep_dir)}")
            for d in dists:
                log(f"  {d.key}: {d}")
            tuner = tune.Tuner(
                trainable,
                param_space={d.key: d.to_tune() for d in dists},
                tune_config=tune.TuneConfig(
                    metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=_scheduler(cfg),
                    num_samples=cfg.tune.num_samples,  # concurrency: the search generator's max_concurrent
                    time_budget_s=cfg.tune.time_budget_s,
                    search_alg=BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=concurrency),
                    trial_name_creator=lambda trial: trial.trial_id,
                    trial_dirname_creator=lambda trial: trial.trial_id,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR, storage_path=sweep_dir,  # stripped of s3://: the filesystem is given
                    storage_filesystem=results.fs,
                    failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                    callbacks=[_resource_releaser()],
                    verbose=1,
                ),
            )
        grid = tuner.fit()

        board = leaderboard(grid, cfg, dists, results, results.join(sweep_dir, TRIALS_DIR))
        finished = grid.num_terminated + grid.num_errors
        if finished < len(grid) and not cfg.tune.time_budget_s:
            raise RaybmError(f"sweep {name!r} was interrupted with {len(grid) - finished} trial(s) unfinished; "
                             f"run the same command with --resume to finish it")
        ranked = [row for row in board if row["best_checkpoint"] and row["status"] != "error"]
        if cfg.tune.measure_cost and ranked:
            measure_costs(cfg, ranked, log)
        ranked, budget = within_budget(ranked, cfg.tune.max_latency_ms)
        _write_leaderboard(results, sweep_dir, board)  # the callers print it (cli, pipeline)
        failed = [row for row in board if row["status"] == "error"]
        if not ranked:
            raise RaybmError(f"sweep {name!r}: no trial finished"
                             + (f"; {len(failed)} failed, the first with: {failed[0]['error']}" if failed else "")
                             + ". Fix the cause and run the same command with --resume --retry-errored")
        if failed:
            log(f"{len(failed)} trial(s) failed (first error: {failed[0]['error']}); the winner is the best of "
                f"the rest. --resume --retry-errored runs the failed ones again from their last checkpoint")
        if budget and not budget["met"]:
            log(f"No trial meets tune.max_latency_ms {budget['max_latency_ms']} (the fastest: "
                f"{budget['fastest_ms']} ms): the winner is the best trial regardless; winner.json says so")
        elif budget:
            log(f"{len(ranked)} trial(s) within tune.max_latency_ms {budget['max_latency_ms']}: the winner is the best of them")
        winner = _publish_winner(results, sweep_dir, cfg, prepared.name, ranked, log)
        winner["latency_budget"] = budget
        winner["sweep_seconds"] = round(time.time() - started, 1)
        results.write_json(results.join(sweep_dir, WINNER_FILE), winner)
        results.mark_complete(sweep_dir)
        return SweepResult(name, results.uri(sweep_dir), winner["model_dir"], board, winner)


def _status(error: str | None, history: list[dict], epochs: int) -> str:
    if error:
        return "error"
    if history and history[-1].get("early_stopped"):
        return "early-stopped"  # the training stage's patience
    if len(history) < epochs:
        return "stopped"  # by the scheduler (or the time budget)
    return "completed"


def _trial_history(res, metric: str) -> list[dict[str, Any]]:
    """Every epoch of a trial. The Train run carries its whole history in each report, so
    epochs from before a resume are kept (Tune's own record restarts with the trial)."""
    last = res.metrics or {}
    if last.get("history"):
        history = json.loads(last["history"])
    else:
        df = res.metrics_dataframe
        history = [] if df is None or df.empty else df.to_dict("records")
    return [h for h in history if h.get(metric) is not None
            and not (isinstance(h[metric], float) and math.isnan(h[metric]))]


def best_checkpoint(results: Results, run_dir: str, metric: str, mode: str) -> tuple[str | None, dict | None]:
    """The best complete checkpoint of a Train run by ``metric``, read from the epoch
    metrics each checkpoint carries: (path on results.fs, its metrics)."""
    import pyarrow.fs as pafs

    from raybm.train.checkpoints import CHECKPOINT_FILES
    from raybm.results import EPOCH_METRICS_FILE

    if not results.exists(run_dir):
        return None, None
    found = []
    for info in results.fs.get_file_info(pafs.FileSelector(run_dir)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        files = results.fs.get_file_info([results.join(info.path, f) for f in CHECKPOINT_FILES])
        if any(f.type == pafs.FileType.NotFound for f in files):
            continue  # an upload cut short (a lost node, a stopped job)
        try:
            m = results.read_json(results.join(info.path, EPOCH_METRICS_FILE))
        except (OSError, FileNotFoundError, ValueError):
            continue  # not a complete checkpoint
        if m.get(metric) is not None:
            found.append((info.path, m))
    if not found:
        return None, None
    found.sort(key=lambda pm: pm[1].get("epoch", 0), reverse=True)  # a tie goes to the later epoch, as in Ray Train
    pick = max if mode == "max" else min
    return pick(found, key=lambda pm: pm[1][metric])


def _trial_config(res) -> dict[str, Any]:
    """A trial's searched values. A trial the time budget ended before its first report has
    no metrics, so Tune's ``Result.config`` is None: they are read from its params.json."""
    if res.config:
        return res.config
    if not res.path:
        return {}
    try:
        with res.filesystem.open_input_stream(f"{res.path.rstrip('/')}/params.json") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def leaderboard(grid, cfg: JobConfig, dists: list[Distribution], results: Results,
                trials_dir: str) -> list[dict[str, Any]]:
    """One row per trial, best first (trials without a metric last)."""
    from raybm.train.driver import failure_reason
    from raybm.train.publish import worker_nodes_of
    from raybm.train.resources import asks_for_gpus, not_placed, placement_failure

    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for res in grid:
        history = _trial_history(res, metric)
        last = res.metrics or {}
        config = _trial_config(res)
        trial_id = last.get("trial_id") or (res.path.rstrip("/").rsplit("/", 1)[-1] if res.path else "?")
        checkpoint, best = best_checkpoint(results, results.join(trials_dir, trial_id), metric, mode)
        error = None
        if res.error is not None:
            error = placement_failure(cfg.train, asks_for_gpus(cfg.train.use_gpu)) if not_placed(res.error) \
                else failure_reason(res.error)
        rows.append({
            "trial": trial_id,
            **{d.key: config.get(d.key) for d in dists},
            metric: None if best is None else float(best[metric]),
            "best_epoch": None if best is None else int(best["epoch"]),
            "epochs_run": len(history),
            "status": _status(error, history, int(config.get("train.epochs") or cfg.train.epochs)),
            "val_accuracy": None if best is None else best.get("val_accuracy"),
            "val_loss": None if best is None else best.get("val_loss"),
            "best_checkpoint": None if checkpoint is None else results.uri(checkpoint),
            "seconds": round(float(last.get("time_total_s", 0.0)), 1),  # wall time (of the last attempt)
            "worker_nodes": worker_nodes_of(history),  # where the last epoch ran, rank 0 first
            "started_at": history[0].get("started_at") if history else None,
            "finished_at": history[-1].get("finished_at") if history else None,
            "error": error,
            "history": [{"epoch": int(h["epoch"]), metric: float(h[metric]),
                         "resumed_from_epoch": int(h.get("resumed_from_epoch", 0) or 0),
                         "val_loss": float(h.get("val_loss", float("nan"))),
                         "train_loss": float(h.get("train_loss", float("nan"))),
                         "worker_nodes": json.loads(h.get("worker_nodes") or "[]"),
                         "started_at": h.get("started_at"), "finished_at": h.get("finished_at")}
                        for h in history],
        })
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r[metric] is None, sign * (r[metric] or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def architecture(folder: str) -> tuple[str, int]:
    """(fingerprint, parameter count) of a checkpoint's weights: the names and shapes of its
    tensors, read from the safetensors header without loading them."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, WEIGHTS_FILE), framework="pt") as f:
        shapes = sorted((k, list(f.get_slice(k).get_shape())) for k in f.keys())
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16], sum(math.prod(s) for _, s in shapes)


def measure_costs(cfg: JobConfig, rows: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    """Add each row's serving cost: ``params``, ``size_mb`` (weights file) and
    ``latency_p50_ms`` (median single-sentence latency, PyTorch at 1 thread). Latency depends
    on the architecture only, so it is measured once per architecture, one after another on
    the driver (trials that share an architecture share the number, free of the noise of
    measuring them apart)."""
    import tempfile

    from raybm.export.measure import measure
    from raybm.results import copy_to_local, is_s3

    latency: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="raybm-cost-") as tmp:
        for row in rows:
            uri = row["best_checkpoint"]
            folder = copy_to_local(uri, cfg.storage, os.path.join(tmp, row["trial"])) if is_s3(uri) else uri
            key, params = architecture(folder)
            if key not in latency:
                latency[key] = measure(folder, "torch", None, None, cfg.tune.latency_samples)["latency_p50_ms"]
            row.update(params=params, size_mb=round(os.path.getsize(os.path.join(folder, WEIGHTS_FILE)) / 1e6, 2),
                       latency_p50_ms=latency[key])
            if folder != uri:
                shutil.rmtree(folder, ignore_errors=True)
    log(f"Serving cost measured for {len(rows)} trial(s), {len(latency)} architecture(s): median single-sentence "
        f"latency {', '.join(f'{v:.1f}' for v in sorted(latency.values()))} ms (PyTorch, 1 thread)")


def within_budget(ranked: list[dict[str, Any]], max_latency_ms: float | None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The ranked trials the winner may come from under a latency budget, best first, and
    what the budget did (None without one). Marks each row ``within_budget``. When no trial
    meets the budget, all of them stay (the best wins) and ``met`` is False."""
    if max_latency_ms is None or not ranked:
        return ranked, None
    for row in ranked:
        row["within_budget"] = row["latency_p50_ms"] <= max_latency_ms
    ok = [row for row in ranked if row["within_budget"]]
    budget = {"max_latency_ms": max_latency_ms, "met": bool(ok), "trials_within": len(ok),
              "fastest_ms": min(row["latency_p50_ms"] for row in ranked)}
    return (ok or ranked), budget


def _write_leaderboard(results: Results, sweep_dir: str, board: list[dict[str, Any]]) -> None:
    results.write_json(results.join(sweep_dir, f"{LEADERBOARD}.json"), board)
    flat = [{k: v for k, v in row.items() if k != "history"} for row in board]
    buf = io.StringIO()
    if flat:
        fields = list(dict.fromkeys(k for row in flat for k in row if k != "rank"))  # cost: finished trials only
        writer = csv.DictWriter(buf, fieldnames=["rank"] + fields)
        writer.writeheader()
        writer.writerows(flat)
    results.write_text(results.join(sweep_dir, f"{LEADERBOARD}.csv"), buf.getvalue())


def format_values(values: dict[str, Any]) -> str:
    """A trial's searched values on one line: ``train.lr=0.00013, train.seed=1``."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def format_leaderboard(board: list[dict[str, Any]], metric: str) -> str:
    """The leaderboard as a plain-text table."""
    if not board:
        return "(no trials)"
    fixed = ("rank", "trial", metric, "best_epoch", "epochs_run", "status", "seconds")
    cost = [k for k in COST_COLUMNS if any(k in row for row in board)]
    searched = [k for k in board[0] if k not in fixed and k not in COST_COLUMNS and k not in
                ("val_accuracy", "val_loss", "best_checkpoint", "error", "history", *PLACEMENT_COLUMNS)]
    cols = ["rank", "trial", *searched, metric, "best_epoch", "epochs_run", "status", *cost, "seconds"]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
        return str(v)

    table = [[c for c in cols]] + [[cell(row.get(c)) for c in cols] for row in board]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _publish_winner(results: Results, sweep_dir: str, cfg: JobConfig, dataset: str, ranked: list[dict[str, Any]],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Copy the winner's best checkpoint (or, with ``tune.soup``, the soup of the best trials)
    to <sweep>/model and score it on the test split."""
    import tempfile

    import ray.train

    from raybm.data import load_split
    from raybm.train.publish import publish_model, score_model_uri
    from raybm.results import PREDICTIONS_FILE

    row = ranked[0]
    metric = cfg.tune.metric
    log(f"Winner: trial {row['trial']} ({metric} {row[metric]:.4f} at epoch {row['best_epoch']})")
    soup = None
    with tempfile.TemporaryDirectory(prefix="raybm-soup-") as tmp:
        if cfg.tune.soup != "none" and len(ranked) > 1:
            soup = _make_soup(results, cfg, dataset, ranked[:cfg.tune.soup_size], tmp, log)
        if soup is not None and soup.used:
            checkpoint = ray.train.Checkpoint.from_directory(soup.folder)
            log(f"Handing on the {soup.method} soup of {len(soup.ingredients)} trial(s) "
                f"({', '.join(soup.ingredients)}): validation {soup.validation:.4f} against "
                f"{soup.best_single:.4f} for the best trial alone")
        else:
            if soup is not None:
                log("No other trial improved the soup: handing on the best trial alone")
            path = row["best_checkpoint"]
            if path.startswith("s3://"):
                path = path[len("s3://"):]
            checkpoint = ray.train.Checkpoint(path, filesystem=results.fs)
        model_uri = publish_model(results, sweep_dir, checkpoint)
    log("Scoring the winning model on the test split")
    test = score_model_uri(results, model_uri, load_split(results, dataset, "test"), cfg.data.max_length,
                           predictions_to=results.join(sweep_dir, PREDICTIONS_FILE))
    searched = {k: v for k, v in row.items() if k in cfg.tune.search_space}
    used = soup is not None and soup.used
    values = format_values(searched)
    notes = [f"a sweep of {len(ranked)} finished trial(s) over {', '.join(cfg.tune.search_space)}; trial "
             f"{row['trial']} ({values}) was best by validation {metric} ({row[metric]:.4f}, epoch {row['best_epoch']})"]
    if used:
        notes.append(f"handed on: the {soup.method} soup of trials {', '.join(soup.ingredients)} "
                     f"(validation {metric} {soup.validation:.4f})")
    if row.get("latency_p50_ms") is not None:
        notes.append(f"serving cost: {row.get('params', 0):,} parameters, {row.get('size_mb')} MB, median "
                     f"single-sentence latency {row['latency_p50_ms']} ms (PyTorch, 1 thread, measured on the driver)")
    from raybm.models.card import write_model_card

    write_model_card(results, results.join(sweep_dir, MODEL_DIR), name=os.path.basename(sweep_dir.rstrip("/")),
                     kind="sweep", dataset=dataset, test=test, notes=notes)
    return {"trial": row["trial"], "values": searched, "dataset": dataset, "model": cfg.model.name,
            "metric": metric, "validation": soup.validation if used else row[metric],
            "best_epoch": row["best_epoch"], "checkpoint": row["best_checkpoint"], "model_dir": model_uri,
            "soup": soup.to_dict() if soup is not None else None, "test": test,
            "cost": {k: row[k] for k in ("params", "size_mb", "latency_p50_ms") if k in row} or None}


def _make_soup(results: Results, cfg: JobConfig, dataset: str, rows: list[dict[str, Any]], workdir: str,
               log: Callable[[str], None]):
    """The soup of ``rows``' best checkpoints (best first), scored on the validation split."""
    from raybm.data import load_split
    from raybm.inference.evaluate import score_dataset
    from raybm.results import copy_to_local
    from raybm.metrics import soup_metric
    from raybm.tune.soup import make_soup

    candidates = [(r["trial"], copy_to_local(r["best_checkpoint"], cfg.storage, os.path.join(workdir, r["trial"])))
                  for r in rows]
    validation = load_split(results, dataset, "validation").materialize()
    return make_soup(candidates, lambda folder: score_dataset(folder, validation, cfg.data.max_length),
                     metric=soup_metric(cfg.tune.metric), mode=cfg.tune.mode, method=cfg.tune.soup,
                     workdir=workdir, log=log)


def load_sweep(results: Results, name: str) -> SweepResult:
    """A finished sweep's leaderboard and winner, as written."""
    sweep_dir = results.sweep_dir(name)
    board = results.read_json(results.join(sweep_dir, f"{LEADERBOARD}.json"))
    winner = results.read_json(results.join(sweep_dir, WINNER_FILE))
    return SweepResult(name, results.uri(sweep_dir), winner["model_dir"], board, winner)
