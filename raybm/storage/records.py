"""The records stages hand each other, typed: what the data stage says of a prepared dataset
(``report.json``), what a run (``metrics.json``) and a sweep (``winner.json``) say about
the model they published, and the soup either may have made.

Each record is a dataclass with ``from_json`` (a file's content: checked, a field the file
lacks at its default, fields this raybm does not know kept as they are) and ``to_json``
(what is written, with its format's ``version``). A record written by a newer raybm, in a
version of its format this one does not know, is refused with what to do; a file from
before versions were written reads as version 1. Readers use the fields, never another
stage's keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard, TypeVar

from raybm.errors import RaybmError

FORMAT_KEY = "version"

R = TypeVar("R", bound="Record")


@dataclass(kw_only=True)
class Record:
    """What every record does: read from and written as JSON, with its format's version."""

    FORMAT: ClassVar[int] = 1
    WHAT: ClassVar[str] = "record"
    extra: dict[str, Any] = field(default_factory=dict)  # fields this raybm does not know

    @classmethod
    def from_json(cls: type[R], raw: Any, where: str = "") -> R:
        """The record in ``raw`` (a file's parsed JSON); ``where`` names the file in errors."""
        at = f" ({where})" if where else ""
        if not isinstance(raw, dict):
            raise RaybmError(
                f"{cls.WHAT}{at} is not a JSON object; the file is damaged: run the stage that wrote it again"
            )
        version = raw.get(FORMAT_KEY, 1)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.FORMAT:
            raise RaybmError(
                f"{cls.WHAT}{at} is version {version!r} of its format, which this raybm does not read (it reads "
                f"version {cls.FORMAT} and older): it was written by a newer raybm; upgrade raybm to read it"
            )
        known = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        values = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k != FORMAT_KEY}
        return cls(**values, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The record as written: its format, its fields, then the fields it was read with
        and does not know."""
        out: dict[str, Any] = {FORMAT_KEY: self.FORMAT}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}


@dataclass(kw_only=True)
class DataReport(Record):
    """``data/<dataset>/report.json``: what the data stage read, dropped and kept, the splits'
    sizes and label counts, and the token lengths under the model's tokenizer."""

    WHAT: ClassVar[str] = "a dataset's report.json"
    dataset: str = ""
    source: str | None = None  # data.source as configured
    format: str | None = None  # the source's file format
    files: list[str] = field(default_factory=list)
    config_hash: str | None = None  # of everything that changes the prepared data
    created_at: str | None = None
    elapsed_s: float | None = None
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped, by reason
    dropped_total: int = 0
    duplicates_with_conflicting_labels: int = 0
    rows_kept: int = 0
    labels: list[str] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # rows, labels (counts), truncated
    tokens: dict[str, Any] = field(default_factory=dict)  # model, max_length, mean, p50..p99, max, ids_stored

    def split_rows(self, split: str) -> int:
        """How many rows the split holds."""
        return int((self.splits.get(split) or {}).get("rows", 0))

    def label_counts(self, split: str) -> dict[str, int]:
        """The split's rows per label."""
        return dict((self.splits.get(split) or {}).get("labels") or {})


@dataclass(kw_only=True)
class ExportManifest(Record):
    """``exports/<name>/<variant>/manifest.json``: how a variant was made, what it runs on,
    its size and (``export.measure``) how it scores and how fast it answers."""

    WHAT: ClassVar[str] = "an export variant's manifest.json"
    variant: str = ""
    backend: str = ""  # what loads it: torch, int8 or onnx
    source: str | None = None  # the model it was made from
    source_name: str | None = None
    base_model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the method and what it reached
    model_bytes: int = 0
    build_seconds: float | None = None
    created_at: str | None = None
    measured: dict[str, Any] = field(default_factory=dict)  # accuracy, f1_macro, latency_p50_ms, agreement ...


@dataclass(kw_only=True)
class PipelineSummary(Record):
    """``pipelines/<name>/summary.json``: a pipeline's stages as they ran, rewritten after each."""

    WHAT: ClassVar[str] = "a pipeline's summary.json"
    name: str = ""
    status: str = ""  # running, succeeded or failed
    stages_planned: list[str] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: status, seconds, what it made
    started_at: str = ""
    finished_at: str | None = None
    seconds: float | None = None
    root: str | None = None  # the results root
    ray: str | None = None  # the cluster's address, or the embedded local Ray
    gate: dict[str, Any] = field(default_factory=dict)  # the release gate's settings
    registered: dict[str, Any] | None = None  # the model's version in MLflow's Model Registry

    def trained_model(self) -> str | None:
        """The model the pipeline's sweep or run handed on (its URI), if one of them ran."""
        return next((self.stages[k].get("model") for k in ("tune", "train") if k in self.stages), None)


def soup_used(soup: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Whether a soup record (``soup`` of ``winner.json`` and ``metrics.json``) describes the
    model that was handed on: a uniform soup always, a greedy one when it kept more than
    one model."""
    return soup is not None and (len(soup.get("ingredients", [])) > 1 or soup.get("method") == "uniform")


@dataclass(kw_only=True)
class PublishedModel(Record):
    """What a run and a sweep both say about the model they published."""

    dataset: str | None = None  # the prepared dataset it was trained and scored on
    test: dict[str, Any] | None = None  # its scores on the test split
    model: str | None = None  # the base model's name
    soup: dict[str, Any] | None = None  # the soup made, if one was (handed on or not)

    @property
    def handed_on_soup(self) -> dict[str, Any] | None:
        """The soup record when the published model is that soup, else None."""
        return self.soup if soup_used(self.soup) else None


@dataclass(kw_only=True)
class RunRecord(PublishedModel):
    """``runs/<run>/metrics.json``: a training run (or a soup of runs) and its model's scores."""

    WHAT: ClassVar[str] = "a run's metrics.json"
    run: str = ""
    best_epoch: int | None = None
    epochs_run: int | None = None
    early_stopped: bool = False
    worker_nodes: list[str] = field(default_factory=list)
    train_seconds: float | None = None
    validation: dict[str, Any] | None = None  # a soup of runs: its validation score by metric


@dataclass(kw_only=True)
class Winner(PublishedModel):
    """``sweeps/<sweep>/winner.json``: the sweep's best trial, the model handed on and its scores."""

    WHAT: ClassVar[str] = "a sweep's winner.json"
    trial: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # the searched settings of the best trial
    metric: str = ""  # the sweep's validation metric
    validation: float | None = None  # the handed-on model's validation score
    best_epoch: int | None = None
    checkpoint: str | None = None  # the best trial's best checkpoint
    model_dir: str = ""  # the published model
    cost: dict[str, Any] | None = None  # the best trial's serving cost: params, size_mb, latency_p50_ms
    latency_budget: dict[str, Any] | None = None  # tune.max_latency_ms and whether a trial met it
    sweep_seconds: float | None = None

    @property
    def summary(self) -> dict[str, Any]:
        """What a model's card says of the sweep that chose it."""
        return {
            "trial": self.trial,
            "values": self.values,
            "metric": self.metric,
            "validation": self.validation,
            "best_epoch": self.best_epoch,
        }


@dataclass(kw_only=True)
class LeaderboardRow(Record):
    """One trial of a sweep (``sweeps/<sweep>/leaderboard.json`` is a list of them, best
    first; ``leaderboard.csv`` the same without the history). The trial's searched values
    (``train.lr``) and its score (under its metric's name, ``val_f1``) sit beside these
    fields under keys only the sweep's config names: they are in ``extra`` and read with
    ``get``, ``searched`` and ``score``."""

    WHAT: ClassVar[str] = "a leaderboard row"
    trial: str = ""
    rank: int | None = None
    metric: str | None = None  # the name of the score trials are ranked by (None: a file from before it was kept)
    best_epoch: int | None = None
    epochs_run: int = 0
    status: str = ""  # finished, stopped (by the scheduler or early stopping), error, running
    val_accuracy: float | None = None
    val_loss: float | None = None
    best_checkpoint: str | None = None  # URI of the trial's best checkpoint
    seconds: float = 0.0  # wall time of its last attempt
    worker_nodes: list[Any] = field(default_factory=list)  # where its last epoch ran, rank 0 first
    precision: str | None = None  # what its training steps computed in
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None  # why it failed, for people
    history: list[dict[str, Any]] = field(default_factory=list)  # each epoch: the score, losses, where, when
    params: int | None = None  # serving cost (tune.measure_cost): parameters, weights' MB, median latency
    size_mb: float | None = None
    latency_p50_ms: float | None = None
    within_budget: bool | None = None  # under tune.max_latency_ms (when one is set)

    def get(self, key: str) -> Any:
        """A field, a searched value or the score, by its key; None when the row has none."""
        return getattr(self, key) if key in LEADERBOARD_FIELDS else self.extra.get(key)

    def ranked_by(self) -> str:
        """The name of the score trials are ranked by: ``metric`` (a file from before it was
        kept: its first ``val_`` key beside the fields, else ``val_accuracy``)."""
        return self.metric or next((k for k in self.extra if k.startswith("val_")), "val_accuracy")

    def score(self) -> float | None:
        """The trial's best validation score (``ranked_by``)."""
        return self.get(self.ranked_by())

    def searched(self, keys: list[str] | None = None) -> dict[str, Any]:
        """The trial's searched values: of ``keys``, or every dotted key (``train.lr``) it has."""
        names = [k for k in self.extra if "." in k] if keys is None else keys
        return {k: self.extra[k] for k in names if k in self.extra}

    def to_json(self) -> dict[str, Any]:
        """As written: rank, trial, its searched values and score first (a table's reading order)."""
        out = super().to_json()
        first = {k: out[k] for k in (FORMAT_KEY, "rank", "trial") if k in out}
        return {**first, **self.extra, **{k: v for k, v in out.items() if k not in first and k not in self.extra}}


LEADERBOARD_FIELDS = frozenset(f.name for f in dataclasses.fields(LeaderboardRow) if f.name != "extra")
