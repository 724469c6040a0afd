"""Weight averaging ("model soup") of fine-tuned runs against each run alone, in one run.

    .venv/bin/python bench/average_models.py --data results/data/<dataset> \\
        results/runs/<run-a>/model results/runs/<run-b>/model [--threads 2]

The runs must share an architecture and a pretrained start (the same base model, different
seeds, epochs or settings). Prints validation and test accuracy / macro-F1 of each run, of
the mean of their predicted probabilities (an ensemble: N times the inference cost) and of
the model whose weights are the mean of theirs (one model's cost; ``raybm.tune.soup``). Nothing
is written outside a temporary folder. ``raybm soup`` makes such a model as a run, picked
on validation.

``--tfidf`` adds, for the ensemble and each run, its probabilities blended with those of
TF-IDF (1-2 grams) + logistic regression trained on the dataset's train split:
``(1 - w) * model + w * tfidf``, with ``w`` in 0, 0.1 ... 0.5 picked on validation accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="two or more model folders")
    parser.add_argument("--data", required=True, help="a prepared dataset folder (<root>/data/<dataset>)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tfidf", action="store_true", help="also blend each row with TF-IDF + logistic regression")
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two model folders")

    import numpy as np
    import pandas as pd
    from sklearn.metrics import accuracy_score, f1_score

    from raybm.inference.loading import load_predictor
    from raybm.tune.soup import average_models

    splits = {s: pd.read_parquet(os.path.join(args.data, s)) for s in ("validation", "test")}

    def probs(folder: str) -> dict[str, np.ndarray]:
        p = load_predictor(folder, "torch", threads=args.threads)
        return {
            s: np.concatenate([p.predict(df["text"].tolist()[i : i + 128]) for i in range(0, len(df), 128)])
            for s, df in splits.items()
        }

    rows = [(os.path.basename(os.path.dirname(m.rstrip("/"))) or m, probs(m)) for m in args.models]
    ensemble = {s: np.mean([r[1][s] for r in rows], axis=0) for s in splits}
    with tempfile.TemporaryDirectory() as tmp:
        soup = os.path.join(tmp, "soup")
        average_models(args.models, soup)
        averaged = probs(soup)
    rows += [("mean of probabilities (ensemble)", ensemble), ("mean of weights (one model)", averaged)]
    if args.tfidf:
        rows += tfidf_blends(rows, splits, pd.read_parquet(os.path.join(args.data, "train")))
    print(f"\n{'model':<40}{'val acc':>9}{'val F1':>9}{'test acc':>10}{'test F1':>9}")
    for name, p in rows:
        cells = []
        for s in ("validation", "test"):
            y, pred = splits[s]["label"].to_numpy(), p[s].argmax(1)
            cells += [accuracy_score(y, pred), f1_score(y, pred, average="macro")]
        print(f"{name:<40}{cells[0]:>9.4f}{cells[1]:>9.4f}{cells[2]:>10.4f}{cells[3]:>9.4f}")
    return 0


def tfidf_blends(rows: list, splits: dict, train) -> list:
    """Each row's probabilities blended with TF-IDF + logistic regression's, the weight
    (0 to 0.5) picked on validation accuracy; plus TF-IDF alone."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform(train["text"]), train["label"])
    tfidf = {s: clf.predict_proba(vec.transform(df["text"])) for s, df in splits.items()}
    y_val = splits["validation"]["label"].to_numpy()
    out = [("TF-IDF + logistic regression", tfidf)]
    for name, p in rows:

        def blend(w: float, p=p) -> dict:
            return {s: (1 - w) * p[s] + w * tfidf[s] for s in splits}

        best = max(np.arange(0, 0.51, 0.1), key=lambda w: ((blend(w)["validation"].argmax(1) == y_val).mean(), -w))
        out.append((f"{name[:24].rstrip()} + TF-IDF, w={best:.1f}", blend(best)))
    return out


if __name__ == "__main__":
    sys.exit(main())
