"""What the dashboard shows, read from a results folder (local or ``s3://``).

Everything goes through ``Results`` and its filesystem. A page asks for a run, sweep,
dataset or export by name, and a name is accepted only if it is one of the folders the
listing found, so nothing a user picks can point outside the results root. Only JSON,
YAML and Parquet are read; nothing is unpickled.
"""

from __future__ import annotations

import io
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.storage.layout import (
    CONFIG_FILE,
    EXPORTS,
    HISTORY_FILE,
    LEADERBOARD_JSON,
    METRICS_FILE,
    MOBILE_DIR,
    MODEL_DIR,
    PIPELINES,
    PREDICTIONS_FILE,
    RUNS,
    SUCCESS_MARKER,
    SUMMARY_FILE,
    SWEEPS,
    VARIANT_FILE,
    WINNER_FILE,
)
from raybm.storage.model_cache import fetch_model
from raybm.storage.records import DataReport, LeaderboardRow, PipelineSummary, PublishedModel, R, RunRecord, Winner
from raybm.storage.results import Results

KINDS = (RUNS, SWEEPS)


@dataclass
class Job:
    """One run or sweep as the dashboard lists it."""

    kind: str  # run | sweep
    name: str
    complete: bool
    started: float | None
    finished: float | None
    base_model: str | None
    dataset: str | None
    metric: str | None
    best: float | None
    test_accuracy: float | None
    test_f1: float | None

    @property
    def seconds(self) -> float | None:
        """How long the job ran, when its start and end are known."""
        return self.finished - self.started if self.started and self.finished else None


def stages_in_brief(stages: dict[str, dict[str, Any]]) -> str:
    """A pipeline's stages in a few words: ``all 5 done``, else the count done and each
    other stage by its status (``3 done; held: deploy``), so the table fits a window."""
    done = [k for k, v in stages.items() if v.get("status") == "done"]
    if done and len(done) == len(stages):
        return f"all {len(done)} done"
    others: dict[str, list[str]] = {}
    for k, v in stages.items():
        if v.get("status") != "done":
            others.setdefault(str(v.get("status")), []).append(k)
    return "; ".join(
        [f"{len(done)} done"] * bool(done) + [f"{status}: {', '.join(names)}" for status, names in others.items()]
    )


class DashboardData:
    """What the dashboard reads from a results root (local or S3): jobs, sweeps, runs, exports."""

    def __init__(self, root: str, storage: StorageConfig | None = None) -> None:
        storage = storage or StorageConfig(root=root)
        self.results = Results(root, storage)
        self.root = root

    # -- safe access -------------------------------------------------------------------
    def _folders(self, kind: str) -> list[pafs.FileInfo]:
        base = self.results.path(kind)
        if not self.results.exists(base):
            return []
        return sorted(
            (
                i
                for i in self.results.fs.get_file_info(pafs.FileSelector(base))
                if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
            ),
            key=lambda i: i.base_name,
        )

    def _named(self, kind: str, name: str) -> str:
        """The folder of ``name`` under ``kind``, only if the listing has it."""
        for info in self._folders(kind):
            if info.base_name == name:
                return info.path
        raise RaybmError(f"no {kind[:-1]} named {name!r} under {self.root}")

    def _read_json(self, path: str) -> Any | None:
        return self.results.read_json(path) if self.results.exists(path) else None

    def _record(self, path: str, record: type[R]) -> R | None:
        """The record in the file at ``path``, or None when there is none (yet)."""
        raw = self._read_json(path)
        return None if raw is None else record.from_json(raw, self.results.uri(path))

    def _mtime(self, path: str) -> float | None:
        info = self.results.fs.get_file_info(path)
        return info.mtime.timestamp() if info.type != pafs.FileType.NotFound and info.mtime else None

    # -- listings ----------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        """Every complete run and sweep, with its scores."""
        out = []
        for kind in KINDS:
            for info in self._folders(kind):
                out.append(self._job(kind, info.path, info.base_name))
        return sorted(out, key=lambda j: j.started or 0, reverse=True)

    def _job(self, kind: str, folder: str, name: str) -> Job:
        j = self.results.join
        cfg = self._config(j(folder, CONFIG_FILE)) or {}
        done = self.results.exists(j(folder, SUCCESS_MARKER))
        if kind == RUNS:
            run = self._record(j(folder, METRICS_FILE), RunRecord)
            test, metric = (run.test if run else {}), (cfg.get("train") or {}).get("metric", "val_f1_macro")
            hist = self._read_json(j(folder, HISTORY_FILE)) or []
            vals = [h[metric] for h in hist if metric in h]
            best = (max(vals) if (cfg.get("train") or {}).get("mode", "max") == "max" else min(vals)) if vals else None
            if best is None and run is not None:  # a soup of runs (raybm soup): no epochs, its validation score
                best = (run.validation or {}).get(metric)
            dataset = run.dataset if run else None
        else:
            w = self._record(j(folder, WINNER_FILE), Winner)
            test, metric, best, dataset = (w.test, w.metric, w.validation, w.dataset) if w else ({}, None, None, None)
        return Job(
            kind=kind[:-1],
            name=name,
            complete=done,
            started=self._mtime(j(folder, CONFIG_FILE)),
            finished=self._mtime(j(folder, SUCCESS_MARKER)) if done else None,
            base_model=(cfg.get("model") or {}).get("name"),
            dataset=dataset,
            metric=metric,
            best=best,
            test_accuracy=(test or {}).get("accuracy"),
            test_f1=(test or {}).get("f1_macro"),
        )

    def jobs_frame(self) -> pd.DataFrame:
        """The jobs as a table, one row each, the scores first (the Jobs page and ``raybm list``)."""
        rows = []
        for job in self.jobs():
            rows.append(
                {
                    "name": job.name,
                    "test accuracy": job.test_accuracy,
                    "test macro-F1": job.test_f1,
                    "best validation": job.best,
                    "metric": job.metric,
                    "kind": job.kind,
                    "status": "complete" if job.complete else "incomplete",
                    "minutes": round(job.seconds / 60, 1) if job.seconds else None,
                    "started": pd.Timestamp(job.started, unit="s", tz="UTC") if job.started else None,
                    "base model": job.base_model,
                    "dataset": job.dataset,
                }
            )
        return pd.DataFrame(rows)

    def pipelines(self) -> list[PipelineSummary]:
        """Every pipeline's summary (``raybm pipeline`` / ``jobs/pipeline.py``), newest first."""
        out = []
        for info in self._folders(PIPELINES):
            summary = self._record(self.results.join(info.path, SUMMARY_FILE), PipelineSummary)
            if summary:
                out.append(summary)
        return sorted(out, key=lambda p: p.started_at, reverse=True)

    def pipelines_frame(self) -> pd.DataFrame:
        """Every pipeline with its stages' status, as a table."""
        rows = []
        for p in self.pipelines():
            stages = p.stages
            deploy = stages.get("deploy", {})
            model: dict = next((stages[k] for k in ("tune", "train") if k in stages), {})
            rows.append(
                {
                    "name": p.name,
                    "status": p.status,
                    "started": p.started_at[:16],
                    "stages": stages_in_brief(stages),
                    "test macro-F1": (model.get("test") or {}).get("f1_macro"),
                    "deploy": deploy.get("status"),
                    "gate": "; ".join(deploy.get("reasons", [])) or ("passed" if deploy.get("url") else None),
                    "url": deploy.get("url"),
                    "minutes": round(p.seconds / 60, 1) if p.seconds else None,
                }
            )
        return pd.DataFrame(rows)

    def _config(self, path: str) -> dict | None:
        return yaml.safe_load(self.results.read_text(path)) if self.results.exists(path) else None

    def names(self, kind: str, complete_only: bool = True) -> list[str]:
        """The names of one kind of artifact (``runs``, ``sweeps`` ...), complete ones only unless told."""
        return [i.base_name for i in self._folders(kind) if not complete_only or self.results.is_complete(i.path)]

    # -- one job -----------------------------------------------------------------------
    def sweep(self, name: str) -> dict[str, Any]:
        """A sweep's leaderboard, winner record and config."""
        folder = self._named(SWEEPS, name)
        j = self.results.join
        return {
            "leaderboard": [
                LeaderboardRow.from_json(row, self.results.uri(j(folder, LEADERBOARD_JSON)))
                for row in self._read_json(j(folder, LEADERBOARD_JSON)) or []
            ],
            "winner": self._record(j(folder, WINNER_FILE), Winner),
            "config": self._config(j(folder, CONFIG_FILE)),
        }

    def model_info(self, kind: str, name: str) -> dict[str, Any]:
        """Test metrics, dataset and config of a run's model or a sweep's winner."""
        folder = self._named(kind, name)
        j = self.results.join
        if kind == RUNS:
            record: PublishedModel | None = self._record(j(folder, METRICS_FILE), RunRecord)
        else:
            record = self._record(j(folder, WINNER_FILE), Winner)
        # the soup: none, or tried with nothing added, when the model is the best trial alone
        test, dataset, soup = (record.test, record.dataset, record.handed_on_soup) if record else (None, None, None)
        return {
            "test": test,
            "dataset": dataset,
            "soup": soup,
            "config": self._config(j(folder, CONFIG_FILE)),
            "model_dir": j(folder, MODEL_DIR),
            "history": self._read_json(j(folder, HISTORY_FILE)),
        }

    def predictions(self, kind: str, name: str) -> pd.DataFrame | None:
        """Every test example's prediction of a run or sweep (the Errors page), or None."""
        path = self.results.join(self._named(kind, name), PREDICTIONS_FILE)
        if not self.results.exists(path):
            return None
        return pq.read_table(path, filesystem=self.results.fs).to_pandas()

    def dataset_report(self, name: str | None) -> DataReport | None:
        """The data report of a prepared dataset."""
        if not name or name not in self.results.list_datasets():
            return None
        return self.results.dataset_report(name)

    def exports(self, name: str) -> dict | None:
        """``exports/<name>/summary.json`` for a run or sweep name, if it was exported."""
        for info in self._folders(EXPORTS):
            if info.base_name == name:
                return self._read_json(self.results.join(info.path, SUMMARY_FILE))
        return None

    def models(self) -> dict[str, str]:
        """Label -> model folder (in the results store) of every servable model."""
        out = {}
        for kind in KINDS:
            for name in self.names(kind):
                out[f"{name} ({kind[:-1]})"] = self.results.join(self._named(kind, name), MODEL_DIR)
        for info in self._folders(EXPORTS):
            for v in self.results.fs.get_file_info(pafs.FileSelector(info.path)):
                if (
                    v.type == pafs.FileType.Directory
                    and not v.base_name.startswith(".")
                    and v.base_name != MOBILE_DIR
                    and self.results.exists(self.results.join(v.path, VARIANT_FILE))
                ):
                    out[f"{info.base_name} / {v.base_name} (export)"] = v.path
        return out

    def model_title(self, choice: str) -> str:
        """A model of ``models()`` as a reader names it: what it does, on what data, how often
        it was right on held-out examples, and when it was made; e.g. "Twitter sentiment, 2
        classes, 89.5% right on held-out test texts (2 Dec 2026)"."""
        name, _, kind = choice.rpartition(" (")
        kind = kind.rstrip(")")
        if kind == "export":  # "<run or sweep> / <variant>"
            source, _, variant = name.partition(" / ")
            for k in KINDS:
                if source in self.names(k):
                    return f"{self.model_title(f'{source} ({k[:-1]})')}, as {variant}"
            return choice
        folder = f"{kind}s"
        info = self.model_info(folder, name)
        test = info["test"] or {}
        source = ((info["config"] or {}).get("data") or {}).get("source") or info["dataset"] or name
        # "twitter-sentiment" -> "Twitter sentiment"; a file or folder by its name
        task = posixpath.splitext(posixpath.basename(str(source).rstrip("/")))[0].replace("-", " ").replace("_", " ")
        task = task[:1].upper() + task[1:]
        classes = len(test.get("per_class") or {}) or None
        made = self._mtime(
            self.results.join(self._named(folder, name), METRICS_FILE if folder == RUNS else WINNER_FILE)
        )
        parts = [
            task,
            f"{classes} classes" if classes else None,
            f"{test['accuracy']:.1%} right on held-out test texts" if "accuracy" in test else "not tested yet",
        ]
        when = f" ({time.strftime('%-d %b %Y', time.localtime(made))})" if made else ""
        return ", ".join(p for p in parts if p) + when

    def local_model(self, path: str) -> str:
        """A local folder for a model in the store: on S3, this user's private cached copy,
        fetched again when the model there changes."""
        if not self.results.remote:
            return path
        return fetch_model(self.results.uri(path), self.results.storage)


def read_upload(name: str, content: bytes, max_rows: int, max_bytes: int) -> pd.DataFrame:
    """A user's CSV / TSV / JSONL upload as strings; clear errors, no silent truncation. The
    size is checked before parsing, and parsing stops one row past ``max_rows``."""
    too_many = (
        f"the limit here is {max_rows} rows and {max_bytes / 2**20:g} MB. Split the file, or label it "
        f"with `raybm predict --input {name} --output labelled.csv`"
    )
    if len(content) > max_bytes:
        raise RaybmError(f"{name} is {len(content) / 2**20:.1f} MB; {too_many}")
    ext = posixpath.splitext(name.lower())[1]
    try:
        if ext in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(
                io.BytesIO(content),
                sep="\t" if ext == ".tsv" else ",",
                dtype=str,
                keep_default_na=False,
                nrows=max_rows + 1,
            )
        elif ext in (".jsonl", ".json"):
            df = pd.read_json(io.BytesIO(content), lines=True, dtype=False, nrows=max_rows + 1)
        else:
            raise RaybmError(f"{name}: upload a .csv, .tsv or .jsonl file")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise RaybmError(f"{name} could not be read as {ext[1:].upper()}: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise RaybmError(f"{name} has no rows")
    if len(df) > max_rows:
        raise RaybmError(f"{name} has more than {max_rows} rows; {too_many}")
    return df
