"""Batch scoring: raybm's Ray Data job against a plain transformers loop, in one run.

    .venv/bin/python bench/batch_predict.py [--rows 20000] [--files 4] [--model FOLDER]
                                            [predict.key=value ...]

Real tweets (sampled with replacement, an ``id`` column added) are written as ``--files``
Parquet files. Then, on the same machine one after the other:
1. the plain loop: the model in this process, every core as torch threads, batches of 64
   sorted by length (the fastest simple script);
2. ``raybm predict --input <folder> --output <new folder>``: Ray Data reads, a pool of
   model actors labels, Ray Data writes Parquet (the settings: ``predict.*`` overrides).
Prints rows/s of each, their ratio (target: at least 0.9), whether every row came out in
order with the plain loop's labels (a share: padding differs), and the driver's peak
resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def plain_loop(model_dir: str, texts: list[str]) -> tuple[float, list[str]]:
    """(rows/s, labels) of the model over ``texts`` in this process: batches of 64 sorted by length."""
    import numpy as np
    import torch

    from raybm.inference.loading import load_predictor

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    p = load_predictor(model_dir, "torch", threads=threads, batch_size=64)
    order = np.argsort([len(t) for t in texts])
    labels = [""] * len(texts)
    started = time.perf_counter()
    for i in range(0, len(texts), 64):
        idx = order[i:i + 64]
        probs = p.predict([texts[j] for j in idx])
        for j, row in zip(idx, probs):
            labels[j] = p.labels[int(row.argmax())]
    return len(texts) / (time.perf_counter() - started), labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--model", help="a raybm model folder (default: MiniLM with a new head)")
    parser.add_argument("overrides", nargs="*", help="predict.* settings of the raybm job")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pandas as pd
    import pyarrow.parquet as pq

    from serve_load import default_model, sample_texts

    work = tempfile.mkdtemp(prefix="raybm-batch-bench-")
    model_dir = args.model or default_model(os.path.join(work, "model"))
    pool = sample_texts(2000)
    texts = [pool[i % len(pool)] for i in range(args.rows)]
    frame = pd.DataFrame({"id": range(args.rows), "text": texts})
    folder = os.path.join(work, "in")
    os.makedirs(folder)
    per = -(-args.rows // args.files)
    for k in range(args.files):
        frame.iloc[k * per:(k + 1) * per].to_parquet(os.path.join(folder, f"part-{k:03d}.parquet"), index=False)

    plain_rate, plain_labels = plain_loop(model_dir, texts)
    print(f"plain loop: {plain_rate:,.1f} rows/s", flush=True)

    from raybm.cli import main as raybm

    out = os.path.join(work, "scored")
    started = time.perf_counter()
    code = raybm(["predict", "--model", model_dir, "--input", folder, "--output", out, *args.overrides])
    seconds = time.perf_counter() - started
    got = pq.read_table(sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet"))).to_pandas()
    in_order = code == 0 and got["id"].tolist() == list(range(args.rows))
    agree = (got["predicted_label"] == pd.Series(plain_labels)).mean() if in_order else 0.0
    rate = args.rows / seconds
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"raybm predict (Ray Data job, Ray's start included): {rate:,.1f} rows/s, {seconds:.0f} s")
    print(f"ratio raybm / plain loop: {rate / plain_rate:.2f} (target >= 0.9)")
    print(f"every row, in order: {in_order}; labels as the plain loop's: {agree:.2%}; driver peak RSS {peak_gb:.2f} GB")
    return 0 if in_order and agree > 0.995 else 1


if __name__ == "__main__":
    sys.exit(main())
