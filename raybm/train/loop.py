"""Worker side of training: ``run_worker`` runs in each Ray Train worker
(``train_loop_per_worker``) or, for a sweep trial of one worker, in the trial's own process
(``raybm.train.session``).

It reads only its shard of the training split, trains with the configured optimizer,
schedule, regularization and strategy, validates every epoch on the whole validation
split (each worker gets the same numbers, so all agree on early stopping), and reports metrics with a
Hugging Face checkpoint written by rank 0. A restarted worker resumes from the last
checkpoint: model, optimizer, scheduler, epoch and early-stopping state.

The steps: ``set_up`` (``raybm.train.worker``: model, data, optimizer; resuming from a
checkpoint), then per epoch ``train_epoch`` (its optimizer steps in ``optimizer_step``),
``validate`` (``raybm.train.scoring``), ``epoch_record`` and ``report``; once training ends,
rank 0 scores the best epoch on the test split.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raybm.errors import RaybmError
from raybm.metrics import flat
from raybm.train.checkpoints import checkpoint_scratch, save_checkpoint
from raybm.train.fsdp import gather_full
from raybm.train.losses import distill_loss, l1_penalty
from raybm.train.optim import lr_factor, plateau_scale, precision_name
from raybm.train.scoring import score_best_checkpoint, validate
from raybm.train.session import RayTrainSession
from raybm.train.sharded import save_sharded, write_shards_index
from raybm.train.worker import Progress, Worker, quiet_ray_train_logs, say, set_up

if TYPE_CHECKING:
    import torch

    from raybm.train.session import WorkerSession


@dataclass
class EpochStats:
    """What one epoch's training steps measured."""

    trainable: int  # parameters the strategy trained this epoch
    seen: int = 0  # training examples
    loss_sum: float = 0.0
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    warm_time: float = 0.0  # when the steady state began (after the first few steps)
    warm_seen: int = 0
    # Rank 0's (optimizer step of the run, mean training loss since the last point, learning
    # rate) at each progress line: the curves of TensorBoard (raybm.train.tensorboard).
    points: list[list[float]] = field(default_factory=list)
    logged: tuple[float, int] = (0.0, 0)  # (loss sum, examples) at the last point


def train_epoch(w: Worker, p: Progress, epoch: int) -> EpochStats:
    """One epoch of training steps over this worker's shard (at most ``steps_per_epoch``
    optimizer steps), with progress lines from rank 0."""
    import torch

    from raybm.models.strategies import apply_strategy

    t = w.cfg.train
    stats = EpochStats(trainable=apply_strategy(w.model, t, epoch, w.sizes))
    stats.warm_time = stats.started
    w.wrapped.train()
    loss_acc = torch.zeros((), device=w.device)  # summed on the device: no host sync per step
    if w.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(w.device)
    micro, epoch_steps = 0, 0
    warm_steps = min(3, w.steps_per_epoch // 4)  # steady-state rate: after these steps
    w.optimizer.zero_grad(set_to_none=True)
    if hasattr(w.train_shard, "set_epoch"):  # a whole split: this epoch's shuffled shard
        w.train_shard.set_epoch(epoch)
    collate = w.augment.for_epoch(epoch) if w.augment else w.collate  # augmented anew every epoch
    for batch in w.train_shard.iter_torch_batches(batch_size=t.batch_size, collate_fn=collate):
        batch = {k: v.to(w.device) for k, v in batch.items()}
        loss = _batch_loss(w, batch)
        (w.scaler.scale(loss / t.grad_accum) if w.scaler else loss / t.grad_accum).backward()
        stats.seen += len(batch["labels"])
        loss_acc += loss.detach() * len(batch["labels"])
        micro += 1
        if micro % t.grad_accum:
            continue
        optimizer_step(w, p)
        epoch_steps += 1
        if epoch_steps == warm_steps:
            stats.warm_time, stats.warm_seen = time.time(), stats.seen
        if w.rank == 0 and (epoch_steps % t.log_every_steps == 0 or epoch_steps == w.steps_per_epoch):
            _say_step(w, epoch, epoch_steps, stats, float(loss_acc))
            _note_point(w, epoch, epoch_steps, stats, float(loss_acc))
        if epoch_steps >= w.steps_per_epoch:
            break
    stats.loss_sum = float(loss_acc)  # waits for the device
    stats.ended = time.time()
    return stats


def _batch_loss(w: Worker, batch: dict) -> torch.Tensor:
    """The training loss of one batch: cross-entropy, plus distillation and L1 when set."""
    import torch

    t = w.cfg.train
    with torch.autocast(w.device.type, dtype=w.amp_dtype, enabled=w.amp_dtype is not None):
        logits = w.wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = w.loss_fn(logits.float(), batch["labels"])
    if w.teacher is not None:
        loss = (1 - t.distill_alpha) * loss + t.distill_alpha * distill_loss(
            logits.float(), w.teacher, batch, t.distill_temperature
        )
    if t.l1:
        loss = loss + t.l1 * l1_penalty(w.model)
    return loss


def optimizer_step(w: Worker, p: Progress) -> None:
    """One optimizer step over the accumulated gradients: clipping, the scheduled learning
    rate, the step, a pruned model's zeros put back."""
    import torch

    t = w.cfg.train
    if w.scaler:
        w.scaler.unscale_(w.optimizer)
    if t.grad_clip:  # under FSDP the gradients are sharded tensors: the norm is over every rank's shard
        torch.nn.utils.clip_grad_norm_([q for q in w.model.parameters() if q.requires_grad], t.grad_clip)
    factor = lr_factor(p.step, t, w.steps_per_epoch, w.total_steps) * p.lr_scale
    for group in w.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    if w.scaler:
        w.scaler.step(w.optimizer)
        w.scaler.update()
    else:
        w.optimizer.step()
    if w.masks:
        with torch.no_grad():
            for weight, mask in w.masks:
                weight.mul_(mask)
    w.optimizer.zero_grad(set_to_none=True)
    p.step += 1


def _say_step(w: Worker, epoch: int, epoch_steps: int, stats: EpochStats, loss_sum: float) -> None:
    """A progress line: the step, the running loss, the rate and the time left."""
    t = w.cfg.train
    rate = stats.seen * w.world / max(1e-9, time.time() - stats.started)
    left = (w.steps_per_epoch - epoch_steps) * t.batch_size * t.grad_accum * w.world / max(rate, 1e-9)
    say(
        f"epoch {epoch + 1}/{t.epochs} step {epoch_steps}/{w.steps_per_epoch} "
        f"loss {loss_sum / max(1, stats.seen):.4f} {rate:.1f} samples/s ETA {left:.0f}s"
    )


def _note_point(w: Worker, epoch: int, epoch_steps: int, stats: EpochStats, loss_sum: float) -> None:
    """Note a point of the training curves (``EpochStats.points``)."""
    since = stats.seen - stats.logged[1]
    if since > 0:
        stats.points.append(
            [
                epoch * w.steps_per_epoch + epoch_steps,
                (loss_sum - stats.logged[0]) / since,
                w.optimizer.param_groups[-1]["lr"],
            ]
        )
    stats.logged = (loss_sum, stats.seen)


def epoch_record(
    w: Worker, p: Progress, epoch: int, stats: EpochStats, val: dict, times: dict[str, float]
) -> tuple[dict[str, Any], float, bool]:
    """The epoch's metrics as reported, and whether early stopping ends the run now; ``p``
    moves on (best value, epochs without improvement, history)."""
    import torch

    t = w.cfg.train
    metrics = {
        "epoch": epoch + 1,
        "train_loss": stats.loss_sum / max(1, stats.seen),
        "lr": w.optimizer.param_groups[-1]["lr"],
        "samples_per_s": stats.seen * w.world / max(1e-9, stats.ended - stats.started),
        "steady_samples_per_s": (stats.seen - stats.warm_seen) * w.world / max(1e-9, stats.ended - stats.warm_time),
        "train_seconds": stats.ended - stats.started,
        "trainable_params": stats.trainable,
        "checkpoint_weights_mb": round(w.checkpoint_mb, 3),
        "precision": precision_name(w.amp_dtype),
        "resumed_from_epoch": p.resumed_from,
        "val_examples": val["examples"],
        **flat(val, "val_"),
        "val_per_class": json.dumps(val["per_class"]),
        "val_confusion_matrix": json.dumps(val["confusion_matrix"]),
        "started_at": stats.started,
        "finished_at": time.time(),
        "worker_nodes": json.dumps(w.nodes),
        "loop_started_at": times["loop_started"],
        "loop_ready_at": times["loop_ready"],
    }
    metrics["peak_rss_mb"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # this worker's process (Linux: KiB)
    if w.device.type == "cuda":
        metrics["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(w.device) / 1e9
    pg = w.session.placement_group()
    if pg is not None:  # lets a sweep free a stopped trial's workers (raybm.tune.trial)
        metrics["placement_group"] = pg
    value = metrics.get(t.metric, metrics.get(f"val_{t.metric}"))
    if value is None:
        scores = ", ".join(sorted(k for k in metrics if k.startswith("val_") and isinstance(metrics[k], float)))
        raise RaybmError(f"train.metric={t.metric!r} is none of an epoch's scores; choose one of {scores}")
    improved = p.best is None or (value > p.best if t.mode == "max" else value < p.best)
    p.best, p.bad_epochs = (value, 0) if improved else (p.best, p.bad_epochs + 1)
    p.lr_scale, p.plateau_epochs = plateau_scale(p.lr_scale, 0 if improved else p.plateau_epochs + 1, t)
    stop = bool(t.early_stopping_patience and p.bad_epochs >= t.early_stopping_patience)
    metrics["early_stopped"] = stop
    p.history.append(
        {
            **{
                k: v
                for k, v in metrics.items()
                if not k.startswith("val_per_class") and k not in ("val_confusion_matrix", "placement_group")
            },
            "steps": stats.points,
        }
    )
    metrics["history"] = json.dumps(p.history)
    return metrics, value, stop


@dataclass
class BestKept:
    """Rank 0's local copy of the best checkpoint so far, for the test split at the end."""

    folder: str | None = None
    epoch: int | None = None


def report(
    w: Worker, p: Progress, epoch: int, metrics: dict, value: float, scratch: str | None, kept: BestKept | None
) -> None:
    """Report the epoch with its checkpoint: written by rank 0, or under FSDP by every rank
    (its shards; Ray merges the ranks' folders into one checkpoint). With ``kept``, rank 0
    keeps the best epoch's checkpoint on local disk; on a tie the later epoch, as Ray Train
    and Tune rank checkpoints."""
    if w.fsdp:
        _report_sharded(w, p, epoch, metrics, scratch)
        return
    if w.rank != 0:
        w.session.report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix="epoch-", dir=scratch)
    save_checkpoint(
        tmp,
        w.model,
        w.tokenizer,
        w.cfg,
        w.labels,
        p.state(epoch, w.optimizer.state_dict()),
        p.history[-1],
        drift_reference=w.config.get("drift_reference"),
    )
    w.session.report(metrics, tmp)
    if kept is not None and value == p.best:
        if kept.folder:
            shutil.rmtree(kept.folder, ignore_errors=True)
        kept.folder, kept.epoch = tmp, epoch + 1
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _report_sharded(w: Worker, p: Progress, epoch: int, metrics: dict, scratch: str | None) -> None:
    """An FSDP epoch's checkpoint: each rank writes its shards of the model and the optimizer
    (``raybm.train.sharded``); rank 0 adds the rest of the model folder and the training
    state. A LoRA run's adapters and head are gathered whole instead (they are small), the
    frozen base never."""
    tmp = tempfile.mkdtemp(prefix="epoch-", dir=scratch)
    lora = w.adapter_keys is not None
    optimizer = save_sharded(tmp, w.model, w.optimizer, with_model=not lora)
    files = optimizer.pop("files")
    adapters = gather_full(w.model, sorted(set(w.adapter_keys.values()))) if w.adapter_keys is not None else None
    if w.rank == 0:
        write_shards_index(tmp, files, with_model=not lora)
        save_checkpoint(
            tmp,
            w.model,
            w.tokenizer,
            w.cfg,
            w.labels,
            p.state(epoch, optimizer),
            p.history[-1],
            weights=adapters,
            sharded=not lora,
            drift_reference=w.config.get("drift_reference"),
            adapter_keys=w.adapter_keys,
        )
    w.session.report(metrics, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> dict | None:
    """One Ray Train worker's whole job (``run_worker`` as a rank of the worker group)."""
    return run_worker(config, RayTrainSession())


def run_worker(config: dict[str, Any], session: WorkerSession) -> dict | None:
    """One worker's whole job: build the model, resume, train, validate, report and
    checkpoint every epoch; in a plain run, rank 0 then scores the best epoch on the test
    split and returns ``{"test": {"epoch": n, "metrics": {...}}}`` (``"test": None`` when it
    could not). ``session``: where it runs (raybm.train.session)."""
    times = {"loop_started": time.time()}  # with loop_ready: the worker's own set-up time, in every epoch record
    quiet_ray_train_logs()
    w, p = set_up(config, session)
    t = w.cfg.train
    # A plain run scores its best epoch on the test split here, once training ends (rank 0):
    # no Ray Data job and no second model load in the driver.
    kept = BestKept() if config.get("predictions_to") and w.rank == 0 else None
    # Where this rank writes its checkpoints first (rank 0; under FSDP every rank: its shards).
    scratch = checkpoint_scratch() if w.rank == 0 or w.fsdp else None
    last_epoch = None  # the last epoch this attempt ran (None: it ran none)
    times["loop_ready"] = time.time()
    for epoch in range(p.start_epoch, t.epochs):
        if t.fail_at_epoch == epoch + 1 and not p.resumed and w.rank == 0:
            raise RuntimeError(f"injected failure at the start of epoch {epoch + 1} (train.fail_at_epoch)")
        stats = train_epoch(w, p, epoch)
        # DDP: the unwrapped module (a forward through DDP outside training would expect a
        # backward). FSDP: the wrapped one, which gathers the sharded weights.
        val = validate(
            w.wrapped if w.fsdp else w.model,
            w.val_data,
            w.device,
            t.eval_batch_size,
            len(w.labels),
            w.labels,
            w.eval_loss_fn,
            w.collate,
        )
        metrics, value, stop = epoch_record(w, p, epoch, stats, val, times)
        if w.rank == 0:
            say(
                f"epoch {epoch + 1} done: train_loss {metrics['train_loss']:.4f} "
                f"val_loss {metrics['val_loss']:.4f} val_accuracy {metrics['val_accuracy']:.4f} "
                f"val_f1_macro {metrics['val_f1_macro']:.4f} ({metrics['samples_per_s']:.1f} samples/s)"
            )
        saving = time.time()
        report(w, p, epoch, metrics, value, scratch, kept)
        if w.rank == 0:
            say(f"checkpoint of epoch {epoch + 1} written and stored in {time.time() - saving:.1f} s")
        last_epoch = epoch + 1
        p.resumed = False
        if stop:
            if w.rank == 0:
                say(f"early stopping: no improvement of {t.metric} for {p.bad_epochs} epochs")
            break
    if last_epoch is None and p.history:
        # Restarted after its last epoch (a sweep killed between a trial's last checkpoint
        # and Tune's record of it): report where the run ended, or Tune would list the
        # trial with no epochs.
        w.session.report({**p.history[-1], "history": json.dumps(p.history)})
    try:
        if kept is not None:  # rank 0's return value reaches the driver (Result.return_value)
            return {
                "test": score_best_checkpoint(
                    config,
                    w.cfg,
                    w.model,
                    w.device,
                    w.labels,
                    w.collate,
                    kept.folder,
                    kept.epoch,
                    last_epoch,
                    w.session,
                )
            }
        return None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
