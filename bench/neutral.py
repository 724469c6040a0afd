"""Neutral texts: what a model answers for plain statements of fact.

    .venv/bin/python bench/neutral.py --model <model folder> --three-class <dataset> storage.root=<root>

``--three-class``: a prepared dataset of the twitter corpus with all three classes
(``jobs/configs/twitter-3class.yaml``), whose neutral tweets a two-class model never saw.

Prints the model's answer in words for ten plain neutral sentences (dates, logistics,
facts). For a model without a neutral class it also fits the abstain threshold
(``serve.min_confidence``: below it the answer is "uncertain") on the validation split's
tweets, as the threshold that best tells neutral tweets from positive and negative ones by
confidence (the largest share of neutral tweets made "uncertain" minus the share of
positive and negative ones), and reports it on the test split: the share of each called
"uncertain", and the accuracy on the positive and negative tweets that keep an answer.
For a three-class model it reports the test split's neutral recall and how sure it is.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NEUTRAL_SENTENCES = [
    "the meeting got moved to 3pm",
    "The train to Boston leaves at 7:45 from platform 4.",
    "Our office is on the third floor of the building.",
    "The package is scheduled for delivery on Tuesday.",
    "Water boils at 100 degrees Celsius at sea level.",
    "I'm taking the bus home after work today.",
    "The report has twelve pages and two appendices.",
    "The store opens at 9am on Saturdays.",
    "She sent the invoice by email this morning.",
    "The flight number is UA 237 and boarding starts at gate B12.",
]


def split_probs(clf, results, dataset: str, split: str) -> tuple[np.ndarray, list[str]]:
    """The model's probabilities for every text of a split, and the split's labels as words."""
    import pandas as pd

    frame = pd.read_parquet(results.dataset_split_dir(dataset, split), filesystem=results.fs)
    names = results.dataset_label_map(dataset)["labels"]
    return clf.predict(frame["text"].tolist()), [names[i] for i in frame["label"]]


def fit_threshold(neutral_conf: np.ndarray, polar_conf: np.ndarray) -> float:
    """The confidence below which answers are "uncertain" that best separates neutral
    texts (made uncertain) from positive and negative ones (kept): Youden's J."""
    candidates = np.unique(np.round(np.concatenate([neutral_conf, polar_conf]), 3))
    gains = [(neutral_conf < t).mean() - (polar_conf < t).mean() for t in candidates]
    return float(candidates[int(np.argmax(gains))])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    from raybm.config import build_config
    from raybm.inference.evaluate import Classify
    from raybm.inference.predict import in_words
    from raybm.storage.results import Results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--three-class", required=True, help="prepared 3-class twitter dataset (neutral tweets)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = build_config(overrides=args.overrides)
    results = Results.from_config(cfg.storage)
    clf = Classify(args.model, max_length=64, threads=max(1, os.cpu_count() or 1))
    labels = clf.labels
    threshold = 0.0
    if "neutral" not in labels:
        found = {}
        for split in ("validation", "test"):
            probs, truth = split_probs(clf, results, args.three_class, split)
            conf, pred = probs.max(1), np.array([labels[i] for i in probs.argmax(1)])
            neutral = np.array([t == "neutral" for t in truth])
            found[split] = (conf, pred, np.array(truth), neutral)
        conf, _, _, neutral = found["validation"]
        threshold = fit_threshold(conf[neutral], conf[~neutral])
        print(
            f"abstain threshold fitted on validation ({neutral.sum()} neutral, {(~neutral).sum()} "
            f"positive/negative tweets): serve.min_confidence={threshold:.3f}"
        )
        conf, pred, truth, neutral = found["test"]
        kept = ~neutral & (conf >= threshold)
        print(
            f"test: neutral tweets called uncertain {np.mean(conf[neutral] < threshold):.1%} "
            f"({neutral.sum()}); positive/negative called uncertain {np.mean(conf[~neutral] < threshold):.1%} "
            f"({(~neutral).sum()}); accuracy on those answered {np.mean(pred[kept] == truth[kept]):.4f} "
            f"(all: {np.mean(pred[~neutral] == truth[~neutral]):.4f})"
        )
        print(
            f"test: neutral tweets answered 'very likely' (>= 95%): {np.mean(conf[neutral] >= 0.95):.1%} "
            f"without the threshold"
        )
    else:
        probs, truth = split_probs(clf, results, args.three_class, "test")
        truth_a = np.array(truth)
        pred = np.array([labels[i] for i in probs.argmax(1)])
        neutral = truth_a == "neutral"
        print(
            f"test: neutral recall {np.mean(pred[neutral] == 'neutral'):.4f}, precision "
            f"{np.mean(truth_a[pred == 'neutral'] == 'neutral'):.4f}; neutral tweets called positive or "
            f"negative 'very likely' (>= 95%): "
            f"{np.mean((pred[neutral] != 'neutral') & (probs.max(1)[neutral] >= 0.95)):.1%}"
        )
    print("\nten plain neutral sentences:")
    probs = clf.predict(NEUTRAL_SENTENCES)
    very = 0
    for text, p in zip(NEUTRAL_SENTENCES, probs):
        label, conf = labels[int(p.argmax())], float(p.max())
        words = in_words(label, conf, threshold)
        very += words.startswith("very likely") and label != "neutral"
        print(f"  {words:<36} {text}")
    print(f"'very likely' positive or negative: {very} of {len(NEUTRAL_SENTENCES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
