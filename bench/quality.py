"""Quality benchmark: raybm's fine-tuned transformer against TF-IDF + logistic regression,
on the same prepared split, in one run.

    .venv/bin/python bench/quality.py [--config jobs/configs/twitter-full.yaml] [key=value ...]

Target (binary twitter corpus, 8:1:1, seed 0): test accuracy >= 0.92 and macro-F1 >= 0.90.
The full run takes tens of minutes on 2 CPU cores; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_ACCURACY, TARGET_F1 = 0.92, 0.90


def tfidf_baseline(results, dataset: str) -> dict:
    """TF-IDF (1-2 grams) + logistic regression, scored with raybm's own metrics."""
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from raybm.metrics import confusion_matrix, metrics_from_confusion

    train = pd.read_parquet(results.dataset_split_dir(dataset, "train"))
    test = pd.read_parquet(results.dataset_split_dir(dataset, "test"))
    labels = results.dataset_label_map(dataset)["labels"]
    started = time.time()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(vec.fit_transform(train["text"]), train["label"])
    pred = clf.predict(vec.transform(test["text"]))
    m = metrics_from_confusion(confusion_matrix(test["label"], pred, len(labels)), labels)
    m["seconds"] = round(time.time() - started, 1)
    return m


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/twitter-full.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from raybm.config import load_config
    from raybm.results import Results
    from raybm.runtime import ensure_ray, quiet_ray_data
    from raybm.train import run_training

    cfg = load_config(args.config, args.overrides)
    ensure_ray(cfg.ray)
    quiet_ray_data()
    started = time.time()
    trained = run_training(cfg)
    ours = trained.metrics["test"]
    ours["seconds"] = round(time.time() - started, 1)
    base = tfidf_baseline(Results.from_config(cfg.storage), trained.metrics["dataset"])

    print(f"\nQuality on {trained.metrics['dataset']} (test split, {ours['examples']} examples)")
    print(f"{'model':<44}{'accuracy':>10}{'macro-F1':>10}{'seconds':>10}")
    print(f"{'TF-IDF (1-2 grams) + logistic regression':<44}{base['accuracy']:>10.4f}{base['f1_macro']:>10.4f}"
          f"{base['seconds']:>10}")
    name = f"raybm {cfg.model.name}, {len(trained.history)} epoch(s)"
    print(f"{name:<44}{ours['accuracy']:>10.4f}{ours['f1_macro']:>10.4f}{ours['seconds']:>10}")
    print(f"difference (raybm - TF-IDF): accuracy {ours['accuracy'] - base['accuracy']:+.4f}, "
          f"macro-F1 {ours['f1_macro'] - base['f1_macro']:+.4f}")
    ok = ours["accuracy"] >= TARGET_ACCURACY and ours["f1_macro"] >= TARGET_F1
    print(f"target accuracy >= {TARGET_ACCURACY}, macro-F1 >= {TARGET_F1}: {'met' if ok else 'NOT met'}")
    print(f"model folder: {trained.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
