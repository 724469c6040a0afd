"""Job configuration: one typed dataclass per stage, YAML files and dotted overrides.

A job config is a YAML file whose top-level sections match the fields of ``JobConfig``
(``data``, ``model``, ``train`` ...). Command-line overrides use the same dotted keys:
``train.lr=3e-5 data.max_length=64``. Every key is checked: an unknown key, a value of the
wrong type or out of range raises ``ConfigError`` naming the key and what is allowed.

Each field carries its documentation as an attribute docstring (the string right below
it); ``describe()`` reads them back for ``raybm config --describe``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from raybm.errors import ConfigError


def _opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
         ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with numeric bounds checked at load time."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"bounds": bounds})
    return field(default=default, metadata={"bounds": bounds})


# ----------------------------------------------------------------------------- sections


@dataclass
class StorageConfig:
    root: str = "results"
    """Results folder shared by every stage and the dashboard: a local path or
    ``s3://bucket/prefix``. Layout: docs/results.md."""
    s3_endpoint_url: Optional[str] = None
    """Endpoint of an S3-compatible store (MinIO, a local test server ...). Empty: the
    ``AWS_ENDPOINT_URL`` environment variable, else AWS itself."""
    s3_region: Optional[str] = None
    """S3 region. Empty: ``AWS_DEFAULT_REGION``, else us-east-1."""
    lease_ttl_s: float = _opt(60.0, ge=5)
    """A job writing a run, sweep, dataset or export holds its folder's ``_LEASE`` and renews
    it every third of this; a lease not renewed for this long (its job died) is taken over."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray cluster to join (``auto``, ``ray://host:10001`` ...). Empty: ``RAY_ADDRESS`` if
    set, otherwise the job starts a local Ray (the embedded default)."""
    num_cpus: Optional[int] = _opt(None, ge=1)
    """CPUs for a local Ray. Empty: all of this machine's."""
    autoscaling: bool = False
    """The cluster adds nodes on demand (an autoscaler, as with cluster.yaml): work that no
    node can hold now is not refused up front; it waits up to ``train.placement_timeout_s``
    for a node to join. Off: such work is refused before it starts, naming the setting."""


@dataclass
class CleanConfig:
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
    enabled: bool = False
    """Augment training texts (never validation or test). Seeded by ``data.seed``."""
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
    source: str = "twitter-sentiment"
    """Built-in corpus (``twitter-sentiment``, ``chinese-reviews``) or user files: a
    file, a folder or a glob, local or ``s3://``, in CSV, TSV, JSONL or Parquet."""
    name: Optional[str] = None
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
    labels: Optional[list[str]] = None
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
    max_rows: Optional[int] = _opt(None, ge=3)
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
    name: str = "all-minilm-l6-v2"
    """Base model: ``all-minilm-l6-v2`` (shipped offline), ``tiny-bert`` (a 2-layer random
    BERT for tests and smoke runs), a local Hugging Face folder, or a hub name (only where
    the network allows)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub model. Off: only built-in architectures load."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """How the classifier reads the encoder: ``cls`` is the model's own sequence-classification
    head (first token; BERT's pooler); ``mean`` averages the token vectors, what
    sentence-transformers models (the built-in all-MiniLM-L6-v2) were trained for; ``auto``
    picks ``mean`` for sentence-transformers folders, else ``cls``."""
    keep_layers: Optional[int] = _opt(None, ge=1)
    """Layer cropping: keep only the first K encoder layers. Empty keeps all."""
    head_init: Literal["default", "xavier", "normal"] = "default"
    """Re-initialize the classification head: the model's own init, Xavier uniform, or
    normal (std 0.02)."""
    hidden_dropout: Optional[float] = _opt(None, ge=0, lt=1)
    """Override the encoder's hidden dropout. Empty keeps the model's."""
    attention_dropout: Optional[float] = _opt(None, ge=0, lt=1)
    """Override the attention dropout. Empty keeps the model's."""
    classifier_dropout: Optional[float] = _opt(None, ge=0, lt=1)
    """Override the dropout before the classification head. Empty keeps the model's."""


@dataclass
class TrainConfig:
    epochs: int = _opt(3, ge=1)
    """Passes over the training split."""
    batch_size: int = _opt(32, ge=1)
    """Examples per step per worker."""
    eval_batch_size: int = _opt(64, ge=1)
    """Examples per batch when validating and testing."""
    max_steps_per_epoch: Optional[int] = _opt(None, ge=1)
    """Cap the optimizer steps of an epoch (quick runs). Empty: the whole split."""
    lr: float = _opt(5e-5, gt=0, le=1)
    """Peak learning rate (of the top layer, with layer-wise decay)."""
    optimizer: Literal["sgd", "momentum", "adagrad", "adadelta", "rmsprop", "adam", "adamw"] = "adamw"
    """Optimizer. ``momentum`` is SGD with ``train.momentum`` (Nesterov with ``train.nesterov``)."""
    momentum: float = _opt(0.9, ge=0, lt=1)
    """Momentum of ``momentum`` and ``rmsprop``."""
    nesterov: bool = False
    """Nesterov momentum for ``momentum``."""
    scheduler: Literal["constant", "step", "linear", "cosine"] = "linear"
    """Learning-rate schedule after warmup: constant, step decay, linear decay, cosine."""
    warmup_ratio: float = _opt(0.06, ge=0, lt=1)
    """Share of all steps spent warming the learning rate up linearly from 0."""
    step_epochs: int = _opt(1, ge=1)
    """``step`` schedule: multiply the learning rate by ``step_gamma`` every this many epochs."""
    step_gamma: float = _opt(0.5, gt=0, le=1)
    """``step`` schedule: the factor."""
    layerwise_lr_decay: float = _opt(1.0, gt=0, le=1)
    """Each layer below the top gets this factor times the learning rate of the one above
    (the head and top layer get ``lr``). 1 turns it off."""
    weight_decay: float = _opt(0.01, ge=0)
    """L2 regularization (decoupled for AdamW). Not applied to biases and LayerNorm."""
    l1: float = _opt(0.0, ge=0)
    """L1 penalty: this times the sum of |w| over trainable weights, added to the loss."""
    keep_sparsity: bool = False
    """Keep weights of Linear layers that are zero at the start at zero (fine-tuning a pruned model)."""
    distill_from: Optional[str] = None
    """Teacher model folder: train on its soft labels as well as the hard ones (knowledge distillation)."""
    distill_alpha: float = _opt(0.5, ge=0, le=1)
    """Weight of the soft-label (teacher) loss; 1 - alpha goes to the hard labels."""
    distill_temperature: float = _opt(2.0, gt=0)
    """Softmax temperature for the teacher's and student's soft labels."""
    label_smoothing: float = _opt(0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy loss."""
    class_weights: Literal["none", "balanced"] = "none"
    """``balanced`` weighs each class's loss by n / (classes x n_class) of the training split."""
    grad_clip: float = _opt(1.0, ge=0)
    """Clip the gradient norm to this; 0 turns clipping off."""
    grad_accum: int = _opt(1, ge=1)
    """Accumulate gradients over this many batches per optimizer step."""
    strategy: Literal["full", "partial", "gradual", "scratch"] = "full"
    """``full`` fine-tunes everything; ``partial`` freezes the embeddings and the lowest
    ``freeze_layers`` layers; ``gradual`` trains the head first and unfreezes one more layer
    from the top every ``unfreeze_every`` epochs; ``scratch`` trains the same architecture
    from random weights."""
    freeze_layers: int = _opt(0, ge=-1)
    """``partial``: encoder layers to freeze from the bottom; -1 freezes all but the head."""
    unfreeze_every: int = _opt(1, ge=1)
    """``gradual``: epochs between unfreezing one more layer."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision on GPU (``auto``: bf16 where supported, else fp16). CPU runs fp32."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """Data-parallel (DDP) or sharded (FSDP, for models that do not fit one device)."""
    num_workers: int = _opt(1, ge=1)
    """Ray Train workers (data-parallel)."""
    data_feed: Literal["auto", "whole", "ray_data"] = "auto"
    """How workers read the training and validation splits. ``whole``: each worker reads
    the token ids the data stage stored straight from the results folder, holds them in
    memory and shuffles the training split every epoch (no Ray Data in the loop: seconds
    less per run and per trial). ``ray_data``: Ray Data streams the splits to the workers
    (needed for augmentation and for splits larger than a worker's memory). ``auto``:
    ``whole`` when the stored ids fit the model and max_length, augmentation is off and the
    training split's ids take at most 512 MiB; ``ray_data`` otherwise."""
    cpus_per_worker: float = _opt(1.0, gt=0)
    """CPUs each worker reserves (leave some free for Ray Data)."""
    torch_threads: Optional[int] = _opt(None, ge=1)
    """Torch threads per worker. Empty: the worker's CPUs (at least 1)."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """Train on GPUs: ``auto`` uses them when the cluster has any."""
    gpus_per_worker: float = _opt(1.0, gt=0)
    """GPUs each worker reserves when training on GPU. Below 1, several workers share a GPU
    (small models; they then talk over gloo, since NCCL refuses two ranks on one GPU)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker reserves besides CPUs and GPUs, e.g.
    ``{accelerator_type:A10G: 0.001}`` to pin workers to a node type."""
    placement_timeout_s: float = _opt(120.0, gt=0)
    """How long a run (or trial) waits for its workers to be placed before it fails with an
    error naming the resources it asked for (Ray Train itself would retry without end)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend between workers. ``auto``: NCCL on GPUs (gloo when workers share a
    GPU), gloo on CPUs."""
    seed: int = 0
    """Seed of model initialization and dropout."""
    metric: str = "val_f1_macro"
    """Validation metric that picks the best checkpoint and drives early stopping."""
    mode: Literal["max", "min"] = "max"
    """Whether a higher or lower ``metric`` is better."""
    keep_checkpoints: int = _opt(2, ge=1)
    """Checkpoints kept (the best by ``metric``)."""
    early_stopping_patience: int = _opt(0, ge=0)
    """Stop after this many epochs without improvement; 0 turns it off."""
    max_failures: int = _opt(0, ge=-1)
    """Worker failures survived by restarting from the last checkpoint (-1: no limit)."""
    log_every_steps: int = _opt(20, ge=1)
    """Print progress every this many optimizer steps."""
    fail_at_epoch: Optional[int] = _opt(None, ge=2)
    """Test hook: raise in worker 0 when this epoch starts (once, from epoch 2, so a
    checkpoint exists), to test recovery."""


@dataclass
class TuneConfig:
    num_samples: int = _opt(4, ge=1)
    """Trials to sample (a search space with ``grid`` entries runs the grid this many times)."""
    metric: str = "val_f1_macro"
    """Validation metric that ranks trials (also picks each trial's best checkpoint)."""
    mode: Literal["max", "min"] = "max"
    """Whether a higher or a lower metric is better."""
    scheduler: Literal["asha", "median", "fifo"] = "asha"
    """Trial scheduler: ``asha`` stops weak trials early at rungs, ``median`` stops a trial
    below the median of others at the same epoch, ``fifo`` runs every trial to the end."""
    grace_period: int = _opt(1, ge=1)
    """Epochs every trial runs before the scheduler may stop it."""
    reduction_factor: float = _opt(2.0, gt=1)
    """ASHA: keep the top 1/this of trials at each rung."""
    max_concurrent_trials: Optional[int] = _opt(None, ge=1)
    """Trials running at once. Empty: as many as fit the cluster's GPUs (``tune.cluster_gpus``,
    or those it has now) or, on CPUs, its CPUs, given each trial's ``train.num_workers`` x
    ``train.gpus_per_worker`` (or ``train.cpus_per_worker``)."""
    cluster_gpus: Optional[int] = _opt(None, ge=1)
    """GPUs the sweep may use on an autoscaling cluster (its GPU workers' maximum, e.g. 16),
    which it does not have yet when the sweep starts. Empty: the GPUs the cluster has now."""
    time_budget_s: Optional[float] = _opt(None, gt=0)
    """Stop the sweep after this many seconds (running trials stop, the best so far wins)."""
    max_failures: int = _opt(0, ge=-1)
    """Times a failed trial is retried from its last checkpoint (-1: no limit)."""
    search_space: dict[str, str] = field(default_factory=dict)
    """Dotted config key -> distribution: ``uniform(lo, hi)``, ``loguniform(lo, hi)``,
    ``quniform(lo, hi, q)``, ``randint(lo, hi)``, ``lograndint(lo, hi)``, ``choice([...])``,
    ``grid([...])``; e.g. ``train.lr: loguniform(1e-5, 1e-3)``. Checked before any trial."""
    seed: Optional[int] = 0
    """Seed of the random search (empty: a different sample every sweep)."""
    soup: Literal["none", "greedy", "uniform"] = "none"
    """Hand on a model soup instead of the best trial alone: the best trials' weights averaged
    into one model of the same size and speed (docs/tuning.md). ``greedy`` adds trials best
    first and keeps each only if the validation metric does not drop, so it is never worse
    than the best trial on validation; ``uniform`` averages them all; ``none``: the best trial.
    Needs trials that share the architecture and pretrained start, and a classification
    score as ``tune.metric``."""
    soup_size: int = _opt(4, ge=2)
    """Most trials a soup considers (the best ones by ``tune.metric``)."""
    measure_cost: bool = True
    """After the sweep, measure each finished trial's serving cost on the driver, one
    architecture at a time: parameters, weights size (MB) and median single-sentence latency
    (PyTorch, 1 thread). Into the leaderboard and the dashboard."""
    max_latency_ms: Optional[float] = _opt(None, gt=0)
    """Latency budget: the winner (and a soup's ingredients) are the best trials whose median
    latency is at most this; the others stay on the leaderboard, marked. When no trial meets
    it, the best trial wins and ``winner.json`` says so. Needs ``tune.measure_cost``."""
    latency_samples: int = _opt(30, ge=5)
    """Single-sentence predictions timed per architecture (after 5 warm-up ones)."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP server binds. Another address than loopback (0.0.0.0 listens beyond
    this machine) needs an API key (api_key_env), or allow_without_key."""
    port: int = _opt(8000, ge=1, le=65535)
    """HTTP port."""
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    """Where Serve's HTTP proxies run on a cluster: on every node (put a load balancer in
    front), or on the head only (one address; a lost worker node costs no proxy)."""
    app_name: str = "raybm"
    """Serve application name (several models can be served side by side under different names)."""
    route_prefix: str = "/"
    """URL prefix of the API (e.g. /sentiment)."""
    backend: Literal["auto", "torch", "int8", "onnx"] = "auto"
    """Model backend: torch (fp32 weights; fp16 on GPU), int8 (PyTorch dynamic quantization, CPU),
    onnx (ONNX Runtime over an export variant's model.onnx, CPU); auto: what the folder is."""
    num_replicas: int = _opt(1, ge=1)
    """Model replicas (fixed). Set max_replicas to autoscale instead."""
    min_replicas: int = _opt(1, ge=0)
    """Autoscaling: fewest replicas (used when max_replicas is set)."""
    max_replicas: Optional[int] = _opt(None, ge=1)
    """Autoscaling: most replicas. Empty: a fixed num_replicas."""
    target_ongoing_requests: float = _opt(2.0, gt=0)
    """Autoscaling: ongoing requests per replica the autoscaler aims for."""
    cpus_per_replica: float = _opt(1.0, gt=0)
    """CPUs reserved for each replica."""
    gpus_per_replica: float = _opt(0.0, ge=0)
    """GPUs for each replica (fractions share a GPU). 0: CPU."""
    torch_threads: Optional[int] = _opt(None, ge=1)
    """Torch threads per replica. Empty: cpus_per_replica rounded down, at least 1."""
    max_batch_size: int = _opt(32, ge=1)
    """Most texts one model call takes; texts of concurrent requests are batched together."""
    batch_wait_timeout_s: float = _opt(0.01, ge=0)
    """How long a replica waits to fill a batch."""
    max_ongoing_requests: int = _opt(32, ge=1)
    """Requests a replica works on at once."""
    max_queued_requests: int = _opt(64, ge=0)
    """Requests queued beyond that; more are answered 503."""
    request_timeout_s: float = _opt(30.0, gt=0)
    """A request not answered in this time gets an error instead of waiting on."""
    max_texts: int = _opt(64, ge=1)
    """Most texts in one request (more: 413)."""
    max_text_chars: int = _opt(2000, ge=1)
    """Longest text in characters (longer: 422)."""
    max_body_bytes: int = _opt(1 << 20, ge=1024)
    """Largest request body in bytes (larger: 413)."""
    health_check_period_s: float = _opt(10.0, gt=0)
    """How often Serve checks each replica's model (a failing replica is replaced)."""
    health_check_timeout_s: float = _opt(30.0, gt=0)
    """How long a health check may take before the replica counts as failed."""
    api_key_env: Optional[str] = None
    """Environment variable holding an API key that /predict and /metadata require (header
    X-API-Key or Authorization: Bearer; at least 16 characters). Empty: no key."""
    allow_without_key: bool = False
    """Serve on a host other than loopback without an API key: anyone who reaches the port
    can use the model. Only behind your own gateway that checks callers."""


@dataclass
class ExportConfig:
    variants: list[Literal["hf", "onnx", "int8", "onnx-int8", "fp16", "pruned", "distilled"]] = field(
        default_factory=lambda: ["hf", "onnx", "int8", "onnx-int8"])
    """Variants to produce (pruned and distilled train on Ray Train; the others take seconds)."""
    opset: int = _opt(17, ge=13)
    """ONNX opset."""
    prune_sparsity: float = _opt(0.5, gt=0, lt=1)
    """Share of the encoder's and head's Linear weights magnitude pruning sets to zero."""
    prune_epochs: int = _opt(1, ge=1)
    """Fine-tuning epochs after pruning (zeros kept)."""
    prune_lr: float = _opt(3e-5, gt=0)
    """Learning rate of that fine-tune."""
    distill_layers: int = _opt(3, ge=1)
    """Encoder layers the distilled student keeps (the teacher's lowest layers to start from)."""
    distill_epochs: int = _opt(2, ge=1)
    """Epochs of student training."""
    distill_lr: float = _opt(1e-4, gt=0)
    """Learning rate of the student."""
    distill_alpha: float = _opt(0.5, ge=0, le=1)
    """Weight of the teacher's soft labels in the student's loss."""
    distill_temperature: float = _opt(2.0, gt=0)
    """Softmax temperature of the soft labels."""
    measure: bool = True
    """Score each variant on the source dataset's test split and time it (into its manifest)."""
    latency_samples: int = _opt(200, ge=10)
    """Sentences timed one at a time (1 thread) for each variant's latency."""
    mobile_max_drop: float = _opt(0.01, ge=0, lt=1)
    """The mobile artifact: the smallest ONNX variant within this accuracy drop of the reference."""


PIPELINE_STAGES = ("data", "train", "tune", "export", "deploy")


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=list)
    """Stages of ``raybm pipeline``, run in this order: ``data``, then ``train`` (one run) or
    ``tune`` (a sweep; its winner is scored on test), ``export``, ``deploy``. A stage whose
    output already exists is skipped; an interrupted one resumes. Empty: all of them, with
    ``tune`` when ``tune.search_space`` is set, else ``train``."""
    min_test_f1: Optional[float] = _opt(None, ge=0, le=1)
    """Release gate: deploy only if the model's test macro-F1 is at least this. Empty: no
    F1 condition."""
    max_latency_ms: Optional[float] = _opt(None, gt=0)
    """Release gate: deploy only if the served backend's median single-sentence latency
    (measured on this machine, ``serve.torch_threads`` threads) is at most this. Empty: no
    latency condition."""
    latency_samples: int = _opt(30, ge=5)
    """Single-sentence predictions timed for the latency gate."""
    smoke_texts: list[str] = field(default_factory=lambda: ["this is a smoke test of the new deployment"])
    """Sent to the new deployment over HTTP once it is up; the answers are printed and kept
    in the summary. Any answer other than 200 fails the deploy stage."""
    keep_serving: bool = False
    """After deploying on a local (embedded) Ray, keep serving until Ctrl-C. On a cluster the
    deployment outlives the job anyway."""


@dataclass
class JobConfig:
    name: Optional[str] = None
    """Job name, used for run folders. Empty: derived from the config."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Where results live."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Which Ray to run on."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data stage."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training stage."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyperparameter sweep."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Model server."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Export and compression."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """The whole job in one command: stages and the release gate."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------- cross-field checks


def pipeline_stages(cfg: "JobConfig") -> list[str]:
    """The pipeline's stages as configured, or the default ones for this config."""
    if cfg.pipeline.stages:
        return list(cfg.pipeline.stages)
    return ["data", "tune" if cfg.tune.search_space else "train", "export", "deploy"]



def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def check_name(name: str, what: str) -> str:
    """``name`` if it is safe as one folder name under the results root (letters, digits,
    ``.``, ``_`` and ``-``, not starting with ``.``, at most 200 characters), else a
    ConfigError naming ``what`` (the key or flag it came from)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{what}={name!r}: a name may hold only letters, digits, '.', '_' and '-', may not "
                          f"start with '.', and has at most 200 characters (it names a folder in the results)")
    return name


def safe_name(text: str) -> str:
    """A name derived from free text (a file or model name) made safe for ``check_name``:
    every other character becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:200] or "_"


def _check_job(cfg: JobConfig) -> None:
    if cfg.name is not None:
        check_name(cfg.name, "name")
    if cfg.data.name is not None:
        check_name(cfg.data.name, "data.name")
    d = cfg.data
    if len(d.split) != 3:
        raise ConfigError(f"data.split: give three shares (train, validation, test), got {d.split}")
    if any(s <= 0 for s in d.split):
        raise ConfigError(f"data.split: every share must be > 0, got {d.split}")
    if abs(sum(d.split) - 1.0) > 1e-6:
        raise ConfigError(f"data.split: shares must add up to 1, got {d.split} (sum {sum(d.split):g})")
    if d.labels is not None:
        if len(d.labels) < 2:
            raise ConfigError(f"data.labels: a classifier needs at least 2 classes, got {d.labels}")
        if len(set(d.labels)) != len(d.labels):
            raise ConfigError(f"data.labels: class names repeat: {d.labels}")
    unknown_targets = sorted(set(d.label_values.values()) - set(d.labels or d.label_values.values()))
    if unknown_targets:
        raise ConfigError(f"data.label_values: maps to {unknown_targets}, which are not in "
                          f"data.labels {d.labels}")
    t = cfg.train
    if t.strategy == "scratch" and t.freeze_layers:
        raise ConfigError("train.freeze_layers: only used with train.strategy=partial")
    if cfg.model.keep_layers is not None and t.freeze_layers > cfg.model.keep_layers:
        raise ConfigError(f"train.freeze_layers ({t.freeze_layers}) exceeds model.keep_layers "
                          f"({cfg.model.keep_layers})")
    if cfg.tune.max_latency_ms is not None and not cfg.tune.measure_cost:
        raise ConfigError("tune.max_latency_ms needs tune.measure_cost=true (latency is measured after the sweep)")
    if t.parallelism == "fsdp" and (t.l1 or t.keep_sparsity):
        raise ConfigError(f"train.parallelism=fsdp does not support train.{'l1' if t.l1 else 'keep_sparsity'} "
                          f"(it works on whole weight matrices, which FSDP shards); use parallelism ddp")
    if t.data_feed == "whole" and d.augment.enabled:
        raise ConfigError("train.data_feed=whole does not work with data.augment (augmented text is tokenized "
                          "anew every epoch); use data_feed auto or ray_data")
    if t.gpus_per_worker > 1 and t.gpus_per_worker != int(t.gpus_per_worker):
        raise ConfigError(f"train.gpus_per_worker: above 1 it must be a whole number, got {t.gpus_per_worker}")
    if d.clean.stop_words and d.language == "zh":
        raise ConfigError("data.clean.stop_words: supported for English text only; "
                          "set it to false for data.language=zh")
    s = cfg.serve
    if s.max_replicas is not None and s.min_replicas > s.max_replicas:
        raise ConfigError(f"serve.min_replicas ({s.min_replicas}) exceeds serve.max_replicas ({s.max_replicas})")
    if not is_loopback(s.host) and not s.api_key_env and not s.allow_without_key:
        raise ConfigError(f"serve.host={s.host} listens beyond this machine without an API key: set "
                          f"serve.api_key_env to a variable holding one (or serve.allow_without_key=true "
                          f"behind a gateway that checks callers)")
    if not s.route_prefix.startswith("/"):
        raise ConfigError(f"serve.route_prefix: must start with '/', got {s.route_prefix!r}")
    if s.backend in ("int8", "onnx") and s.gpus_per_replica:
        raise ConfigError(f"serve.backend={s.backend} runs on CPU only; set serve.gpus_per_replica=0 or use "
                          f"backend torch")
    if cfg.tune.search_space:
        _check_search_space(cfg)
    if cfg.tune.soup != "none":
        from raybm.soup import soup_metric

        try:
            soup_metric(cfg.tune.metric)
        except ConfigError as e:
            raise ConfigError(f"tune.soup={cfg.tune.soup}: {e}; set tune.metric to one, or tune.soup=none") from None
    stages = pipeline_stages(cfg)
    bad = [x for x in stages if x not in PIPELINE_STAGES]
    if bad:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {bad}; choose from {', '.join(PIPELINE_STAGES)}")
    if len(set(stages)) != len(stages) or [x for x in PIPELINE_STAGES if x in stages] != list(stages):
        raise ConfigError(f"pipeline.stages: list each stage once, in the order {', '.join(PIPELINE_STAGES)}; "
                          f"got {stages}")
    if "train" in stages and "tune" in stages:
        raise ConfigError("pipeline.stages: pick train (one run) or tune (a sweep), not both")
    if "tune" in stages and not cfg.tune.search_space:
        raise ConfigError("pipeline.stages has tune, but tune.search_space is empty: add the settings to "
                          "search, or use the train stage")


def _key_type(key: str) -> Any:
    """The declared type of a dotted config key (None for an unknown key)."""
    tp: Any = JobConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


def _check_search_space(cfg: JobConfig) -> None:
    """Every searched key exists and every value a distribution can produce is valid."""
    from raybm.search_space import CONTINUOUS, nested, parse_space

    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    base["pipeline"]["stages"] = []  # a trial is one training run, whatever the pipeline

    def check(key: str, value: Any, dist: Any) -> None:
        tp = _key_type(key)
        if tp is None:
            try:
                _build(JobConfig, nested({key: value}), "")
            except ConfigError as e:
                raise ConfigError(f"tune.search_space: {e}") from None
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"tune.search_space.{key}: {key!r} is a section; search one of its keys")
        if dist.kind in CONTINUOUS and tp is not None and int in (tp, *typing.get_args(tp)) \
                and float not in (tp, *typing.get_args(tp)):
            raise ConfigError(f"tune.search_space.{key}: {key} takes whole numbers; use randint(lo, hi), "
                              f"lograndint(lo, hi) or choice([...]) instead of {dist}")
        try:
            trial = _build(JobConfig, merge_raw(base, nested({key: value})), "")
            _check_job(trial)
        except ConfigError as e:
            raise ConfigError(f"tune.search_space.{key}: {dist} allows {value!r}, which the config "
                              f"refuses: {e}") from None

    parse_space(cfg.tune.search_space, check)


# ------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or empty)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _yaml_value(text: str, key: str) -> Any:
    """A string value read as YAML (a list or mapping given as text)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{key}: {text!r} is not valid YAML ({str(e).splitlines()[0]})") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``, converting strings from CLI overrides."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping of keys), got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "yes" in choices:  # YAML reads a bare yes / no as a boolean
            value = "yes" if value else "no"
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of: "
                              f"{', '.join(map(str, choices))}.{hint}")
        return value
    if origin is list:
        if isinstance(value, str):
            parsed = _yaml_value(value, key)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                pass
        if isinstance(value, float) and tp is int and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and isinstance(value, float)):
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return tp(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _check_bounds(value: Any, bounds: dict[str, float], key: str) -> None:
    if value is None or not bounds:
        return
    ok = {"ge": lambda a, b: a >= b, "gt": lambda a, b: a > b,
          "le": lambda a, b: a <= b, "lt": lambda a, b: a < b}
    if not all(ok[op](value, limit) for op, limit in bounds.items()):
        valid = " and ".join(f"{_SIGNS[op]} {limit:g}" for op, limit in bounds.items())
        raise ConfigError(f"{key}: must be {valid}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            full = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"{full}: unknown key.{hint} Valid keys"
                              f"{' in ' + repr(prefix) if prefix else ''}: {', '.join(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _coerce(raw[name], hints[name], key)
        _check_bounds(value, f.metadata.get("bounds", {}), key)
        kwargs[name] = value
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=3e-5", "data.labels=[a,b]"]`` into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write overrides as dotted key=value, e.g. train.lr=3e-5")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: the key is empty or malformed")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except (yaml.YAMLError, ValueError):  # ValueError: an integer of more than 4,300 digits
            value = text
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set twice as a value and a section")
        node[parts[-1]] = value
    return nested


def merge_raw(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two raw config mappings (``extra`` wins)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_raw(out[k], v)
        else:
            out[k] = v
    return out


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Validate a raw mapping (plus overrides) into a ``JobConfig``."""
    merged = merge_raw(raw or {}, parse_overrides(overrides or []))
    cfg = _build(JobConfig, merged, "")
    _check_job(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML job config and apply dotted ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; shipped configs are in jobs/configs/")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of more than 4,300 digits
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a config file must be a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, overrides)


def config_hash(section: Any) -> str:
    """Short stable hash of a config section (names prepared datasets and runs)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def derived_name(cfg: "JobConfig", dataset: str, sections: tuple[str, ...], kind: str = "") -> str:
    """``cfg.name``, or a name made of the dataset, the model and a hash of the given config
    sections (rerunning the same config reuses, and resumes, the same run)."""
    if cfg.name:
        return cfg.name
    blob = json.dumps({s: dataclasses.asdict(getattr(cfg, s)) for s in sections}, sort_keys=True, ensure_ascii=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return safe_name(f"{dataset}-{cfg.model.name.replace('/', '_')}-{kind + '-' if kind else ''}{digest}")


# ------------------------------------------------------------------------ describing


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every config key as (dotted key, default, doc), for help output and docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = getattr(default_obj, f.name)
        rows.append((key, json.dumps(default, ensure_ascii=False), docs.get(f.name, "")))
    return rows
