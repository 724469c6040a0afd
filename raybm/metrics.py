"""Classification metrics, shared by training, sweeps, evaluation and the dashboard.

Everything is derived from a confusion matrix, which workers can sum across shards
(``torch.distributed.all_reduce``) before any ratio is taken, so distributed validation
gives exactly the single-process numbers. Metric names live here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raybm.errors import ConfigError

# Names reported every epoch (prefixed with "val_") and in metrics.json (test).
SUMMARY_METRICS = ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro")
# Metrics a model soup can be scored by: the classification scores of a scored split.
SCORABLE = ("accuracy", "f1_macro", "precision_macro", "recall_macro")


def soup_metric(metric: str) -> str:
    """The scored-split key for a validation metric name (``val_f1_macro`` -> ``f1_macro``)."""
    key = metric[len("val_"):] if metric.startswith("val_") else metric
    if key not in SCORABLE:
        raise ConfigError(f"a model soup is picked by a classification score ({', '.join('val_' + k for k in SCORABLE)}); "
                          f"{metric!r} is not one")
    return key


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def metrics_from_confusion(cm: np.ndarray, labels: list[str], loss: float | None = None) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1, per-class scores and the matrix itself.

    A class never predicted has precision 0 (and never present, recall 0), as in
    scikit-learn's ``zero_division=0``.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    out: dict[str, Any] = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "per_class": {lab: {"precision": float(precision[i]), "recall": float(recall[i]),
                            "f1": float(f1[i]), "support": int(actual[i])} for i, lab in enumerate(labels)},
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "labels": list(labels),
        "examples": int(total),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


def flat(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scalar summary metrics with a prefix (``val_f1_macro`` ...), for reports."""
    return {f"{prefix}{k}": float(metrics[k]) for k in SUMMARY_METRICS if k in metrics}
