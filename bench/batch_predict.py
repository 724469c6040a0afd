"""Batch scoring: raybm's Ray Data job against a plain transformers loop, in one run.

    .venv/bin/python bench/batch_predict.py [--rows 20000] [--files 4] [--model FOLDER | --base NAME]
                                            [--no-plain] [predict.key=value ...]

Real tweets (sampled with replacement, an ``id`` column added) are written as ``--files``
Parquet files. Then, on the same machine one after the other:
1. the plain loop: the model in this process, every core as torch threads, batches of 64
   sorted by length (the fastest simple script); skipped with ``--no-plain``;
2. ``raybm predict --input <folder> --output <new folder>`` as its own process: Ray Data
   reads, a pool of model actors labels, the driver writes Parquet (the settings:
   ``predict.*`` overrides).
Prints rows/s of each, their ratio (target: at least 0.9), whether every row came out in
order with the plain loop's labels (a share: padding differs), and the peak resident memory
of raybm's driver process (``VmHWM``; target: flat as rows grow). ``--base tiny-bert`` scores
with a tiny random BERT: fast enough to measure the driver's memory at millions of rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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
        idx = order[i : i + 64]
        probs = p.predict([texts[j] for j in idx])
        for j, row in zip(idx, probs):
            labels[j] = p.labels[int(row.argmax())]
    return len(texts) / (time.perf_counter() - started), labels


def run_with_peak_memory(command: list[str]) -> tuple[int, float, float]:
    """(exit code, seconds, peak resident GB) of ``command``, its VmHWM read every 0.2 s."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT)
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak[0] = max(peak[0], next(int(x.split()[1]) for x in f if x.startswith("VmHWM")))
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = proc.wait()
    seconds = time.perf_counter() - started
    watcher.join()
    return code, seconds, peak[0] / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--model", help="a raybm model folder (default: --base with a new head)")
    parser.add_argument("--base", default="all-minilm-l6-v2", help="base model of the default model (or tiny-bert)")
    parser.add_argument("--no-plain", action="store_true", help="raybm's job alone (memory at many rows)")
    parser.add_argument("overrides", nargs="*", help="predict.* settings of the raybm job")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pandas as pd
    import pyarrow.parquet as pq
    from serve_load import default_model, sample_texts

    work = tempfile.mkdtemp(prefix="raybm-batch-bench-")
    model_dir = args.model or default_model(os.path.join(work, "model"), args.base)
    pool = sample_texts(2000)
    texts = [pool[i % len(pool)] for i in range(args.rows)]
    folder = os.path.join(work, "in")
    os.makedirs(folder)
    per = -(-args.rows // args.files)
    for k in range(args.files):
        part = range(k * per, min(args.rows, (k + 1) * per))
        pd.DataFrame({"id": part, "text": [texts[i] for i in part]}).to_parquet(
            os.path.join(folder, f"part-{k:03d}.parquet"), index=False
        )

    plain_rate, plain_labels = (None, None) if args.no_plain else plain_loop(model_dir, texts)
    if plain_rate:
        print(f"plain loop: {plain_rate:,.1f} rows/s", flush=True)

    out = os.path.join(work, "scored")
    code, seconds, peak_gb = run_with_peak_memory(
        [
            sys.executable,
            "-m",
            "raybm.cli",
            "predict",
            "--model",
            model_dir,
            "--input",
            folder,
            "--output",
            out,
            *args.overrides,
        ]
    )
    files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet")) if code == 0 else []
    ids = pq.read_table(files, columns=["id"]).column("id").to_numpy() if files else []
    in_order = code == 0 and len(ids) == args.rows and bool((ids == range(args.rows)).all())
    rate = args.rows / seconds
    print(
        f"raybm predict ({args.rows:,} rows, Ray's start included): {rate:,.1f} rows/s, {seconds:.0f} s; "
        f"driver peak RSS {peak_gb:.2f} GB"
    )
    agree = 1.0
    if plain_rate:
        got = pq.read_table(files, columns=["predicted_label"]).column(0).to_pylist() if in_order else []
        agree = sum(a == b for a, b in zip(got, plain_labels)) / args.rows
        print(f"ratio raybm / plain loop: {rate / plain_rate:.2f} (target >= 0.9)")
    print(f"every row, in order: {in_order}; labels as the plain loop's: {f'{agree:.2%}' if plain_rate else '-'}")
    return 0 if in_order and agree > 0.995 else 1


if __name__ == "__main__":
    sys.exit(main())
