"""Quality benchmark: raybm's fine-tuned transformer against TF-IDF + logistic regression,
on the same prepared split, in one run.

    .venv/bin/python bench/quality.py [--config jobs/configs/twitter-full.yaml] [key=value ...]
    .venv/bin/python bench/quality.py --runs q5 q6 soup [--config ...] storage.root=...   # no training

The first form trains a model with the config; the second scores finished runs (their
saved test predictions) against the baseline on their own dataset. Besides both models'
scores it prints the test split's standard error and a paired comparison on the same
test examples: the accuracy difference with a 95% bootstrap interval, and McNemar's test
on the examples where exactly one of the two is right.

Target (binary twitter corpus, 8:1:1, seed 0): test accuracy >= 0.92 and macro-F1 >= 0.90.
The full run takes tens of minutes on 2 CPU cores; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_ACCURACY, TARGET_F1 = 0.92, 0.90


def tfidf_baseline(results, dataset: str) -> tuple[dict, dict[str, int]]:
    """TF-IDF (1-2 grams) + logistic regression, scored with raybm's own metrics; also its
    prediction for each test text."""
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from raybm.metrics import confusion_matrix, metrics_from_confusion

    train = pd.read_parquet(results.dataset_split_dir(dataset, "train"), filesystem=results.fs)
    test = pd.read_parquet(results.dataset_split_dir(dataset, "test"), filesystem=results.fs)
    labels = results.dataset_label_map(dataset)["labels"]
    started = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(vec.fit_transform(train["text"]), train["label"])
    pred = clf.predict(vec.transform(test["text"]))
    m = metrics_from_confusion(confusion_matrix(test["label"], pred, len(labels)), labels)
    m["seconds"] = round(time.time() - started, 1)
    return m, dict(zip(test["text"].tolist(), (int(p) for p in pred)))


def paired(y: np.ndarray, ours: np.ndarray, base: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy difference (ours - base) on the same examples: a 95% paired bootstrap
    interval and McNemar's test (chi-square with continuity correction)."""
    from scipy.stats import chi2

    a, b = (ours == y).astype(np.float64), (base == y).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(resamples, len(y)))
    diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    only_ours, only_base = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    stat = (abs(only_ours - only_base) - 1) ** 2 / max(1, only_ours + only_base)
    return {
        "diff": float(a.mean() - b.mean()),
        "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
        "only_ours_right": only_ours,
        "only_baseline_right": only_base,
        "mcnemar_p": float(chi2.sf(stat, 1)),
    }


def run_predictions(results, run: str):
    import pandas as pd

    from raybm.storage.layout import PREDICTIONS_FILE

    path = results.join(results.run_dir(run), PREDICTIONS_FILE)
    if not results.exists(path):
        raise SystemExit(f"{run}: no {PREDICTIONS_FILE} under {results.run_dir(run)}; is it a finished run?")
    return pd.read_parquet(path, filesystem=results.fs)


def run_metrics(results, run: str) -> dict:
    return results.read_json(results.join(results.run_dir(run), "metrics.json"))


def report(name: str, ours: dict, preds, base: dict, base_pred: dict[str, int]) -> bool:
    n = ours["examples"]
    print(f"\n{name} on {preds.attrs.get('dataset', '')} (test split, {n} examples)")
    print(f"{'model':<44}{'accuracy':>10}{'macro-F1':>10}{'seconds':>10}")
    print(
        f"{'TF-IDF (1-2 grams) + logistic regression':<44}{base['accuracy']:>10.4f}{base['f1_macro']:>10.4f}"
        f"{base['seconds']:>10}"
    )
    print(f"{name:<44}{ours['accuracy']:>10.4f}{ours['f1_macro']:>10.4f}{ours.get('seconds', ''):>10}")
    missing = [t for t in preds["text"] if t not in base_pred]
    if missing:
        raise SystemExit(f"{len(missing)} test texts of the run are not in its dataset's test split")
    y = preds["label"].to_numpy()
    cmp = paired(y, preds["pred"].to_numpy(), np.array([base_pred[t] for t in preds["text"]]))
    se = math.sqrt(ours["accuracy"] * (1 - ours["accuracy"]) / n)
    print(f"standard error of the accuracy on {n} examples: {se:.4f}")
    print(
        f"paired, same examples: accuracy {cmp['diff']:+.4f} (95% bootstrap interval {cmp['ci95'][0]:+.4f} "
        f"to {cmp['ci95'][1]:+.4f}); right where TF-IDF is wrong {cmp['only_ours_right']}, the reverse "
        f"{cmp['only_baseline_right']}, McNemar p = {cmp['mcnemar_p']:.2g}"
    )
    print(f"macro-F1 difference: {ours['f1_macro'] - base['f1_macro']:+.4f}")
    ok = ours["accuracy"] >= TARGET_ACCURACY and ours["f1_macro"] >= TARGET_F1
    print(f"target accuracy >= {TARGET_ACCURACY}, macro-F1 >= {TARGET_F1}: {'met' if ok else 'NOT met'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/twitter-full.yaml")
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="score finished runs instead of training one")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.runs:  # key=value written after the run names are overrides, not runs
        args.overrides += [r for r in args.runs if "=" in r]
        args.runs = [r for r in args.runs if "=" not in r]

    from raybm.config import load_config
    from raybm.storage.results import Results

    cfg = load_config(args.config, args.overrides)
    results = Results.from_config(cfg.storage)
    baselines: dict[str, tuple[dict, dict[str, int]]] = {}

    def baseline(dataset: str):
        if dataset not in baselines:
            baselines[dataset] = tfidf_baseline(results, dataset)
        return baselines[dataset]

    if args.runs:
        for run in args.runs:
            metrics = run_metrics(results, run)
            preds = run_predictions(results, run)
            preds.attrs["dataset"] = metrics["dataset"]
            report(f"raybm {run}", metrics["test"], preds, *baseline(metrics["dataset"]))
        return 0

    from raybm.runtime import ensure_ray, quiet_ray_data
    from raybm.train.driver import run_training

    ensure_ray(cfg.ray)
    quiet_ray_data()
    started = time.time()
    trained = run_training(cfg)
    ours = dict(trained.metrics.test, seconds=round(time.time() - started, 1))
    preds = run_predictions(results, trained.metrics.run)
    preds.attrs["dataset"] = trained.metrics.dataset
    report(f"raybm {cfg.model.name}, {len(trained.history)} epoch(s)", ours, preds, *baseline(trained.metrics.dataset))
    print(f"model folder: {trained.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
