"""Weight averaging ("model soup") of fine-tuned runs against each run alone, in one run.

    .venv/bin/python bench/average_models.py --data results/data/<dataset> \\
        results/runs/<run-a>/model results/runs/<run-b>/model [--threads 2]

The runs must share an architecture and a pretrained start (the same base model, different
seeds, epochs or settings). Prints validation and test accuracy / macro-F1 of each run, of
the mean of their predicted probabilities (an ensemble: N times the inference cost) and of
the model whose weights are the mean of theirs (one model's cost; ``raybm.soup``). Nothing
is written outside a temporary folder. ``raybm soup`` makes such a model as a run, picked
on validation.
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
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two model folders")

    import numpy as np
    import pandas as pd
    from sklearn.metrics import accuracy_score, f1_score

    from raybm.inference import load_predictor
    from raybm.soup import average_models

    splits = {s: pd.read_parquet(os.path.join(args.data, s)) for s in ("validation", "test")}

    def probs(folder: str) -> dict[str, np.ndarray]:
        p = load_predictor(folder, "torch", threads=args.threads)
        return {s: np.concatenate([p.predict(df["text"].tolist()[i:i + 128]) for i in range(0, len(df), 128)])
                for s, df in splits.items()}

    rows = [(os.path.basename(os.path.dirname(m.rstrip("/"))) or m, probs(m)) for m in args.models]
    ensemble = {s: np.mean([r[1][s] for r in rows], axis=0) for s in splits}
    with tempfile.TemporaryDirectory() as tmp:
        soup = os.path.join(tmp, "soup")
        average_models(args.models, soup)
        averaged = probs(soup)
    rows += [("mean of probabilities (ensemble)", ensemble), ("mean of weights (one model)", averaged)]
    print(f"\n{'model':<36}{'val acc':>9}{'val F1':>9}{'test acc':>10}{'test F1':>9}")
    for name, p in rows:
        cells = []
        for s in ("validation", "test"):
            y, pred = splits[s]["label"].to_numpy(), p[s].argmax(1)
            cells += [accuracy_score(y, pred), f1_score(y, pred, average="macro")]
        print(f"{name:<36}{cells[0]:>9.4f}{cells[1]:>9.4f}{cells[2]:>10.4f}{cells[3]:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
