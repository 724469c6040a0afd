"""What a training run will hold in memory per worker, estimated before any work from the
architecture (built on the meta device: exact parameter counts, no weights), the strategy,
precision, parallelism, workers and batch; and a run that cannot fit the nodes refused with
the settings that would make it fit (``check_memory_fits``).

The parts, per worker (fp32 master weights; mixed precision changes compute, not state):

* weights: 4 bytes a parameter, 1/N of them under FSDP over N workers;
* gradients: 4 bytes a trained parameter (1/N under FSDP); DDP's reducer keeps a second copy
  in its buckets;
* optimizer: 8 bytes a trained parameter for Adam(W) and Adadelta, 4 for momentum SGD,
  Adagrad and RMSprop (1/N under FSDP);
* gathered weights (FSDP): the root unit (embeddings, head) and two layers whole at a time;
* activations: kept for the backward pass (only each layer's input with gradient
  checkpointing);
* the process itself (torch, transformers, the Ray worker);
* on rank 0: part of the weights again while a checkpoint is written (DDP), or one shard
  file (FSDP); under FSDP, before training, a batch of streamed tensors, or (where the
  weights cannot be streamed from the files) the whole model and its file.

Checked against measured peaks by ``bench/memory_scaling.py`` (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raybm.config import JobConfig, build_config
from raybm.errors import RaybmError
from raybm.placement import alive_nodes, place
from raybm.runtime import on_cluster
from raybm.storage.fs import is_s3
from raybm.storage.layout import weight_files
from raybm.train.fsdp_loading import STREAM_BATCH_BYTES, stream_plan
from raybm.train.sharded import SHARD_FILE_BYTES
from raybm.train.worker import build_training_model

if TYPE_CHECKING:
    from collections.abc import Callable

    from raybm.config.search_space import Distribution

GB = 1e9
PROCESS_BYTES = 1.0 * GB  # a training worker's own resident memory before any model (measured: tiny models)
NODE_SHARE = 0.9  # of a node's memory the workers may plan to use (Ray's memory monitor kills at 0.95)
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "adadelta": 8, "momentum": 4, "adagrad": 4, "rmsprop": 4, "sgd": 0}


@dataclass
class Architecture:
    """What the estimate needs of a model: its sizes, from a meta-device build."""

    params: int
    trainable: int
    hidden: int
    layers: int
    heads: int
    largest_layer: int  # parameters of the largest layer
    root: int  # parameters outside the layer stack (embeddings, head)
    streamed: bool = False  # FSDP loads its weights streamed from the files (raybm.train.fsdp_loading)


@dataclass
class MemoryEstimate:
    """A worker's expected peak memory, by part (bytes)."""

    arch: Architecture
    where: str  # "host" or "GPU": where the training state lives
    parts: dict[str, float] = field(default_factory=dict)
    rank0_checkpoint: float = 0.0  # rank 0's extra while it writes a checkpoint
    rank0_loading: float = 0.0  # rank 0's peak while it loads the whole model to shard it (FSDP)
    offloaded: float = 0.0  # host memory per worker holding the GPU workers' offloaded state (train.cpu_offload)

    @property
    def per_worker(self) -> float:
        """Bytes a worker other than rank 0 peaks at."""
        return sum(self.parts.values())

    @property
    def rank0(self) -> float:
        """Bytes rank 0 peaks at: training and writing a checkpoint, or loading, whichever is more."""
        return max(self.per_worker + self.rank0_checkpoint, self.rank0_loading)

    def describe(self) -> str:
        """One line: the total per worker and its parts."""
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v >= 0.005 * GB)
        offloaded = f"; {self.offloaded / GB:.1f} GB offloaded to host memory" if self.offloaded else ""
        return (
            f"{self.arch.params / 1e6:,.0f}M parameters ({self.arch.trainable / 1e6:,.1f}M trained): about "
            f"{self.per_worker / GB:.1f} GB of {self.where} memory per worker ({parts}); rank 0 "
            f"{self.rank0 / GB:.1f} GB{offloaded}"
        )


def architecture(cfg: JobConfig, labels: list[str]) -> Architecture:
    """The sizes of the model ``cfg`` trains (a local or catalog model), built on the meta
    device: no weights read."""
    from raybm.models.architectures import model_parts
    from raybm.models.build import resolve_model_source, resolve_pooling

    model = build_training_model(cfg.train, cfg.model, labels, on_meta=True)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        layers = list(model_parts(model).layers)
    except RaybmError:
        layers = []
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers] or [0]
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or getattr(config, "dim", 0) or 256)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_heads", 0) or 1)
    streamed = False
    if (
        cfg.train.parallelism == "fsdp"
        and cfg.train.strategy != "scratch"
        and cfg.model.head_init == "default"
        and resolve_pooling(cfg.model) != "mean"
    ):
        files = weight_files(resolve_model_source(cfg.model.name))
        streamed = files is not None and stream_plan(model, files) is not None
    return Architecture(
        params, trainable, hidden, max(1, len(layers)), heads, max(sizes), params - sum(sizes), streamed
    )


def estimate(cfg: JobConfig, arch: Architecture, use_gpu: bool) -> MemoryEstimate:
    """The per-worker memory of training ``arch`` as ``cfg`` says."""
    t = cfg.train
    fsdp = t.parallelism == "fsdp"
    shards = t.num_workers if fsdp else 1
    half = t.precision in ("bf16", "fp16") or (t.precision == "auto" and use_gpu)
    trained = arch.trainable
    # NF4 (QLoRA): half a byte a frozen weight, plus a scale per block of 64 (double-quantized).
    weight_bytes = 0.53 * (arch.params - trained) + 4 * trained if t.quantize_base == "nf4" else 4 * arch.params
    parts = {
        "weights": weight_bytes / shards,
        "gradients": 4 * trained / shards,
        "optimizer": OPTIMIZER_BYTES.get(t.optimizer, 8) * trained / shards,
    }
    if t.optimizer in ("momentum", "rmsprop") and t.momentum:
        parts["optimizer"] += 4 * trained / shards if t.optimizer == "rmsprop" else 0
    if not fsdp and t.num_workers > 1:
        parts["DDP buckets"] = 4 * trained
    if fsdp:
        parts["gathered"] = (2 if half and use_gpu else 4) * (arch.root + 2 * arch.largest_layer)
    tokens = t.batch_size * cfg.data.max_length
    act = 2 if half else 4
    per_layer = tokens * (16 * arch.hidden + 2 * arch.heads * cfg.data.max_length) * act
    parts["activations"] = (
        (tokens * arch.hidden * act * arch.layers + per_layer) if t.gradient_checkpointing else per_layer * arch.layers
    )
    parts["process"] = 0.6 * GB if use_gpu else PROCESS_BYTES
    offloaded = 0.0
    if use_gpu and t.cpu_offload:  # the sharded state waits in host memory; the GPU holds what is in use
        offloaded = sum(parts.pop(k) for k in ("weights", "gradients", "optimizer"))
    # DDP's rank 0 holds about half the weights again while writing a checkpoint (measured); an FSDP rank builds one
    # shard file at a time. Under FSDP rank 0 first builds the whole model and reads its file
    # (freed once sharded, before any optimizer state exists).
    saved = arch.trainable if t.strategy == "lora" else arch.params  # a LoRA checkpoint: the adapters and head
    at_checkpoint = 2 * saved if not fsdp else min(SHARD_FILE_BYTES / shards, 12 * saved / shards)
    if fsdp and arch.streamed:  # rank 0 holds a batch of tensors at a time
        loading = PROCESS_BYTES + 2 * STREAM_BATCH_BYTES
    else:
        loading = PROCESS_BYTES + 6 * arch.params if fsdp and t.num_workers > 1 else 0.0
    return MemoryEstimate(arch, "GPU" if use_gpu else "host", parts, at_checkpoint, loading, offloaded)


def check_memory_fits(cfg: JobConfig, use_gpu: bool, log: Callable[[str], object]) -> MemoryEstimate | None:
    """Estimate the run's memory per worker and log it; on CPU workers, refuse (before any
    work) a run whose workers cannot all fit the nodes' memory, naming the settings that
    would make it fit. None when the model is not on this machine to size (an ``s3://`` base
    model: sized by its workers) or the cluster autoscales."""

    if is_s3(cfg.model.name):
        return None
    arch = architecture(cfg, SIZING_LABELS)
    est = estimate(cfg, arch, use_gpu)
    log(f"Memory estimate: {est.describe()}")
    if use_gpu or not cfg.train.check_memory or (on_cluster() and cfg.ray.autoscaling):
        return est  # GPU memory is not known before the workers start
    nodes = alive_nodes()
    if fits(cfg, est, nodes):
        return est
    room = max((node_memory(n) for n in nodes), default=0.0)
    fixes = [
        setting
        for setting, variant in _variants(cfg)
        if fits(
            variant,
            estimate(
                variant,
                architecture(variant, SIZING_LABELS) if variant.train.strategy != cfg.train.strategy else arch,
                use_gpu,
            ),
            nodes,
        )
    ]
    raise RaybmError(
        f"training {arch.params / 1e6:,.0f}M parameters on {cfg.train.num_workers} worker(s) "
        f"({cfg.train.parallelism}) needs about {est.per_worker / GB:.1f} GB per worker and {est.rank0 / GB:.1f} GB "
        f"on rank 0, more than the nodes hold ({len(nodes)} node(s), the largest {room / GB:.1f} GB usable). "
        + (
            f"Settings that fit: {'; '.join(fixes)}."
            if fixes
            else "No single setting makes it fit: add nodes with more memory, or combine fsdp, LoRA and more workers."
        )
        + " (train.check_memory=false runs it anyway.)"
    )


MEMORY_GROWS_WITH = ("train.batch_size", "data.max_length")  # searched: a sweep is sized at the largest


def largest_trial(cfg: JobConfig, dists: list[Distribution]) -> JobConfig:
    """The trial of a sweep over ``dists`` (``raybm.config.search_space``) that needs the
    most memory per worker: a larger batch or length where those are searched, and full
    fine-tuning where LoRA is only one of the strategies tried."""
    overrides = []
    for d in dists:
        values = d.extremes()
        if d.key in MEMORY_GROWS_WITH and all(isinstance(v, (int, float)) for v in values):
            overrides.append(f"{d.key}={max(values)}")
        elif d.key == "train.strategy" and "lora" in values and len(set(values)) > 1:
            overrides.append(f"train.strategy={next(v for v in values if v != 'lora')}")
    return build_config(cfg.to_dict(), overrides) if overrides else cfg


SIZING_LABELS = ["a", "b"]  # the head's size hardly matters; the labels are known only after the data stage


def node_memory(node: dict[str, float]) -> float:
    """The memory of a node the workers may plan on (bytes): its share of what Ray manages."""
    return NODE_SHARE * (node.get("memory", 0.0) + node.get("object_store_memory", 0.0))


def fits(cfg: JobConfig, est: MemoryEstimate, nodes: list[dict[str, float]]) -> bool:
    """Whether the workers, with their CPUs and estimated memory, can all be placed on ``nodes``."""

    t = cfg.train
    worker = {"CPU": t.cpus_per_worker, "memory_bytes": est.per_worker}
    bundles = [{**worker, "memory_bytes": est.rank0}] + [worker] * (t.num_workers - 1)
    free = [{"CPU": n.get("CPU", 0.0), "memory_bytes": node_memory(n)} for n in nodes]
    return place(bundles, free)


def _variants(cfg: JobConfig) -> list[tuple[str, JobConfig]]:
    """(the setting, the config with it) for each change that lowers memory per worker."""

    t = cfg.train
    raw = cfg.to_dict()
    out: list[tuple[str, list[str]]] = []
    if t.parallelism == "ddp":
        out.append(("train.parallelism=fsdp", ["train.parallelism=fsdp"]))
    for workers in (t.num_workers * 2, t.num_workers * 4):
        cpus = round(t.cpus_per_worker * t.num_workers / workers, 2)
        out.append(
            (
                f"train.parallelism=fsdp train.num_workers={workers} train.cpus_per_worker={cpus:g}",
                ["train.parallelism=fsdp", f"train.num_workers={workers}", f"train.cpus_per_worker={cpus:g}"],
            )
        )
    if t.strategy != "lora":
        out.append(("train.strategy=lora", ["train.strategy=lora"]))
    if not t.gradient_checkpointing:
        out.append(("train.gradient_checkpointing=true", ["train.gradient_checkpointing=true"]))
    if t.batch_size > 1:
        out.append((f"train.batch_size={t.batch_size // 2}", [f"train.batch_size={t.batch_size // 2}"]))
    return [(label, build_config(raw, overrides)) for label, overrides in out]
