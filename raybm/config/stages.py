"""The config sections of the stages (train, tune, serve, export, pipeline) and the whole ``JobConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from raybm.config.sections import DataConfig, ModelConfig, RayConfig, StorageConfig, TrackingConfig, _opt


@dataclass
class TrainConfig:
    """The training stage: workers, optimizer, schedule, strategy, regularization, checkpoints."""

    epochs: int = _opt(3, ge=1)
    """Passes over the training split."""
    batch_size: int = _opt(32, ge=1)
    """Examples per step per worker."""
    eval_batch_size: int = _opt(64, ge=1)
    """Examples per batch when validating and testing."""
    max_steps_per_epoch: int | None = _opt(None, ge=1)
    """Cap the optimizer steps of an epoch (quick runs). Empty: the whole split."""
    lr: float = _opt(5e-5, gt=0, le=1)
    """Peak learning rate (of the top layer, with layer-wise decay)."""
    optimizer: Literal["sgd", "momentum", "adagrad", "adadelta", "rmsprop", "adam", "adamw"] = "adamw"
    """Optimizer. ``momentum`` is SGD with ``train.momentum`` (Nesterov with ``train.nesterov``)."""
    momentum: float = _opt(0.9, ge=0, lt=1)
    """Momentum of ``momentum`` and ``rmsprop``."""
    nesterov: bool = False
    """Nesterov momentum for ``momentum``."""
    scheduler: Literal["constant", "step", "linear", "cosine", "plateau"] = "linear"
    """Learning-rate schedule after warmup: constant, step decay, linear decay, cosine, or
    ``plateau``: constant until validation stops improving (``plateau_patience``,
    ``plateau_factor``)."""
    warmup_ratio: float = _opt(0.06, ge=0, lt=1)
    """Share of all steps spent warming the learning rate up linearly from 0."""
    step_epochs: int = _opt(1, ge=1)
    """``step`` schedule: multiply the learning rate by ``step_gamma`` every this many epochs."""
    step_gamma: float = _opt(0.5, gt=0, le=1)
    """``step`` schedule: the factor."""
    plateau_patience: int = _opt(1, ge=1)
    """``plateau`` schedule: lower the learning rate after this many epochs in a row without
    an improvement of ``train.metric`` on validation."""
    plateau_factor: float = _opt(0.5, gt=0, lt=1)
    """``plateau`` schedule: the factor the learning rate is multiplied by each time."""
    layerwise_lr_decay: float = _opt(1.0, gt=0, le=1)
    """Each layer below the top gets this factor times the learning rate of the one above
    (the head and top layer get ``lr``). 1 turns it off."""
    weight_decay: float = _opt(0.01, ge=0)
    """L2 regularization (decoupled for AdamW). Not applied to biases and LayerNorm."""
    l1: float = _opt(0.0, ge=0)
    """L1 penalty: this times the sum of |w| over trainable weights, added to the loss."""
    keep_sparsity: bool = False
    """Keep weights of Linear layers that are zero at the start at zero (fine-tuning a pruned model)."""
    distill_from: str | None = None
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
    strategy: Literal["full", "partial", "gradual", "lora", "scratch"] = "full"
    """``full`` fine-tunes everything; ``partial`` freezes the embeddings and the lowest
    ``freeze_layers`` layers; ``gradual`` trains the head first and unfreezes one more layer
    from the top every ``unfreeze_every`` epochs; ``lora`` freezes the base model and trains
    low-rank adapters (PEFT's LoRA) beside ``lora_targets`` plus the head, merged into the
    published model; ``scratch`` trains the same architecture from random weights."""
    lora_rank: int = _opt(8, ge=1)
    """``lora``: the rank r of each adapter (its trainable size grows with it)."""
    lora_alpha: float = _opt(16.0, gt=0)
    """``lora``: the adapters' scale is alpha / r."""
    lora_dropout: float = _opt(0.05, ge=0, lt=1)
    """``lora``: dropout on each adapter's input."""
    lora_targets: list[str] = field(default_factory=list)
    """``lora``: names of the Linear modules to adapt (e.g. ``[query, value]``). Empty: the
    architecture's attention query and value projections (docs/training.md lists them)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them:
    less memory for long texts and large models, about a third more compute."""
    check_memory: bool = True
    """Before any work, estimate each worker's memory from the architecture and refuse a run
    that cannot fit the nodes, naming settings that would (docs/training.md). ``false``:
    print the estimate and run anyway."""
    freeze_layers: int = _opt(0, ge=-1)
    """``partial``: encoder layers to freeze from the bottom; -1 freezes all but the head."""
    unfreeze_every: int = _opt(1, ge=1)
    """``gradual``: epochs between unfreezing one more layer."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision. On GPU ``auto`` is bf16 where supported, else fp16 (with a grad
    scaler). On CPU ``auto`` and ``fp16`` run fp32, and ``bf16`` runs the steps in bf16
    autocast: about 1.6x faster on CPUs with AMX or AVX512-BF16, slower on others."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """Data-parallel (DDP) or sharded (FSDP, for models that do not fit one device)."""
    cpu_offload: bool = False
    """FSDP on GPUs: keep the sharded parameters, gradients and optimizer state in host
    memory between uses (FSDP2's ``CPUOffloadPolicy``; the optimizer steps on the CPU):
    models bigger than the GPUs' memory, slower steps."""
    quantize_base: Literal["none", "nf4"] = "none"
    """LoRA on GPUs: hold the frozen base model's weights in 4 bits (``nf4``, QLoRA, with
    bitsandbytes: ``pip install 'raybm[qlora]'``); the adapters and the head train in full
    precision, and the published model merges them into the base in full precision."""
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
    torch_threads: int | None = _opt(None, ge=1)
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
    fail_at_epoch: int | None = _opt(None, ge=2)
    """Test hook: raise in worker 0 when this epoch starts (once, from epoch 2, so a
    checkpoint exists), to test recovery."""


@dataclass
class TuneConfig:
    """The hyperparameter sweep: search space, scheduler, trials, the winner's pick."""

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
    max_concurrent_trials: int | None = _opt(None, ge=1)
    """Trials running at once. Empty: as many as fit the cluster's GPUs (``tune.cluster_gpus``,
    or those it has now) or, on CPUs, its CPUs, given each trial's ``train.num_workers`` x
    ``train.gpus_per_worker`` (or ``train.cpus_per_worker``)."""
    cluster_gpus: int | None = _opt(None, ge=1)
    """GPUs the sweep may use on an autoscaling cluster (its GPU workers' maximum, e.g. 16),
    which it does not have yet when the sweep starts. Empty: the GPUs the cluster has now."""
    time_budget_s: float | None = _opt(None, gt=0)
    """Stop the sweep after this many seconds (running trials stop, the best so far wins)."""
    max_failures: int = _opt(0, ge=-1)
    """Times a failed trial is retried from its last checkpoint (-1: no limit)."""
    trial_runner: Literal["auto", "in_trial", "ray_train"] = "auto"
    """Where a trial trains. ``in_trial``: in the Tune trial's own process, which holds the
    worker's resources (no Ray Train worker group: about 10 s less per trial on a small
    machine); Tune keeps its checkpoints, restarts it from the last one on a failure (up to
    ``train.max_failures`` + ``tune.max_failures`` times) and stops it when the scheduler
    says. Only for trials of one worker (``train.num_workers=1``, DDP) that read the splits
    whole (``train.data_feed``) on resources the cluster has now. ``ray_train``: every trial
    fits a Ray Train ``TorchTrainer``. ``auto``: ``in_trial`` where it can, else ``ray_train``."""
    search_space: dict[str, str] = field(default_factory=dict)
    """Dotted config key -> distribution: ``uniform(lo, hi)``, ``loguniform(lo, hi)``,
    ``quniform(lo, hi, q)``, ``randint(lo, hi)``, ``lograndint(lo, hi)``, ``choice([...])``,
    ``grid([...])``; e.g. ``train.lr: loguniform(1e-5, 1e-3)``. Checked before any trial."""
    seed: int | None = 0
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
    max_latency_ms: float | None = _opt(None, gt=0)
    """Latency budget: the winner (and a soup's ingredients) are the best trials whose median
    latency is at most this; the others stay on the leaderboard, marked. When no trial meets
    it, the best trial wins and ``winner.json`` says so. Needs ``tune.measure_cost``."""
    latency_samples: int = _opt(30, ge=5)
    """Single-sentence predictions timed per architecture (after 5 warm-up ones)."""


@dataclass
class ServeConfig:
    """The model server: address, key, replicas, batching and request limits."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds. Another address than loopback (0.0.0.0 listens beyond
    this machine) needs an API key (api_key_env), or allow_without_key."""
    port: int = _opt(8000, ge=1, le=65535)
    """HTTP port."""
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    """Where Serve's HTTP proxies run on a cluster: on every node (put a load balancer in
    front), or on the head only (one address; a lost worker node costs no proxy)."""
    ingress: Literal["direct", "proxy"] = "direct"
    """direct: each model replica also answers HTTP on a port of its own (Serve's direct
    ingress, listed by ``raybm serve``; about 7 ms less a request than through the proxy,
    which keeps answering at host:port). It is set when raybm starts or joins Ray (a Ray
    started elsewhere needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1 at ``ray start``) and puts the
    proxy on the head only. proxy: through Serve's proxies only."""
    app_name: str = ""
    """Serve application name. Empty: the model's name (its run or sweep; an export's name
    and variant), so each model is an application of its own and a second model never
    replaces the first; deploying the same name again updates it."""
    route_prefix: str = ""
    """URL prefix of the API (e.g. /sentiment). Empty: ``/<app_name>``."""
    backend: Literal["auto", "torch", "int8", "onnx"] = "auto"
    """Model backend: torch (fp32 weights; fp16 on GPU), int8 (PyTorch dynamic quantization, CPU),
    onnx (ONNX Runtime over an export variant's model.onnx, CPU); auto: what the folder is."""
    num_replicas: int = _opt(1, ge=1)
    """Model replicas (fixed). Set max_replicas to autoscale instead."""
    min_replicas: int = _opt(1, ge=0)
    """Autoscaling: fewest replicas (used when max_replicas is set)."""
    max_replicas: int | None = _opt(None, ge=1)
    """Autoscaling: most replicas. Empty: a fixed num_replicas."""
    target_ongoing_requests: float = _opt(2.0, gt=0)
    """Autoscaling: ongoing requests per replica the autoscaler aims for."""
    cpus_per_replica: float = _opt(1.0, gt=0)
    """CPUs reserved for each replica."""
    gpus_per_replica: float = _opt(0.0, ge=0)
    """GPUs for each replica (fractions share a GPU). 0: CPU."""
    torch_threads: int | None = _opt(None, ge=1)
    """Torch threads per replica. Empty: cpus_per_replica rounded down, at least 1."""
    max_batch_size: int = _opt(32, ge=1)
    """Most texts one model call takes; texts of concurrent requests are batched together."""
    batch_wait_timeout_s: float = _opt(0.0, ge=0)
    """When the model is idle, how long a text waits for others to share its call (0: none;
    texts that arrive while it is busy share the next call anyway)."""
    inline_call_max_s: float = _opt(0.05, ge=0)
    """A text alone on an idle replica runs the model on the request loop itself, without
    the hand-over to the model's thread (about 1.3 ms less a request on 2 CPUs), when a
    one-text call last took less than this. 0: always on the model's thread (the loop keeps
    answering other routes during every call)."""
    max_ongoing_requests: int = _opt(32, ge=1)
    """Requests a replica works on at once."""
    max_queued_requests: int = _opt(64, ge=0)
    """Requests queued beyond that; more are answered 503."""
    request_timeout_s: float = _opt(30.0, gt=0)
    """A request not answered in this time gets an error instead of waiting on."""
    max_texts: int = _opt(64, ge=1)
    """Most texts in one request (more: 422)."""
    min_confidence: float = _opt(0.0, ge=0, lt=1)
    """The abstain band: an answer whose (calibrated) confidence is below this says
    ``"uncertain": true`` (its label stays the most likely one); the dashboard shows it as
    uncertain. 0 turns it off."""
    max_text_chars: int = _opt(2000, ge=1)
    """Longest text in characters (longer: 422)."""
    max_body_bytes: int = _opt(1 << 20, ge=1024)
    """Largest request body in bytes (larger: 413)."""
    health_check_period_s: float = _opt(10.0, gt=0)
    """How often Serve checks each replica's model (a failing replica is replaced); a model
    that answered a request since the last check is not probed again."""
    health_check_timeout_s: float = _opt(30.0, gt=0)
    """How long a health check may take before the replica counts as failed."""
    explain_max_cost: int = _opt(20000, ge=100)
    """Most work one /explain request may ask for, in token positions scored: the sum over
    its texts of (words + 1) x tokens (a tweet at max length 64 costs about 1,500). Dearer
    requests get 422; explanations run one at a time per replica, apart from /predict."""
    explain_max_queued: int = _opt(16, ge=0)
    """/explain requests a replica keeps waiting for its explanation thread; more get 503."""
    api_key_env: str | None = None
    """Environment variable holding an API key that /predict and /metadata require (header
    X-API-Key or Authorization: Bearer; at least 16 characters). Empty: no key."""
    allow_without_key: bool = False
    """Serve on a host other than loopback without an API key: anyone who reaches the port
    can use the model. Only behind your own gateway that checks callers."""


@dataclass
class ExportConfig:
    """Export and compression: variants, their settings, measuring them."""

    variants: list[Literal["hf", "onnx", "int8", "onnx-int8", "fp16", "pruned", "distilled"]] = field(
        default_factory=lambda: ["hf", "onnx", "int8", "onnx-int8"]
    )
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


@dataclass
class PredictConfig:
    """Batch scoring with Ray Data (``raybm predict`` into a folder, ``jobs/predict.py``)."""

    concurrency: int | None = _opt(None, ge=1)
    """Model actors (a fixed pool). Empty: up to as many as the cluster's GPUs hold (with
    gpus_per_actor), or its CPUs less one."""
    cpus_per_actor: float = _opt(1.0, gt=0)
    """CPUs reserved for each model actor."""
    gpus_per_actor: float = _opt(0.0, ge=0)
    """GPUs for each model actor (fractions share a GPU). 0: CPU."""
    threads: int | None = _opt(None, ge=1)
    """Torch threads per actor. Empty: on CPU the cluster's cores shared among the actors (one
    actor on a 2-core machine runs 2 threads), at least cpus_per_actor; on GPU cpus_per_actor."""
    batch_size: int = _opt(64, ge=1)
    """Texts per model call. Each actor takes rows a block at a time and runs them shortest
    first, so a batch pads to about its own texts' length. Raise it on a GPU (256-1024)."""


PIPELINE_STAGES = ("data", "train", "tune", "export", "deploy")


@dataclass
class PipelineConfig:
    """The whole job in one command: its stages and the release gate."""

    stages: list[str] = field(default_factory=list)
    """Stages of ``raybm pipeline``, run in this order: ``data``, then ``train`` (one run) or
    ``tune`` (a sweep; its winner is scored on test), ``export``, ``deploy``. A stage whose
    output already exists is skipped; an interrupted one resumes. Empty: all of them, with
    ``tune`` when ``tune.search_space`` is set, else ``train``."""
    min_test_f1: float | None = _opt(None, ge=0, le=1)
    """Release gate: deploy only if the model's test macro-F1 is at least this. Empty: no
    F1 condition."""
    max_latency_ms: float | None = _opt(None, gt=0)
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
    """A whole job config: one section per stage."""

    name: str | None = None
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
    predict: PredictConfig = field(default_factory=PredictConfig)
    """Batch scoring."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """The whole job in one command: stages and the release gate."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking beyond the results folder (MLflow)."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML, loadable by ``load_config``."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
