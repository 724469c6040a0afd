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
# How well a split's confidences match its accuracy (``calibration``): reported beside them.
CALIBRATION_METRICS = ("temperature", "ece", "ece_calibrated")
# Metrics a model soup can be scored by: the classification scores of a scored split.
SCORABLE = ("accuracy", "f1_macro", "precision_macro", "recall_macro")


def soup_metric(metric: str) -> str:
    """The scored-split key for a validation metric name (``val_f1_macro`` -> ``f1_macro``)."""
    key = metric[len("val_") :] if metric.startswith("val_") else metric
    if key not in SCORABLE:
        raise ConfigError(
            f"a model soup is picked by a classification score ({', '.join('val_' + k for k in SCORABLE)}); "
            f"{metric!r} is not one"
        )
    return key


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm: np.ndarray = np.zeros((num_classes, num_classes), dtype=np.int64)
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
        "per_class": {
            lab: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "labels": list(labels),
        "examples": int(total),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


def flat(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scalar summary metrics with a prefix (``val_f1_macro`` ...), for reports."""
    return {f"{prefix}{k}": float(metrics[k]) for k in (*SUMMARY_METRICS, *CALIBRATION_METRICS) if k in metrics}


# ------------------------------------------------------------------ calibration

CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits`` (rows) divided by ``temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def rescaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities a model would give with its logits divided by ``temperature``, from
    those it gave (their logs are its logits up to a constant per row)."""
    return softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)), temperature)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """How far the stated confidence (the top class's probability) is from the accuracy, on
    average over equal-width confidence bins weighted by their share of examples: 0 is
    perfectly calibrated, 0.1 means 90% confidence is right about 80% (or 100%) of the time."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if not len(confidence):
        return 0.0
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(gap)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probs = softmax(logits, temperature)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the one T > 0 that minimises the negative
    log-likelihood of ``softmax(logits / T)`` on held-out examples. It changes no prediction,
    only how sure each one is. Golden-section search over log T in [-3, 3] (T from 0.05 to
    20; the likelihood is unimodal in T); 1.0 without examples."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return 1.0
    lo, hi = -3.0, 3.0
    ratio = (5**0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logits, labels, np.exp(a)), _nll(logits, labels, np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def calibration(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The temperature fitted on these examples and their expected calibration error before
    and after it: ``temperature``, ``ece``, ``ece_calibrated``."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    t = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, t)
    right = before.argmax(-1) == labels
    return {
        "temperature": t,
        "ece": expected_calibration_error(before.max(-1), right),
        "ece_calibrated": expected_calibration_error(after.max(-1), right),
    }


def served_calibration(probs: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """``calibration``'s keys for a scored split whose probabilities came through the model's
    ``temperature`` (as served): the error of those, and of the model's own before it."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    right = probs.argmax(-1) == labels
    own = rescaled(probs, 1.0 / temperature)
    return {
        "temperature": float(temperature),
        "ece": expected_calibration_error(own.max(-1), right),
        "ece_calibrated": expected_calibration_error(probs.max(-1), right),
    }


# ------------------------------------------------------------------ drift

LENGTH_QUANTILES = ("p50", "p90", "p95", "p99")  # the data report's token-length quantiles
LENGTH_SHARES = (0.5, 0.4, 0.05, 0.04, 0.01)  # the training split's share below, between and above them
PSI_ALERT = 0.2  # a population stability index above this: the inputs have moved (0.1 to 0.2: a little)


def drift_reference(dataset: str | None, counts: dict[str, int], tokens: dict[str, Any]) -> dict[str, Any]:
    """What served traffic is compared with, from a prepared dataset's report: the training
    split's label shares (``counts``: its rows per label) and the token lengths' quantiles
    (``tokens``: the report's token statistics; the edges of the length bins)."""
    total = max(1, sum(counts.values()))
    edges = [tokens[q] for q in LENGTH_QUANTILES if q in tokens]
    return {
        "dataset": dataset,
        "labels": {lab: n / total for lab, n in counts.items()},
        "length_edges": edges if len(edges) == len(LENGTH_QUANTILES) else None,
    }


def length_bin(n_tokens: int, edges: list[float]) -> int:
    """Which of the reference's length bins a text of ``n_tokens`` falls in."""
    return int(np.searchsorted(np.asarray(edges), n_tokens, side="left"))


def population_stability_index(expected: list[float], counts: list[int]) -> float | None:
    """PSI of observed ``counts`` against ``expected`` shares (same bins): sum over bins of
    (actual - expected) x ln(actual / expected), shares floored at 1e-4; None without counts."""
    total = sum(counts)
    if not total:
        return None
    e = np.clip(np.asarray(expected, dtype=np.float64), 1e-4, None)
    a = np.clip(np.asarray(counts, dtype=np.float64) / total, 1e-4, None)
    return float(((a - e) * np.log(a / e)).sum())
