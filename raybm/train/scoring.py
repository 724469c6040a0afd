"""Scoring inside the training workers: the validation split every epoch, and the best
epoch on the test split once training ends (no Ray Data job and no second model load)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from raybm.config import JobConfig
from raybm.inference.loading import read_calibration
from raybm.metrics import calibration, confusion_matrix, metrics_from_confusion, served_calibration
from raybm.storage.results import Results
from raybm.train.checkpoints import load_weights

if TYPE_CHECKING:
    import torch
    from ray.data import DataIterator
    from torch import nn

    from raybm.data.whole import WholeSplit
    from raybm.train.session import WorkerSession


def validate(
    model: nn.Module,
    data: DataIterator | WholeSplit,
    device: torch.device,
    batch_size: int,
    num_classes: int,
    labels: list[str],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    collate: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """Metrics on the whole validation split (every worker reads all of it and gets the
    same numbers, so they agree on early stopping without a collective), with the
    temperature that calibrates this epoch's confidences on it (``raybm.metrics.calibration``)."""
    import torch

    model.eval()
    cm: np.ndarray = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = 0.0
    seen_logits, seen_labels = [], []
    with torch.no_grad():
        for batch in data.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += float(loss_fn(logits, batch["labels"]).item()) * len(batch["labels"])
            cm += confusion_matrix(batch["labels"].cpu().numpy(), logits.argmax(-1).cpu().numpy(), num_classes)
            seen_logits.append(logits.cpu().numpy())
            seen_labels.append(batch["labels"].cpu().numpy())
    out = metrics_from_confusion(cm, labels, loss=loss_sum / max(1, int(cm.sum())))
    if seen_labels:
        out.update(calibration(np.concatenate(seen_logits), np.concatenate(seen_labels)))
    return out


def score_test_split(
    model: nn.Module,
    data: DataIterator | WholeSplit,
    device: torch.device,
    batch_size: int,
    labels: list[str],
    collate: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]],
    temperature: float = 1.0,
) -> tuple[dict, Any]:
    """Metrics and every example's prediction on the test split (rows with text, label and
    token ids), the probabilities through the model's ``temperature``: the same numbers and
    columns as ``raybm.inference.evaluate.score_dataset`` gives for the published model,
    without a Ray Data job of its own."""
    import pandas as pd
    import torch

    model.eval()
    frames = []
    with torch.no_grad():
        for batch in data.iter_batches(batch_size=batch_size, batch_format="numpy"):
            tensors = collate(batch)
            logits = model(
                input_ids=tensors["input_ids"].to(device), attention_mask=tensors["attention_mask"].to(device)
            ).logits.float()
            probs = torch.softmax(logits / temperature, dim=-1).cpu().numpy()
            frames.append(
                pd.DataFrame(
                    {
                        "text": batch["text"].astype(str),
                        "label": batch["label"].astype(np.int64),
                        "pred": probs.argmax(-1).astype(np.int64),
                        "confidence": probs.max(-1),
                        **{f"prob_{i}": probs[:, i] for i in range(probs.shape[1])},
                    }
                )
            )
    columns = ["text", "label", "pred", "confidence", *[f"prob_{i}" for i in range(len(labels))]]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    cm = confusion_matrix(frame["label"].to_numpy(), frame["pred"].to_numpy(), len(labels))
    metrics = metrics_from_confusion(cm, labels)
    if len(frame):
        metrics.update(served_calibration(frame[columns[4:]].to_numpy(), frame["label"].to_numpy(), temperature))
    return metrics, frame[columns]


def score_best_checkpoint(
    config: dict,
    cfg: JobConfig,
    model: nn.Module,
    device: torch.device,
    labels: list[str],
    collate: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]],
    kept: str | None,
    kept_epoch: int | None,
    last_epoch: int | None,
    session: WorkerSession,
) -> dict | None:
    """Rank 0, once training ends: the best epoch's weights scored on the test split, the
    predictions written where the driver said (``predictions_to``). None when the best
    checkpoint is not at hand here (it was written before a restart): the driver then
    scores the published model."""
    if kept_epoch is None or kept is None:
        return None
    if kept_epoch != last_epoch:  # the live weights are a later, worse epoch's
        load_weights(kept, model)
    if config.get("whole_splits"):
        test_data = whole_split(config, cfg, "test", texts=True)
    else:
        test_data = session.dataset("test")
    metrics, frame = score_test_split(
        model, test_data, device, cfg.train.eval_batch_size, labels, collate, read_calibration(kept)["temperature"]
    )
    Results.from_config(cfg.storage).write_parquet(config["predictions_to"], frame)
    return {"epoch": kept_epoch, "metrics": metrics}


def whole_split(config: dict, cfg: JobConfig, split: str, *, texts: bool = False, **shard: Any) -> WholeSplit:
    """A split of the dataset the driver named (``whole_splits``), read whole here from the
    results folder (``raybm.data.whole``); ``shard``: rank, world, seed and shuffle."""
    from raybm.data.whole import WholeSplit, read_whole_split

    width = cfg.data.max_length
    arrays = read_whole_split(Results.from_config(cfg.storage), config["whole_splits"], split, width, texts=texts)
    return WholeSplit(arrays, width=width if cfg.data.padding == "max_length" else None, **shard)
