"""The leaderboard of a sweep: every trial with its searched values, best metric, epochs,
status, time and where it ran, read from Tune's results; written as CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from raybm.config import JobConfig
from raybm.config.search_space import Distribution
from raybm.storage.layout import EPOCH_METRICS_FILE, LEADERBOARD_CSV, LEADERBOARD_JSON, SHARDS_DIR, SHARDS_INDEX_FILE
from raybm.storage.records import FORMAT_KEY, LEADERBOARD_FIELDS, LeaderboardRow
from raybm.storage.results import Results
from raybm.train.checkpoints import CHECKPOINT_FILES, CHECKPOINT_WEIGHTS
from raybm.train.driver import failure_reason
from raybm.train.publish import worker_nodes_of
from raybm.train.resources import asks_for_gpus, not_placed, placement_failure
from raybm.train.sharded import shards_complete

if TYPE_CHECKING:
    from ray.tune import Result, ResultGrid

# Serving-cost columns of the leaderboard (tune.measure_cost, tune.max_latency_ms).
COST_COLUMNS = ("params", "size_mb", "latency_p50_ms", "within_budget")


def _status(error: str | None, history: list[dict], epochs: int) -> str:
    if error:
        return "error"
    if history and history[-1].get("early_stopped"):
        return "early-stopped"  # the training stage's patience
    if len(history) < epochs:
        return "stopped"  # by the scheduler (or the time budget)
    return "completed"


def _trial_history(res: Result, metric: str) -> list[dict[str, Any]]:
    """Every epoch of a trial. The Train run carries its whole history in each report, so
    epochs from before a resume are kept (Tune's own record restarts with the trial)."""
    last = res.metrics or {}
    if last.get("history"):
        history = json.loads(last["history"])
    else:
        df = res.metrics_dataframe
        history = [] if df is None or df.empty else df.to_dict("records")
    return [
        h for h in history if h.get(metric) is not None and not (isinstance(h[metric], float) and math.isnan(h[metric]))
    ]


def _trial_id(res: Result) -> str:
    last = res.metrics or {}
    return last.get("trial_id") or (res.path.rstrip("/").rsplit("/", 1)[-1] if res.path else "?")


def trial_histories(grid: ResultGrid, metric: str) -> dict[str, list[dict[str, Any]]]:
    """Every trial's epoch records (``history.json``'s form), by trial id."""
    return {_trial_id(res): _trial_history(res, metric) for res in grid}


def best_checkpoint(results: Results, run_dir: str, metric: str, mode: str) -> tuple[str | None, dict | None]:
    """The best complete checkpoint of a Train run by ``metric``, read from the epoch
    metrics each checkpoint carries: (path on results.fs, its metrics)."""
    if not results.exists(run_dir):
        return None, None
    found = []
    for info in results.fs.get_file_info(pafs.FileSelector(run_dir)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        files = results.fs.get_file_info([results.join(info.path, f) for f in CHECKPOINT_FILES])
        weights = results.fs.get_file_info([results.join(info.path, f) for f in CHECKPOINT_WEIGHTS])
        if (
            any(f.type == pafs.FileType.NotFound for f in files)
            or all(f.type == pafs.FileType.NotFound for f in weights)
            or not _shards_complete(results, info.path)
        ):
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


def _shards_complete(results: Results, checkpoint: str) -> bool:
    """Whether every rank's shard file of a sharded checkpoint is there (True for others)."""
    index = results.join(checkpoint, SHARDS_INDEX_FILE)
    if not results.exists(index):
        return True
    try:
        listed = results.read_json(index)
    except (OSError, ValueError):
        return False
    found = results.fs.get_file_info(pafs.FileSelector(results.join(checkpoint, SHARDS_DIR), allow_not_found=True))
    return shards_complete(listed, [f.base_name for f in found])


def _trial_config(res: Result) -> dict[str, Any]:
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


def leaderboard(
    grid: ResultGrid, cfg: JobConfig, dists: list[Distribution], results: Results, trials_dir: str
) -> list[LeaderboardRow]:
    """One row per trial, best first (trials without a metric last)."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for res in grid:
        history = _trial_history(res, metric)
        last = res.metrics or {}
        config = _trial_config(res)
        trial_id = _trial_id(res)
        checkpoint, best = best_checkpoint(results, results.join(trials_dir, trial_id), metric, mode)
        error = None
        if res.error is not None:
            error = (
                placement_failure(cfg.train, asks_for_gpus(cfg.train.use_gpu))
                if not_placed(res.error)
                else failure_reason(res.error)
            )
        score = None if best is None else float(best[metric])
        rows.append(
            LeaderboardRow(
                trial=trial_id,
                metric=metric,
                best_epoch=None if best is None else int(best["epoch"]),
                epochs_run=len(history),
                status=_status(error, history, int(config.get("train.epochs") or cfg.train.epochs)),
                val_accuracy=None if best is None else best.get("val_accuracy"),
                val_loss=None if best is None else best.get("val_loss"),
                best_checkpoint=None if checkpoint is None else results.uri(checkpoint),
                seconds=round(float(last.get("time_total_s", 0.0)), 1),  # wall time (of the last attempt)
                worker_nodes=worker_nodes_of(history),  # where the last epoch ran, rank 0 first
                precision=history[-1].get("precision") if history else None,  # what the loop ran in
                started_at=history[0].get("started_at") if history else None,
                finished_at=history[-1].get("finished_at") if history else None,
                error=error,
                history=[_epoch_entry(h, metric) for h in history],
                extra={
                    **{d.key: config.get(d.key) for d in dists},
                    **({} if metric in LEADERBOARD_FIELDS else {metric: score}),
                },
            )
        )
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r.score() is None, sign * (r.score() or 0.0)))
    for rank, row in enumerate(rows, 1):
        row.rank = rank
    return rows


def _epoch_entry(h: dict[str, Any], metric: str) -> dict[str, Any]:
    """One epoch of a trial's history as its row keeps it."""
    return {
        "epoch": int(h["epoch"]),
        metric: float(h[metric]),
        "resumed_from_epoch": int(h.get("resumed_from_epoch", 0) or 0),
        "val_loss": float(h.get("val_loss", float("nan"))),
        "train_loss": float(h.get("train_loss", float("nan"))),
        "worker_nodes": json.loads(h.get("worker_nodes") or "[]"),
        "started_at": h.get("started_at"),
        "finished_at": h.get("finished_at"),
    }


def write_leaderboard(results: Results, sweep_dir: str, board: list[LeaderboardRow]) -> None:
    """Write the leaderboard as JSON (with each trial's history) and CSV."""
    results.write_json(results.join(sweep_dir, LEADERBOARD_JSON), [row.to_json() for row in board])
    flat = [{k: v for k, v in row.to_json().items() if k not in ("history", FORMAT_KEY)} for row in board]
    buf = io.StringIO()
    if flat:
        fields = list(dict.fromkeys(k for row in flat for k in row if k != "rank"))  # cost: finished trials only
        writer = csv.DictWriter(buf, fieldnames=["rank"] + fields)
        writer.writeheader()
        writer.writerows(flat)
    results.write_text(results.join(sweep_dir, LEADERBOARD_CSV), buf.getvalue())


def format_values(values: dict[str, Any]) -> str:
    """A trial's searched values on one line: ``train.lr=0.00013, train.seed=1``."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def format_leaderboard(board: list[LeaderboardRow], metric: str) -> str:
    """The leaderboard as a plain-text table."""
    if not board:
        return "(no trials)"
    cost = [k for k in COST_COLUMNS if any(row.get(k) is not None for row in board)]
    searched = list(board[0].searched())
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
