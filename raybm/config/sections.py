"""The config sections of where a job runs and what it reads: storage, Ray, data, model.

Each field carries its documentation as an attribute docstring (the string right below
it); ``raybm.config.describe`` reads them back for ``raybm config --describe``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _opt(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with numeric bounds checked at load time."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"bounds": bounds})
    return field(default=default, metadata={"bounds": bounds})


@dataclass
class StorageConfig:
    """Where results live: a local folder or ``s3://``, and how to reach S3."""

    root: str = "results"
    """Results folder shared by every stage and the dashboard: a local path or
    ``s3://bucket/prefix``. Layout: docs/results.md."""
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, a local test server ...). Empty: the
    ``AWS_ENDPOINT_URL`` environment variable, else AWS itself."""
    s3_region: str | None = None
    """S3 region. Empty: ``AWS_DEFAULT_REGION``, else us-east-1."""
    lease_ttl_s: float = _opt(60.0, ge=5)
    """A job writing a run, sweep, dataset or export holds its folder's ``_LEASE`` and renews
    it every third of this; a lease not renewed for this long (its job died) is taken over."""


@dataclass
class RayConfig:
    """Which Ray a job runs on: a cluster to join, or a local Ray and its size."""

    address: str | None = None
    """Ray cluster to join (``auto``, ``ray://host:10001`` ...). Empty: ``RAY_ADDRESS`` if
    set, otherwise the job starts a local Ray (the embedded default)."""
    num_cpus: int | None = _opt(None, ge=1)
    """CPUs for a local Ray. Empty: all of this machine's."""
    autoscaling: bool = False
    """The cluster adds nodes on demand (an autoscaler, as with cluster.yaml): work that no
    node can hold now is not refused up front; it waits up to ``train.placement_timeout_s``
    for a node to join. Off: such work is refused before it starts, naming the setting."""
    dashboard: bool = False
    """Start the Ray dashboard with a local Ray (http://127.0.0.1:8265, loopback only), to
    watch its tasks, actors and logs while a job runs. Off by default: it adds about 2 s
    to every start and takes a share of a core while the job runs. A cluster's head
    decides for itself (cluster.yaml starts it)."""


@dataclass
class CleanConfig:
    """Text cleaning of the data stage."""

    html: bool = True
    """Remove HTML tags and unescape entities (``&amp;`` -> ``&``)."""
    urls: bool = True
    """Remove URLs (http://, https://, www.)."""
    mentions: bool = True
    """Remove @mentions."""
    special_chars: bool = False
    """Remove characters that are neither letters, digits, whitespace nor basic
    punctuation. Off by default: emoticons and ``!`` carry sentiment."""
    whitespace: bool = True
    """Collapse runs of whitespace and trim."""
    fix_mojibake: bool = True
    """Repair mis-decoded text with ftfy; for the twitter corpus also its known
    corrupted quote and apostrophe sequences."""
    lowercase: bool = False
    """Lowercase the text. Off by default: the tokenizer decides casing."""
    stop_words: bool = False
    """Remove English stop words. Off by default: negations such as "not" are stop
    words, and dropping them flips sentiment. English text only."""


@dataclass
class AugmentConfig:
    """Training-time text augmentation."""

    enabled: bool = False
    """Augment training texts (never validation or test). Seeded by ``data.seed``. A "word"
    below is a word in text written with spaces, a character in Chinese, Japanese or Korean."""
    crop_prob: float = _opt(0.1, ge=0, le=1)
    """Chance to keep only a random contiguous window of a text's words."""
    crop_min_ratio: float = _opt(0.7, gt=0, le=1)
    """Smallest share of words a crop keeps."""
    pad_prob: float = _opt(0.1, ge=0, le=1)
    """Chance to insert random padding tokens into a text."""
    pad_max_tokens: int = _opt(3, ge=1)
    """Most padding tokens inserted into one text."""
    replace_prob: float = _opt(0.05, ge=0, le=1)
    """Chance, per word, to replace it with the tokenizer's mask token."""
    delete_prob: float = _opt(0.05, ge=0, lt=1)
    """Chance, per word, to delete it (a text always keeps one word)."""


@dataclass
class DataConfig:
    """The data stage: the source, its columns and labels, the split, tokenization."""

    source: str = "twitter-sentiment"
    """Built-in corpus (``twitter-sentiment``, ``chinese-reviews``) or user files: a
    file, a folder or a glob, local or ``s3://``, in CSV, TSV, JSONL or Parquet."""
    name: str | None = None
    """Name of the prepared dataset under ``<root>/data/``. Empty: derived from the
    source and a hash of this section, so a changed config never reuses old data."""
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    """File format. ``auto``: from the file extension."""
    text_column: str = "text"
    """Column holding the text (user files)."""
    label_column: str = "label"
    """Column holding the label (user files)."""
    encoding: str = "utf-8"
    """Character encoding of CSV, TSV and JSONL files."""
    labels: list[str] | None = None
    """Class names in id order (id 0 first). Empty: the built-in corpus's default, or
    every label found in user files, sorted."""
    label_values: dict[str, str] = field(default_factory=dict)
    """Map raw label values to class names, e.g. ``{"0": negative, "4": positive}``."""
    exclude_labels: list[str] = field(default_factory=list)
    """Raw label values whose rows are dropped (and counted). For built-in corpora every
    label not in ``labels`` is excluded."""
    language: Literal["auto", "en", "zh"] = "auto"
    """Text language, used by stop-word removal. ``auto``: the built-in corpus's, else en."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Cleaning steps, each switchable."""
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train, validation and test shares; they must add up to 1."""
    seed: int = 0
    """Seed of the split and of augmentation. Same seed, same split, on any machine."""
    max_rows: int | None = _opt(None, ge=3)
    """Keep at most this many rows after de-duplication (a seeded, stratified sample).
    For quick runs; empty keeps all."""
    max_length: int = _opt(128, ge=8, le=8192)
    """Longest token sequence; longer texts are truncated (the report says how many)."""
    padding: Literal["longest", "max_length"] = "longest"
    """``longest``: pad each training batch to its longest text (fast on CPU);
    ``max_length``: pad every text to ``max_length`` (fixed shapes)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training-only text augmentation."""


@dataclass
class ModelConfig:
    """The base model and how its classifier is built."""

    name: str = "all-minilm-l6-v2"
    """Base model: ``all-minilm-l6-v2`` (shipped offline), a tiny random model for tests and
    smoke runs (``tiny-bert``, ``tiny-roberta``, ``tiny-distilbert``, ``tiny-deberta-v2``,
    ``tiny-electra``, ``tiny-modernbert``, ``tiny-gpt2``, ``tiny-qwen2``, ``tiny-llama``,
    ``tiny-mistral``: 2 layers each), a local Hugging Face folder, or a hub name (only where
    the network allows)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub model. Off: only built-in architectures load."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """How the classifier reads the encoder: ``cls`` is the model's own sequence-classification
    head (first token; BERT's pooler); ``mean`` averages the token vectors, what
    sentence-transformers models (the built-in all-MiniLM-L6-v2) were trained for; ``auto``
    picks ``mean`` for sentence-transformers folders, else ``cls``."""
    keep_layers: int | None = _opt(None, ge=1)
    """Layer cropping: keep only the first K encoder layers. Empty keeps all."""
    head_init: Literal["default", "xavier", "normal"] = "default"
    """Re-initialize the classification head: the model's own init, Xavier uniform, or
    normal (std 0.02)."""
    hidden_dropout: float | None = _opt(None, ge=0, lt=1)
    """Override the encoder's hidden dropout. Empty keeps the model's."""
    attention_dropout: float | None = _opt(None, ge=0, lt=1)
    """Override the attention dropout. Empty keeps the model's."""
    classifier_dropout: float | None = _opt(None, ge=0, lt=1)
    """Override the dropout before the classification head. Empty keeps the model's."""


@dataclass
class TrackingConfig:
    """Where runs and sweeps are also recorded: MLflow (TensorBoard files are always written)."""

    mlflow_uri: str | None = None
    """MLflow tracking: an ``http(s)://`` tracking server or a ``file:`` folder. Every run is
    an MLflow run, a sweep a parent run with a child per trial (config as params, each
    epoch's metrics, tags, the card and reports as artifacts). Empty: no MLflow."""
    experiment: str = "raybm"
    """MLflow experiment the runs go into (made if missing)."""
    required: bool = True
    """A tracking server that does not answer fails the job before Ray starts; false: say so
    once and go on without MLflow."""
    register: bool = True
    """With ``mlflow_uri``: the pipeline registers the model it trained (a sweep's winner)
    in MLflow's Model Registry as a new version, with its test metrics and its export
    variants; ``raybm predict/serve/export --model models:/<name>/<version>`` load it."""
    registered_model: str | None = None
    """The registered model's name; empty: ``<data source>-classifier`` (e.g.
    ``twitter-classifier``), or ``data.name`` when set."""
