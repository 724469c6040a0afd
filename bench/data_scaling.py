"""The data stage as rows grow: `raybm data` against a plain pandas script, side by side.

    .venv/bin/python bench/data_scaling.py [--rows 100000,400000,1600000] [--model all-minilm-l6-v2]

For each size, a synthetic twitter-style CSV of unique rows (real tweets, each with a number
of its own, labelled positive or negative) is prepared twice, one after the other, each in
a process of its own:
1. ``raybm data`` (embedded Ray: read and clean, exact de-duplication, a seeded stratified
   80/10/10 split, token counts with the model's fast tokenizer, Parquet splits);
2. the plain script: pandas reads the CSV, strips the texts, drops exact duplicates, splits
   80/10/10 per label with a seeded permutation, counts tokens with the same tokenizer (one
   call over every text) and writes each split with ``to_parquet``.
Every half second the proportional set size (PSS: shared pages such as Ray's object store
counted once) of the process and all its descendants is summed; the peak is printed.
raybm's lines carry the seconds since its start, so its stages' times can be read off.
Targets (issue 32): at 1.6M rows, raybm at most 1.5x the plain script's time and at most
half its peak memory.
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

PLAIN = r"""
import sys, time
import numpy as np, pandas as pd
from transformers import AutoTokenizer
src, out, model, max_length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
df = pd.read_csv(src, dtype=str, keep_default_na=False)
df["text"] = df["text"].str.strip()
df = df[df["text"] != ""].drop_duplicates("text")
rng = np.random.default_rng(0)
split = np.empty(len(df), dtype=object)
for label, idx in df.groupby("label").indices.items():
    idx = rng.permutation(idx)
    a, b = int(len(idx) * 0.8), int(len(idx) * 0.9)
    split[idx[:a]], split[idx[a:b]], split[idx[b:]] = "train", "validation", "test"
df["split"] = split
tok = AutoTokenizer.from_pretrained(model)
df["n_tokens"] = [len(x) for x in tok(df["text"].tolist(), truncation=False)["input_ids"]]
for name, part in df.groupby("split"):
    part.drop(columns="split").to_parquet(f"{out}/{name}.parquet", index=False)
print(f"plain: {len(df)} rows written", flush=True)
"""


def tree_pss_kb(root: int) -> int:
    """PSS (kB) of ``root`` and every descendant."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def run_measured(command: list[str], label: str) -> tuple[int, float, float]:
    """(exit code, seconds, peak GB of the process tree's PSS); its output printed with the
    seconds since start."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def watch() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_kb(proc.pid))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in proc.stdout:
        if line.strip() and not line.startswith(("(", "[")) and "WARNING" not in line:
            print(f"  [{label} {time.perf_counter() - started:6.1f} s] {line.rstrip()}", flush=True)
    code = proc.wait()
    watcher.join()
    return code, time.perf_counter() - started, peak[0] / 1e6


def synthetic_csv(path: str, rows: int) -> None:
    """``rows`` unique twitter-style rows: a real tweet with a number of its own, and a label."""
    import numpy as np
    import pandas as pd
    from serve_load import sample_texts

    pool = [" ".join(t.split()) for t in sample_texts(5000)]  # one line each: pandas leaves a bare \r unquoted
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(pool), rows)
    texts = [f"{pool[p]} {i}" for i, p in enumerate(picks)]
    labels = np.where(rng.random(rows) < 0.5, "positive", "negative")
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,400000,1600000")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from raybm.models.build import resolve_model_source

    tokenizer_dir = resolve_model_source(args.model)
    work = tempfile.mkdtemp(prefix="raybm-data-bench-")
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        src = os.path.join(work, f"tweets-{rows}.csv")
        synthetic_csv(src, rows)
        print(f"{rows:,} rows ({os.path.getsize(src) / 1e6:.0f} MB of CSV)", flush=True)
        code, ours, ours_gb = run_measured(
            [
                sys.executable,
                "-m",
                "raybm.cli",
                "data",
                f"data.source={src}",
                "data.text_column=text",
                "data.label_column=label",
                f"model.name={args.model}",
                f"data.max_length={args.max_length}",
                f"storage.root={os.path.join(work, f'results-{rows}')}",
            ],
            "raybm",
        )
        if code != 0:
            print(f"raybm data failed ({code})")
            return 1
        out = os.path.join(work, f"plain-{rows}")
        os.makedirs(out)
        code, plain, plain_gb = run_measured(
            [sys.executable, "-c", PLAIN, src, out, tokenizer_dir, str(args.max_length)], "plain"
        )
        if code != 0:
            print(f"the plain script failed ({code})")
            return 1
        results.append((rows, ours, ours_gb, plain, plain_gb))
        print(
            f"  raybm {ours:.0f} s, {ours_gb:.2f} GB; plain {plain:.0f} s, {plain_gb:.2f} GB; "
            f"time {ours / plain:.2f}x, memory {ours_gb / plain_gb:.2f}x",
            flush=True,
        )
    print(
        "\nrows | raybm s | plain s | time ratio (target <= 1.5 at 1.6M) | raybm GB | plain GB | memory ratio "
        "(target <= 0.5)"
    )
    for rows, ours, ours_gb, plain, plain_gb in results:
        print(
            f"{rows:,} | {ours:.0f} | {plain:.0f} | {ours / plain:.2f} | {ours_gb:.2f} | {plain_gb:.2f} | "
            f"{ours_gb / plain_gb:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
