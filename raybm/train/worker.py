"""A training worker's set-up: the model, its data, loss and optimizer, and the run's
progress restored from the last checkpoint when the worker group restarts."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raybm.config import JobConfig, build_config
from raybm.errors import RaybmError
from raybm.storage.layout import weight_files
from raybm.train.checkpoints import load_checkpoint
from raybm.train.fsdp import wrap_fsdp
from raybm.train.fsdp_loading import StreamPlan, stream_plan
from raybm.train.host_memory import return_large_blocks_to_system
from raybm.train.losses import load_teacher
from raybm.train.optim import amp_settings, build_optimizer, cpu_has_native_bf16
from raybm.train.scoring import whole_split
from raybm.train.sharded import is_sharded, load_sharded

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from ray.data import DataIterator

    from raybm.config import ModelConfig, TrainConfig
    from raybm.data.whole import WholeSplit
    from raybm.train.session import WorkerSession


def say(message: str) -> None:
    """Progress from worker 0. Not print(): Ray Train patches print into its logger, which
    also echoes to the console, so each line would show twice."""
    sys.stdout.write(f"[raybm] {message}\n")
    sys.stdout.flush()


def quiet_ray_train_logs() -> None:
    """Ray Train logs, at INFO in every worker, each report with its whole metrics dict (the
    history included, so the line grows every epoch) and each checkpoint it saves. The
    loop's own epoch line says what matters once; warnings and errors still show."""
    from raybm.ray_patches import quiet_train_context_logs

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    quiet_train_context_logs()  # it logs under its file name


def worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank's bundle, this rank's node first (the run record says
    where the worker group ran). Read from the worker group's placement group: no collective
    inside the training loop."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    pg = ray.util.get_current_placement_group()
    if world == 1 or pg is None:
        return [node] * world
    placed = ray.util.placement_group_table(pg).get("bundles_to_node_id") or {}
    others = [placed[i] for i in sorted(placed)]
    if node in others:
        others.remove(node)
    return [node, *others][:world]


@dataclass
class Progress:
    """Where a run stands: what a checkpoint restores and every epoch moves on."""

    start_epoch: int = 0  # the first epoch this attempt runs (0-based)
    step: int = 0  # optimizer steps so far (the schedule's position)
    best: float | None = None  # the best value of train.metric so far
    bad_epochs: int = 0  # epochs since it last improved (early stopping)
    resumed: bool = False  # this attempt started from a checkpoint (until its first epoch ends)
    resumed_from: int = 0  # epochs already done when this attempt started (0: a fresh run)
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics, kept in the checkpoints
    lr_scale: float = 1.0  # the plateau schedule's factor on every learning rate so far
    plateau_epochs: int = 0  # epochs without improvement since the plateau schedule last lowered it

    def state(self, epoch: int, optimizer_state: dict) -> dict[str, Any]:
        """The training state a checkpoint of ``epoch`` holds."""
        return {
            "epoch": epoch,
            "step": self.step,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "optimizer": optimizer_state,
            "history": self.history,
            "lr_scale": self.lr_scale,
            "plateau_epochs": self.plateau_epochs,
        }

    @classmethod
    def resumed_at(cls, state: dict[str, Any]) -> Progress:
        """Progress restored from a checkpoint's training state."""
        return cls(
            start_epoch=state["epoch"] + 1,
            step=state["step"],
            best=state.get("best"),
            bad_epochs=state.get("bad_epochs", 0),
            resumed=True,
            resumed_from=state["epoch"] + 1,
            history=list(state.get("history", [])),
            lr_scale=state.get("lr_scale", 1.0),
            plateau_epochs=state.get("plateau_epochs", 0),
        )


@dataclass
class Worker:
    """One Ray Train worker's set-up for the whole run (``set_up`` builds it)."""

    config: dict[str, Any]  # what the driver passed (raybm.train.driver.build_trainer)
    cfg: JobConfig
    labels: list[str]
    rank: int
    world: int
    device: Any
    model: Any  # the unwrapped model: checkpoints, strategies, validation under DDP
    wrapped: Any  # the model DDP or FSDP trains
    tokenizer: Any
    optimizer: Any
    scaler: Any  # a grad scaler for fp16, else None
    amp_dtype: Any  # autocast dtype, or None
    loss_fn: Any
    eval_loss_fn: Any
    collate: Any
    augment: Any  # AugmentCollate of the training texts when data.augment is on, else None
    train_shard: Any
    val_data: Any
    masks: list  # (weight, mask) pairs that keep a pruned model's zeros
    teacher: Any  # the distillation teacher, or None
    sizes: dict[int, int]  # parameter sizes by id, from before wrapping
    checkpoint_mb: float  # the weights each checkpoint holds (LoRA: the adapters and the head only)
    adapter_keys: dict | None  # LoRA under FSDP: checkpoint key -> full state key (raybm.models.lora.adapter_keys)
    steps_per_epoch: int
    total_steps: int
    nodes: list[str]  # the Ray node of each rank, this rank's first
    session: Any  # where it runs (raybm.train.session): rank, device, checkpoints, reports, data

    @property
    def fsdp(self) -> bool:
        """Whether the model is sharded with FSDP (else replicated with DDP)."""
        return self.cfg.train.parallelism == "fsdp"


def set_up(config: dict[str, Any], session: WorkerSession) -> tuple[Worker, Progress]:
    """The worker's model, data, loss and optimizer; resumed from the run's last checkpoint
    when this is a restart (a worker failure or a rerun). All parameters are trainable when
    wrapped (DDP tracks them all); the strategy freezes some per epoch. Under LoRA only the
    adapters and the head ever train. ``session``: where it runs (raybm.train.session)."""
    import torch

    from raybm.data.tokenizing import AugmentCollate, PadCollate
    from raybm.models.architectures import weight_layers
    from raybm.models.build import load_tokenizer, local_model
    from raybm.models.lora import adapter_keys, adapter_state, is_lora
    from raybm.models.strategies import param_groups

    cfg = build_config(config["job"])
    t = cfg.train
    rank, world = session.rank, session.world
    return_large_blocks_to_system()
    torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))  # Ray's OMP setting is not enough
    torch.manual_seed(t.seed + rank)
    device = session.device()
    model_cfg = local_model(cfg.model, cfg.storage)  # an s3:// base model: this node's copy
    model, stream, on_meta = _model_to_shard(t, model_cfg, config["labels"], rank, device)
    if t.parallelism != "fsdp" and t.quantize_base == "none":  # a 4-bit base is loaded onto its device
        model.to(device)
    with _checkpoint_folder(session) as folder:
        # The weights go in before wrapping (rank 0's, under FSDP), the optimizer state after.
        progress, state = _resume(folder, None if on_meta else model, rank)
        stream, extra = _resumed_stream(stream, folder if state is not None else None, model, rank)
        saved = adapter_state(model) if is_lora(model) else model.state_dict()  # what each checkpoint holds
        keys = adapter_keys(model) if is_lora(model) and t.parallelism == "fsdp" else None
        checkpoint_mb = sum(v.numel() * v.element_size() for v in saved.values()) / 1e6
        amp_dtype, use_scaler = amp_settings(device, t.precision)
        wrapped = _wrap(model, t, device, session, amp_dtype, stream, extra)
        # Optimizer groups and parameter sizes once wrapped: FSDP2 replaces every parameter by
        # its sharded one (same name, whole shape), which is what the optimizer must step.
        groups = param_groups(model, t.lr, t.weight_decay, t.layerwise_lr_decay)
        sizes = {id(p): p.numel() for p in model.parameters()}
        optimizer = _optimizer(model, t, groups, state, folder)
    if rank == 0 and is_lora(model):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(
            f"LoRA: {trainable:,} of {sum(sizes.values()):,} parameters train "
            f"({100 * trainable / max(1, sum(sizes.values())):.2f}%); each checkpoint holds {checkpoint_mb:.2f} MB"
        )
    if rank == 0 and amp_dtype is not None and device.type == "cpu":
        say(
            "mixed precision: bf16 on the CPU"
            + (
                ""
                if cpu_has_native_bf16()
                else " (this CPU has no native bf16: slower than fp32 here; train.precision=fp32 is faster)"
            )
        )
    weights = (
        torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
        if config.get("class_weights")
        else None
    )
    train_shard, val_data = _training_data(config, cfg, rank, world, session)
    tokenizer = load_tokenizer(model_cfg.name, model_cfg.trust_remote_code)
    steps_per_epoch = max(1, math.ceil(math.ceil(config["n_train"] / world) / t.batch_size / t.grad_accum))
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    worker = Worker(
        config=config,
        cfg=cfg,
        labels=config["labels"],
        rank=rank,
        world=world,
        device=device,
        model=model,
        wrapped=wrapped,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
        amp_dtype=amp_dtype,
        loss_fn=torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing),
        eval_loss_fn=torch.nn.CrossEntropyLoss(),
        # Rows come tokenized (stored by the data stage, or by Tokenize): padded here, per batch.
        collate=PadCollate(tokenizer.pad_token_id, cfg.data.max_length if cfg.data.padding == "max_length" else None),
        augment=AugmentCollate(tokenizer, cfg.data.augment, cfg.data.max_length, cfg.data.padding, cfg.data.seed)
        if cfg.data.augment.enabled
        else None,
        train_shard=train_shard,
        val_data=val_data,
        # Fine-tuning a pruned model: the zeros of Linear weights stay zero.
        masks=[(m.weight, m.weight.ne(0)) for m in weight_layers(model)] if t.keep_sparsity else [],
        teacher=load_teacher(t.distill_from, device) if t.distill_from else None,
        sizes=sizes,
        checkpoint_mb=checkpoint_mb,
        adapter_keys=keys,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * t.epochs,
        nodes=worker_nodes(world),
        session=session,
    )
    return worker, progress


def _model_to_shard(
    t: TrainConfig, model_cfg: ModelConfig, labels: list[str], rank: int, device: torch.device
) -> tuple[torch.nn.Module, StreamPlan | None, bool]:
    """(the model as this rank builds it, the plan to stream its weights or None, whether
    its parameters are on the meta device). DDP: the whole model on every rank. FSDP: a
    skeleton on every rank, rank 0 too, whose weights rank 0 streams from the model's
    safetensors files once sharded (``raybm.train.fsdp_loading``); where they do not fit the
    model (or there are none: a built-in tiny model, ``scratch``), rank 0 builds the whole
    model and the others a skeleton, and rank 0 broadcasts it (``raybm.train.fsdp``)."""
    from raybm.models.build import resolve_model_source, resolve_pooling

    if t.parallelism != "fsdp":
        return build_training_model(t, model_cfg, labels, False, device), None, False
    streamable = t.strategy != "scratch" and model_cfg.head_init == "default" and resolve_pooling(model_cfg) != "mean"
    files = weight_files(resolve_model_source(model_cfg.name)) if streamable else None
    if files:
        skeleton = build_training_model(t, model_cfg, labels, True, device, skeleton=True)
        plan = stream_plan(skeleton, files)
        if plan is not None:
            return skeleton, plan, True
    return build_training_model(t, model_cfg, labels, rank != 0, device), None, rank != 0


def _resumed_stream(
    stream: StreamPlan | None, folder: str | None, model: torch.nn.Module, rank: int
) -> tuple[StreamPlan | None, dict[str, torch.Tensor] | None]:
    """(the stream plan, rank 0's extra weights) when resuming from ``folder``: a sharded
    checkpoint's weights come out of its shards (nothing to stream: the skeleton is only
    materialised), a LoRA checkpoint's adapters are streamed after the base's."""
    from safetensors.torch import load_file

    from raybm.models.lora import ADAPTER_WEIGHTS_FILE, adapter_keys

    if stream is None or folder is None:
        return stream, None
    adapters = os.path.join(folder, ADAPTER_WEIGHTS_FILE)
    if not os.path.isfile(adapters):
        return StreamPlan({}, []), None
    if rank != 0:
        return stream, None
    keys = adapter_keys(model)
    return stream, {keys[k]: v for k, v in load_file(adapters).items()}


def build_training_model(
    t: TrainConfig,
    model_cfg: ModelConfig,
    labels: list[str],
    on_meta: bool,
    device: torch.device | None = None,
    skeleton: bool = False,
) -> torch.nn.Module:
    """The classifier to train: pretrained weights (unless ``train.strategy=scratch``),
    gradient checkpointing and LoRA adapters as set. ``on_meta``: its shapes only, on the
    meta device (an FSDP rank other than 0: its weights come from rank 0 when sharded);
    ``skeleton``: the same, but its buffers real (they are in no weight file). With
    ``train.quantize_base`` the base is loaded in 4 bits straight onto ``device``."""
    import torch

    from raybm.models.build import build_classifier, enable_checkpointing
    from raybm.models.lora import add_lora

    if t.quantize_base != "none" and not on_meta:
        from raybm.models.quantized import quantized_classifier  # bitsandbytes: only a QLoRA run needs it

        return add_lora(quantized_classifier(model_cfg, labels, device, t.seed, t.gradient_checkpointing), t)
    if skeleton:
        from accelerate import init_empty_weights

        context = init_empty_weights(include_buffers=False)
    else:
        context = torch.device("meta") if on_meta else contextlib.nullcontext()
    with context:
        model = build_classifier(model_cfg, labels, pretrained=t.strategy != "scratch" and not on_meta, seed=t.seed)
        if t.gradient_checkpointing:
            enable_checkpointing(model)
        if t.strategy == "lora":
            model = add_lora(model, t)  # the base frozen from here on: only the adapters and the head train
    return model


@contextlib.contextmanager
def _checkpoint_folder(session: WorkerSession) -> Iterator[str | None]:
    """The checkpoint to resume from as a local folder while set-up reads it (a remote one is
    fetched for the while), or None for a fresh start."""
    checkpoint = session.checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield folder


def _resume(folder: str | None, model: torch.nn.Module | None, rank: int) -> tuple[Progress, dict | None]:
    """The run's progress and training state from its latest checkpoint (``folder``), its
    weights loaded into ``model`` (None: the state only; a sharded checkpoint's weights go in
    once the model is sharded, ``_optimizer``); a fresh start when there is none."""
    if folder is None:
        return Progress(), None
    state = load_checkpoint(folder, model)
    if rank == 0:
        say(f"resuming from the checkpoint of epoch {state['epoch'] + 1}")
    return Progress.resumed_at(state), state


def _optimizer(
    model: torch.nn.Module, t: TrainConfig, groups: list[dict], state: dict | None, folder: str | None
) -> torch.optim.Optimizer:
    """The configured optimizer over ``groups``; resuming, its state out of the checkpoint
    (under FSDP, with the model's weights, out of the ranks' shards onto this rank's)."""
    from raybm.models.lora import is_lora

    optimizer = build_optimizer(model, t, groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    if state is None:
        return optimizer
    if t.parallelism == "fsdp":
        if folder is None or not is_sharded(folder):
            raise RaybmError(
                f"{folder}: an FSDP checkpoint without shards (written by an older raybm) cannot be "
                f"resumed; start the run under another name"
            )
        load_sharded(folder, model, optimizer, state["optimizer"], with_model=not is_lora(model))
    else:
        optimizer.load_state_dict(state["optimizer"])
    return optimizer


def _wrap(
    model: torch.nn.Module,
    t: TrainConfig,
    device: torch.device,
    session: WorkerSession,
    amp_dtype: torch.dtype | None,
    stream: StreamPlan | None = None,
    extra: dict | None = None,
) -> torch.nn.Module:
    """``model`` wrapped for data-parallel training: FSDP shards it in place (its weights
    streamed from the files with ``stream``), DDP replicates."""
    if t.parallelism == "fsdp":
        return wrap_fsdp(model, device, amp_dtype, offload=t.cpu_offload, stream=stream, extra=extra, seed=t.seed)
    kwargs = {"find_unused_parameters": True} if t.strategy in ("partial", "gradual") else {}
    return session.wrap_ddp(model, kwargs)


def _training_data(
    config: dict[str, Any], cfg: JobConfig, rank: int, world: int, session: WorkerSession
) -> tuple[WholeSplit | DataIterator, WholeSplit | DataIterator]:
    """(this worker's training shard, the whole validation split): read whole from the
    results folder when the driver says so (no Ray Data in the loop), else Ray Data shards."""
    if config.get("whole_splits"):
        t = cfg.train
        return (
            whole_split(config, cfg, "train", rank=rank, world=world, seed=t.seed, shuffle=True),
            whole_split(config, cfg, "validation"),
        )
    return session.dataset("train"), session.dataset("validation")  # validation: not sharded
