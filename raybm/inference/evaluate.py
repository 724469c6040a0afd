"""Scoring a saved model folder on a dataset, on Ray Data.

``Classify`` is a Ray Data callable class: each worker process loads the model once
(``raybm.data.udf``) and labels batches of text. ``score_split`` runs it over a prepared split and turns the predicted
and true ids (integers only reach the driver) into metrics.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raybm.config import StorageConfig
from raybm.errors import DataError
from raybm.inference.loading import load_predictor, read_calibration, read_label_map
from raybm.metrics import calibration, confusion_matrix, metrics_from_confusion, rescaled, served_calibration
from raybm.storage.layout import CALIBRATION_FILE
from raybm.storage.model_cache import fetch_model

if TYPE_CHECKING:
    from ray.data import Dataset

    from raybm.config import JobConfig


class Classify:
    """Text -> predicted id, confidence and class probabilities (a Ray Data UDF)."""

    def __init__(
        self,
        model_dir: str,
        max_length: int | None = None,
        threads: int = 1,
        batch_size: int = 64,
        keep_text: bool = False,
        storage: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        if model_dir.startswith("s3://"):  # fetched here, on the node this task runs on
            model_dir = fetch_model(model_dir, StorageConfig(**(storage or {})))
        self.keep_text = keep_text
        self.predictor = load_predictor(
            model_dir, "torch", threads=threads, max_length=max_length, batch_size=batch_size, device=device
        )
        self.labels = self.predictor.labels

    def predict(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, one row per text."""
        return self.predictor.predict(texts)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        probs = self.predict(batch["text"].astype(str).tolist())
        out = pd.DataFrame({"pred": probs.argmax(-1).astype(np.int64), "confidence": probs.max(-1)})
        if "label" in batch:
            out["label"] = batch["label"].to_numpy(dtype=np.int64)
        if self.keep_text:
            out["text"] = batch["text"].astype(str).to_numpy()
        for i in range(probs.shape[1]):
            out[f"prob_{i}"] = probs[:, i]
        return out


def score_dataset(
    model_dir: str,
    ds: Dataset,
    max_length: int | None = None,
    num_cpus: float = 1.0,
    predictions: bool = False,
    storage: StorageConfig | None = None,
) -> Any:
    """Metrics of the model in ``model_dir`` (a local folder, or an ``s3://`` one reached with
    the ``storage`` settings) on a Dataset with columns text and label.

    With ``predictions`` returns ``(metrics, frame)``: one row per example in input order
    with text, label, pred, confidence and ``prob_<i>`` per class (the dashboard's error
    analysis reads it)."""
    import ray.data

    from raybm.data.udf import map_batches_cached

    labels = read_label_map(model_dir, storage)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = predictions
    try:
        scored = map_batches_cached(
            ds,
            Classify,
            {
                "model_dir": model_dir,
                "max_length": max_length,
                "threads": max(1, int(num_cpus)),
                "keep_text": predictions,
                "storage": asdict(storage) if storage else None,
            },
            concurrency=1,
            batch_format="pandas",
            batch_size=256,
            num_cpus=num_cpus,
        )
        probs = [f"prob_{i}" for i in range(len(labels))]
        frame = scored.to_pandas() if predictions else scored.select_columns(["label", "pred", *probs]).to_pandas()
    finally:
        ctx.execution_options.preserve_order = saved
    cm = confusion_matrix(frame["label"].to_numpy(), frame["pred"].to_numpy(), len(labels))
    metrics = metrics_from_confusion(cm, labels)
    if len(frame):  # the probabilities came through the model's temperature
        metrics.update(
            served_calibration(
                frame[probs].to_numpy(), frame["label"].to_numpy(), read_calibration(model_dir, storage)["temperature"]
            )
        )
    if predictions:
        return metrics, frame[["text", "label", "pred", "confidence", *[f"prob_{i}" for i in range(len(labels))]]]
    return metrics


def calibrate_folder(model_dir: str, ds: Dataset, max_length: int = 128) -> dict[str, Any]:
    """Fit the temperature of the local model folder ``model_dir`` on ``ds`` (its
    validation split) and write it there (``calibration.json``): for a model whose weights
    no training epoch validated, such as a soup. Returns what it wrote."""
    _, frame = score_dataset(model_dir, ds, max_length, predictions=True)
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    # Back to the model's own probabilities (the folder may carry another model's temperature).
    own = rescaled(probs, 1.0 / read_calibration(model_dir)["temperature"])
    found = {
        **calibration(np.log(np.clip(own, 1e-12, 1.0)), frame["label"].to_numpy()),
        "fitted_on": "validation",
        "examples": int(len(frame)),
    }
    with open(os.path.join(model_dir, CALIBRATION_FILE), "w", encoding="utf-8") as f:
        json.dump(found, f, indent=2)
    return found


def _kept_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.loc[batch["drop_reason"] == "", ["text", "label"]]


def score_source(model_dir: str, cfg: JobConfig, predictions: bool = False, max_length: int | None = None) -> Any:
    """Metrics of a model on any data source (``cfg.data``: a file, folder, glob or built-in
    corpus), cleaned like the training data and labelled by the model's own label map, at
    ``max_length`` tokens (None: the length the model was trained with).
    Rows whose label the model does not know are an error, unless ``data.exclude_labels``
    drops them; dropped rows are counted in ``dropped``. With ``predictions`` returns
    ``(metrics, frame)`` as ``score_dataset`` does."""
    from raybm.data import cleaning
    from raybm.data.pipeline import count_values
    from raybm.data.sources import read_source, resolve_source

    labels = read_label_map(model_dir)
    src = resolve_source(cfg.data, cfg.storage)
    exclude = list(cfg.data.exclude_labels)
    if src.all_labels is not None:
        exclude += [lab for lab in src.all_labels if lab not in labels]
    mapper = cleaning.LabelMapper(labels, cfg.data.label_values, exclude)
    marked = (
        read_source(src)
        .map_batches(
            cleaning.clean_batch,
            batch_format="pandas",
            fn_kwargs=dict(cfg=cfg.data.clean, mapper=mapper, twitter_repair=src.kind == "twitter-sentiment"),
        )
        .materialize()
    )
    dropped = {k: v for k, v in count_values(marked, "drop_reason").items() if k}
    if dropped.get(cleaning.UNKNOWN_LABEL):
        unknown = count_values(marked, "label_raw", where=("drop_reason", cleaning.UNKNOWN_LABEL))
        raise DataError(
            f"label value(s) {sorted(unknown)[:10]} are not classes of this model ({labels}); map "
            f"them with data.label_values or drop them with data.exclude_labels"
        )
    kept = marked.map_batches(_kept_rows, batch_format="pandas")
    scored = score_dataset(model_dir, kept, max_length, predictions=predictions)
    metrics = scored[0] if predictions else scored
    metrics["dropped"] = dropped
    return scored


def named_predictions(frame: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """``score_dataset``'s prediction frame for people: label names instead of ids, and
    ``prob_<label>`` columns."""
    out = frame[["text"]].copy()
    out["label"] = [labels[i] for i in frame["label"]]
    out["predicted_label"] = [labels[i] for i in frame["pred"]]
    out["correct"] = frame["label"].to_numpy() == frame["pred"].to_numpy()
    out["confidence"] = frame["confidence"].to_numpy()
    for i, lab in enumerate(labels):
        out[f"prob_{lab}"] = frame[f"prob_{i}"].to_numpy()
    return out
