"""Worker side of training: ``train_loop_per_worker`` runs inside each Ray Train worker.

It reads only its shard of the training split, trains with the configured optimizer,
schedule, regularization and strategy, validates every epoch on the whole validation
split (each worker gets the same numbers, so all agree on early stopping), and reports metrics with a
Hugging Face checkpoint written by rank 0. A restarted worker resumes from the last
checkpoint: model, optimizer, scheduler, epoch and early-stopping state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from raybm.config import JobConfig, build_config
from raybm.metrics import confusion_matrix, flat, metrics_from_confusion
from raybm.results import EPOCH_METRICS_FILE, LABEL_MAP_FILE, MODEL_CONFIG_FILE, TRAIN_STATE_FILE, WEIGHTS_FILE

# The epoch's validation metrics, inside each checkpoint (sweeps rank checkpoints by it).
# What a usable checkpoint holds. A checkpoint folder whose upload a lost node or a stopped
# job cut short has only some of its files (S3 writes each file whole, in any order).
CHECKPOINT_FILES = (WEIGHTS_FILE, "config.json", LABEL_MAP_FILE, "tokenizer_config.json", EPOCH_METRICS_FILE)


def say(message: str) -> None:
    """Progress from worker 0. Not print(): Ray Train patches print into its logger, which
    also echoes to the console, so each line would show twice."""
    import sys

    sys.stdout.write(f"[raybm] {message}\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ optimizer, schedule


def build_optimizer(model, t, groups: list[dict] | None = None):
    """The configured optimizer over parameter groups (no decay on biases / norms). Pass
    ``groups`` made before FSDP wrapping: wrapping flattens the parameters it shards, so
    their shapes no longer tell weights from biases."""
    import torch

    from raybm.models.build import param_groups

    if groups is None:
        groups = param_groups(model, t.lr, t.weight_decay, t.layerwise_lr_decay)
    if t.optimizer in ("sgd", "momentum"):
        momentum = t.momentum if t.optimizer == "momentum" else 0.0
        return torch.optim.SGD(groups, lr=t.lr, momentum=momentum,
                               nesterov=t.nesterov and t.optimizer == "momentum")
    if t.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=t.lr)
    if t.optimizer == "adadelta":
        return torch.optim.Adadelta(groups, lr=t.lr)
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=t.lr, momentum=t.momentum)
    if t.optimizer == "adam":
        # Adam's weight decay is the classic L2 term added to the gradient.
        return torch.optim.Adam(groups, lr=t.lr)
    return torch.optim.AdamW(groups, lr=t.lr)


def lr_factor(step: int, t, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of each group's base learning rate after ``step`` optimizer steps."""
    warmup = int(round(t.warmup_ratio * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if t.scheduler == "constant":
        return 1.0
    if t.scheduler == "step":
        return t.step_gamma ** (step // max(1, steps_per_epoch * t.step_epochs))
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, progress))
    if t.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


# --------------------------------------------------------------------------- the loop


def _amp(device, precision: str):
    """(autocast dtype or None, use a grad scaler) for this device and setting."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None, False
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def _save_checkpoint(folder: str, model, tokenizer, cfg: JobConfig, labels: list[str], state: dict,
                     metrics: dict, weights: dict | None = None) -> None:
    import torch

    model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, LABEL_MAP_FILE), "w", encoding="utf-8") as f:
        json.dump({"labels": labels, "label_to_id": {lab: i for i, lab in enumerate(labels)}}, f, indent=2)
    with open(os.path.join(folder, MODEL_CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(cfg.to_yaml())
    torch.save(state, os.path.join(folder, TRAIN_STATE_FILE))
    with open(os.path.join(folder, EPOCH_METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)


def _load_weights(folder: str, model) -> None:
    """Load a checkpoint's weights into ``model`` (unwrapped)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)), strict=False)


def _load_checkpoint(folder: str, model) -> dict:
    """Load the weights into ``model``; return the training state (optimizer, epoch ...)."""
    import torch

    _load_weights(folder, model)
    return torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True)


def _wrap_fsdp(model, device):
    """Shard ``model`` over all workers with FSDP: one unit per encoder layer plus one for the
    rest, so a forward pass holds one layer's full weights at a time. The original
    parameters stay visible (names for freezing by strategy and for the optimizer's groups).

    raybm wraps it itself rather than through Ray Train's ``prepare_model``, which needs
    CUDA and leaves a single worker unwrapped: this runs on CPU workers (gloo) too, and one
    worker runs the same code as many."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from raybm.errors import RaybmError
    from raybm.models.build import encoder_layers

    try:
        policy = ModuleWrapPolicy({type(layer) for layer in encoder_layers(model)})
    except RaybmError:  # no layer stack (the TextCNN baseline): one unit
        policy = None
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=device)


def _fsdp_configs(device, rank0_only: bool):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig

    offload = device.type != "cpu"  # gathered to host memory; on CPU it is there already
    return (FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=False))


def _fsdp_full_state(wrapped, optimizer, device) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts of an FSDP model, gathered to rank 0 (a collective:
    every rank calls it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, *_fsdp_configs(device, True)):
        return wrapped.state_dict(), FSDP.optim_state_dict(wrapped, optimizer)


def _fsdp_optim_to_load(wrapped, optimizer, full: dict, device) -> dict:
    """This rank's optimizer state out of a full one (the state dict type must be set)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, *_fsdp_configs(device, False)):
        return FSDP.optim_state_dict_to_load(wrapped, optimizer, full)


def _validate(model, data, device, batch_size: int, num_classes: int, labels: list[str], loss_fn, collate):
    """Metrics on the whole validation split (every worker reads all of it and gets the
    same numbers, so they agree on early stopping without a collective)."""
    import torch

    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = 0.0
    with torch.no_grad():
        for batch in data.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += float(loss_fn(logits, batch["labels"]).item()) * len(batch["labels"])
            cm += confusion_matrix(batch["labels"].cpu().numpy(), logits.argmax(-1).cpu().numpy(), num_classes)
    return metrics_from_confusion(cm, labels, loss=loss_sum / max(1, int(cm.sum())))


def score_test_split(model, data, device, batch_size: int, labels: list[str], collate) -> tuple[dict, Any]:
    """Metrics and every example's prediction on the test split (rows with text, label and
    token ids): the same numbers and columns as ``raybm.inference.evaluate.score_dataset`` gives for
    the published model, without a Ray Data job of its own."""
    import pandas as pd
    import torch

    model.eval()
    frames = []
    with torch.no_grad():
        for batch in data.iter_batches(batch_size=batch_size, batch_format="numpy"):
            tensors = collate(batch)
            logits = model(input_ids=tensors["input_ids"].to(device),
                           attention_mask=tensors["attention_mask"].to(device)).logits.float()
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            frames.append(pd.DataFrame({"text": batch["text"].astype(str), "label": batch["label"].astype(np.int64),
                                        "pred": probs.argmax(-1).astype(np.int64), "confidence": probs.max(-1),
                                        **{f"prob_{i}": probs[:, i] for i in range(probs.shape[1])}}))
    columns = ["text", "label", "pred", "confidence", *[f"prob_{i}" for i in range(len(labels))]]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    cm = confusion_matrix(frame["label"].to_numpy(), frame["pred"].to_numpy(), len(labels))
    return metrics_from_confusion(cm, labels), frame[columns]


def _score_best_checkpoint(config: dict, cfg: JobConfig, model, device, labels: list[str], collate,
                           kept: str | None, kept_epoch: int | None, last_epoch: int | None) -> dict | None:
    """Rank 0, once training ends: the best epoch's weights scored on the test split, the
    predictions written where the driver said (``predictions_to``). None when the best
    checkpoint is not at hand here (it was written before a restart): the driver then
    scores the published model."""
    import ray.train

    from raybm.results import Results

    if kept_epoch is None:
        return None
    if kept_epoch != last_epoch:  # the live weights are a later, worse epoch's
        _load_weights(kept, model)
    if config.get("whole_splits"):
        test_data = _whole_split(config, cfg, "test", texts=True)
    else:
        test_data = ray.train.get_dataset_shard("test")
    metrics, frame = score_test_split(model, test_data, device, cfg.train.eval_batch_size, labels, collate)
    Results.from_config(cfg.storage).write_parquet(config["predictions_to"], frame)
    return {"epoch": kept_epoch, "metrics": metrics}


def _whole_split(config: dict, cfg: JobConfig, split: str, *, texts: bool = False, **shard):
    """A split of the dataset the driver named (``whole_splits``), read whole here from the
    results folder (``raybm.data.whole``); ``shard``: rank, world, seed and shuffle."""
    from raybm.data.whole import WholeSplit, read_whole_split
    from raybm.results import Results

    width = cfg.data.max_length
    arrays = read_whole_split(Results.from_config(cfg.storage), config["whole_splits"], split, width, texts=texts)
    return WholeSplit(arrays, width=width if cfg.data.padding == "max_length" else None, **shard)


def checkpoint_scratch(root: str | None = None) -> str:
    """This worker's own folder for local checkpoint copies (under ``root``, by default the
    node's temp folder). Folders of workers that died on this node (killed, so no clean-up
    of their own ran) are removed first."""
    root = root or os.path.join(tempfile.gettempdir(), "raybm-checkpoints")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.isdigit() and int(name) != os.getpid() and not _process_alive(int(name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    mine = os.path.join(root, str(os.getpid()))
    os.makedirs(mine, exist_ok=True)
    return mine


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _load_teacher(folder: str, device):
    """The distillation teacher, frozen, in eval mode."""
    from raybm.inference.loading import load_model_folder

    teacher, _, _ = load_model_folder(folder)
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _distill_loss(student_logits, teacher, batch, temperature: float):
    """KL divergence between the teacher's and the student's softened distributions,
    scaled by T^2 so its gradients keep their size as T changes (Hinton et al.)."""
    import torch

    with torch.no_grad():
        soft = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return torch.nn.functional.kl_div(torch.log_softmax(student_logits / temperature, dim=-1),
                                      torch.softmax(soft / temperature, dim=-1),
                                      reduction="batchmean") * temperature ** 2


def _quiet_ray_train_logs() -> None:
    """Ray Train logs, at INFO in every worker, each report with its whole metrics dict (the
    history included, so the line grows every epoch) and each checkpoint it saves. The
    loop's own epoch line says what matters once; warnings and errors still show."""
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # it logs under its file name
    except ImportError:  # another Ray layout: its lines stay
        pass


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


def train_loop_per_worker(config: dict[str, Any]) -> dict | None:
    """One Ray Train worker's whole job: build the model, resume, train, validate, report
    and checkpoint every epoch; in a plain run, rank 0 then scores the best epoch on the
    test split and returns ``{"test": {"epoch": n, "metrics": {...}}}`` (``"test": None``
    when it could not)."""
    loop_started = time.time()  # with loop_ready below: the worker's own set-up time, in every epoch record
    import ray.train
    import ray.train.torch
    import torch

    from raybm.data.tokenizing import PadCollate
    from raybm.models.build import apply_strategy, build_classifier, load_tokenizer, param_groups

    _quiet_ray_train_logs()
    cfg = build_config(config["job"])
    t = cfg.train
    labels: list[str] = config["labels"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))  # Ray's OMP setting is not enough
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()

    # 1. Model, optimizer, loss; all parameters trainable when wrapped (DDP tracks them all).
    model = build_classifier(cfg.model, labels, pretrained=t.strategy != "scratch", seed=t.seed)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    model.to(device)
    weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device) \
        if config.get("class_weights") else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)
    eval_loss_fn = torch.nn.CrossEntropyLoss()
    per_worker_rows = math.ceil(config["n_train"] / world)
    steps_per_epoch = max(1, math.ceil(per_worker_rows / t.batch_size / t.grad_accum))
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    total_steps = steps_per_epoch * t.epochs

    # 2. Resume from the last checkpoint if this is a restart (worker failure or a rerun).
    start_epoch, step, best, bad_epochs, resumed = 0, 0, None, 0, False
    resumed_from = 0  # epochs already done when this attempt started (0: a fresh run)
    history: list[dict[str, Any]] = []  # every epoch's metrics, kept in the checkpoints
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:  # the weights go in before wrapping, the optimizer state after
        with checkpoint.as_directory() as folder:
            state = _load_checkpoint(folder, model)
        start_epoch, step = state["epoch"] + 1, state["step"]
        best, bad_epochs, resumed = state.get("best"), state.get("bad_epochs", 0), True
        resumed_from = start_epoch
        history = list(state.get("history", []))
        if rank == 0:
            say(f"resuming from the checkpoint of epoch {state['epoch'] + 1}")

    fsdp = t.parallelism == "fsdp"
    # Optimizer groups and parameter sizes from the unwrapped model: FSDP flattens what it shards.
    groups = param_groups(model, t.lr, t.weight_decay, t.layerwise_lr_decay)
    sizes = {id(p): p.numel() for p in model.parameters()}
    if fsdp:
        wrapped = _wrap_fsdp(model, device)
    else:
        kwargs = {"find_unused_parameters": True} if t.strategy in ("partial", "gradual") else {}
        wrapped = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                                                parallel_strategy_kwargs=kwargs)
    nodes = worker_nodes(world)
    optimizer = build_optimizer(model, t, groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    if state is not None:
        optimizer.load_state_dict(_fsdp_optim_to_load(wrapped, optimizer, state["optimizer"], device)
                                  if fsdp else state["optimizer"])
    amp_dtype, use_scaler = _amp(device, t.precision)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    # Rows come tokenized (stored by the data stage, or by Tokenize): padded here, per batch.
    collate = PadCollate(width=cfg.data.max_length if cfg.data.padding == "max_length" else None)
    if config.get("whole_splits"):  # read here, whole: no Ray Data in the loop
        train_shard = _whole_split(config, cfg, "train", rank=rank, world=world, seed=t.seed, shuffle=True)
        val_data = _whole_split(config, cfg, "validation")
    else:
        train_shard = ray.train.get_dataset_shard("train")
        val_data = ray.train.get_dataset_shard("validation")  # not sharded: the whole split
    trainable_params = [p for p in model.parameters()]
    # Fine-tuning a pruned model: the zeros of Linear weights stay zero.
    masks = [(m.weight, m.weight.ne(0)) for m in model.modules()
             if isinstance(m, torch.nn.Linear)] if t.keep_sparsity else []
    teacher = _load_teacher(t.distill_from, device) if t.distill_from else None
    # A plain run scores its best epoch on the test split here, once training ends (rank 0):
    # no Ray Data job and no second model load in the driver.
    score_test = bool(config.get("predictions_to")) and rank == 0
    kept, kept_epoch = None, None  # rank 0's local copy of the best checkpoint
    scratch = checkpoint_scratch() if rank == 0 else None  # where rank 0 writes checkpoints first
    last_epoch = None  # the last epoch this attempt ran (None: it ran none)
    loop_ready = time.time()

    for epoch in range(start_epoch, t.epochs):
        if t.fail_at_epoch == epoch + 1 and not resumed and rank == 0:
            raise RuntimeError(f"injected failure at the start of epoch {epoch + 1} (train.fail_at_epoch)")
        n_trainable = apply_strategy(model, t, epoch, sizes)
        wrapped.train()
        started, seen, micro = time.time(), 0, 0
        epoch_started = started
        loss_acc = torch.zeros((), device=device)  # summed on the device: no host sync per step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        epoch_steps = 0
        warm_steps = min(3, steps_per_epoch // 4)  # steady-state rate: after these steps
        warm_time, warm_seen = started, 0
        optimizer.zero_grad(set_to_none=True)
        if hasattr(train_shard, "set_epoch"):  # a whole split: this epoch's shuffled shard
            train_shard.set_epoch(epoch)
        for batch in train_shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = loss_fn(logits.float(), batch["labels"])
            if teacher is not None:
                loss = (1 - t.distill_alpha) * loss + t.distill_alpha * _distill_loss(
                    logits.float(), teacher, batch, t.distill_temperature)
            if t.l1:
                loss = loss + t.l1 * sum(p.abs().sum() for p in trainable_params if p.requires_grad and p.dim() > 1)
            (scaler.scale(loss / t.grad_accum) if scaler else loss / t.grad_accum).backward()
            seen += len(batch["labels"])
            loss_acc += loss.detach() * len(batch["labels"])
            micro += 1
            if micro % t.grad_accum:
                continue
            if scaler:
                scaler.unscale_(optimizer)
            if t.grad_clip:
                if fsdp:  # the norm over every rank's shard
                    wrapped.clip_grad_norm_(t.grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
            factor = lr_factor(step, t, steps_per_epoch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if masks:
                with torch.no_grad():
                    for weight, mask in masks:
                        weight.mul_(mask)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_steps += 1
            if epoch_steps == warm_steps:
                warm_time, warm_seen = time.time(), seen
            if rank == 0 and (epoch_steps % t.log_every_steps == 0 or epoch_steps == steps_per_epoch):
                rate = seen * world / max(1e-9, time.time() - started)
                left = (steps_per_epoch - epoch_steps) * t.batch_size * t.grad_accum * world / max(rate, 1e-9)
                say(f"epoch {epoch + 1}/{t.epochs} step {epoch_steps}/{steps_per_epoch} "
                    f"loss {float(loss_acc) / max(1, seen):.4f} {rate:.1f} samples/s ETA {left:.0f}s")
            if epoch_steps >= steps_per_epoch:
                break
        loss_sum = float(loss_acc)  # waits for the device
        train_end = time.time()
        train_time = train_end - started

        # 3. Validate on the whole validation split.
        # DDP: the unwrapped module (a forward through DDP outside training would expect a
        # backward). FSDP: the wrapped one, which gathers the sharded weights.
        val = _validate(wrapped if fsdp else model, val_data, device, t.eval_batch_size, len(labels), labels, eval_loss_fn,
                        collate)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
                   "lr": optimizer.param_groups[-1]["lr"], "samples_per_s": seen * world / max(1e-9, train_time),
                   "steady_samples_per_s": (seen - warm_seen) * world / max(1e-9, train_end - warm_time),
                   "train_seconds": train_time,
                   "trainable_params": n_trainable, "resumed_from_epoch": resumed_from,
                   "val_examples": val["examples"], **flat(val, "val_"),
                   "val_per_class": json.dumps(val["per_class"]), "val_confusion_matrix": json.dumps(val["confusion_matrix"]),
                   "started_at": epoch_started, "finished_at": time.time(), "worker_nodes": json.dumps(nodes),
                   "loop_started_at": loop_started, "loop_ready_at": loop_ready}
        if device.type == "cuda":
            metrics["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        pg = ray.util.get_current_placement_group()
        if pg is not None:  # lets a sweep free a stopped trial's workers (raybm.tune.sweep)
            metrics["placement_group"] = pg.id.hex()
        value = metrics[t.metric] if t.metric in metrics else metrics.get(f"val_{t.metric}")
        improved = best is None or (value > best if t.mode == "max" else value < best)
        best, bad_epochs = (value, 0) if improved else (best, bad_epochs + 1)
        stop = bool(t.early_stopping_patience and bad_epochs >= t.early_stopping_patience)
        metrics["early_stopped"] = stop
        history.append({k: v for k, v in metrics.items() if not k.startswith("val_per_class")
                        and k not in ("val_confusion_matrix", "placement_group")})
        metrics["history"] = json.dumps(history)
        if rank == 0:
            say(f"epoch {epoch + 1} done: train_loss {metrics['train_loss']:.4f} "
                  f"val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f} "
                  f"val_f1_macro {metrics['val_f1_macro']:.4f} ({metrics['samples_per_s']:.1f} samples/s)")

        # 4. Report with a checkpoint (written by rank 0 only).
        full_weights, optim_state = _fsdp_full_state(wrapped, optimizer, device) if fsdp else (None, optimizer.state_dict())
        state = {"epoch": epoch, "step": step, "best": best, "bad_epochs": bad_epochs,
                 "optimizer": optim_state, "history": history}
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="epoch-", dir=scratch)
            _save_checkpoint(tmp, model, tokenizer, cfg, labels, state, history[-1], weights=full_weights)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             delete_local_checkpoint_after_upload=False)
            # The best epoch so far stays on local disk for the test split. On a tie the later
            # epoch, as Ray Train ranks checkpoints (and keeps them under train.keep_checkpoints).
            if score_test and value == best:
                if kept:
                    shutil.rmtree(kept, ignore_errors=True)
                kept, kept_epoch = tmp, epoch + 1
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint=None)
        last_epoch = epoch + 1
        resumed = False
        if stop:
            if rank == 0:
                say(f"early stopping: no improvement of {t.metric} for {bad_epochs} epochs")
            break

    if last_epoch is None and history:
        # Restarted after its last epoch (a sweep killed between a trial's last checkpoint
        # and Tune's record of it): report where the run ended, or Tune would list the
        # trial with no epochs.
        ray.train.report({**history[-1], "history": json.dumps(history)}, checkpoint=None)
    try:
        if score_test:  # rank 0's return value reaches the driver (Result.return_value)
            return {"test": _score_best_checkpoint(config, cfg, model, device, labels, collate, kept, kept_epoch,
                                                   last_epoch)}
        return None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
