"""Memory of a training worker, DDP against FSDP, on a model big enough to matter.

    .venv/bin/python bench/fsdp_memory.py [--hidden 1536] [--layers 12] [--workers 2]

Builds a randomly initialised Llama-style classifier (hidden --hidden, --layers layers,
MiniLM's tokenizer; 1536 x 12 is 387M parameters) as an ordinary model folder, then runs
`raybm train` on it twice, one after the other, with the same settings but
train.parallelism=ddp and =fsdp (--workers workers, batch 4, length 32, 3 steps, one epoch,
a checkpoint at its end). Each second it samples the resident memory of every Ray Train
worker process; it prints each run's peak (the largest worker), its time, and FSDP's peak as
a share of DDP's. Training state in fp32 with AdamW is 16 bytes a parameter; sharded over N
workers each keeps 1/N of it, plus activations, the gathered layer and what loading and
checkpointing hold for a moment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_model(folder: str, hidden: int, layers: int) -> int:
    """A random Llama-style classifier with MiniLM's tokenizer, saved as a model folder; its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from raybm.models.build import load_tokenizer

    tok = load_tokenizer("all-minilm-l6-v2")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, num_labels=2)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def sample_workers(peaks: dict[int, int], stop: threading.Event) -> None:
    """Largest resident memory seen of each Ray Train worker process, once a second."""
    import psutil

    while not stop.wait(1.0):
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue


def run(parallelism: str, model: str, data: str, root: str, workers: int) -> dict:
    peaks: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_workers, args=(peaks, stop), daemon=True)
    sampler.start()
    started = time.time()
    cmd = [sys.executable, "-m", "raybm.cli", "train", f"storage.root={root}", f"data.source={data}",
           "data.text_column=text", "data.label_column=label", f"model.name={model}", "data.max_length=32",
           f"train.num_workers={workers}",
           "train.batch_size=4", "train.max_steps_per_epoch=3", "train.epochs=1", f"train.parallelism={parallelism}",
           f"name=mem-{parallelism}", "train.keep_checkpoints=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    stop.set()
    sampler.join()
    return {"parallelism": parallelism, "ok": out.returncode == 0, "seconds": round(time.time() - started, 1),
            "peak_worker_gb": round(max(peaks.values(), default=0) / 1e9, 2),
            "peaks_gb": sorted((round(v / 1e9, 2) for v in peaks.values()), reverse=True),
            "workers_seen": len(peaks), "error": None if out.returncode == 0 else out.stderr[-1500:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="raybm-fsdp-mem-")
    model = os.path.join(work, "model")
    t0 = time.time()
    n = build_model(model, args.hidden, args.layers)
    print(f"model: {n / 1e6:.0f}M parameters, built in {time.time() - t0:.0f} s", flush=True)
    data = os.path.join(work, "data.csv")
    import pandas as pd

    words = ["good", "bad", "great", "awful", "fine", "poor", "lovely", "broken"]
    pd.DataFrame({"text": [f"{words[i % 8]} thing number {i}" for i in range(400)],
                  "label": ["pos" if i % 2 == 0 else "neg" for i in range(400)]}).to_csv(data, index=False)
    rows = [run(p, model, data, os.path.join(work, "results"), args.workers) for p in ("ddp", "fsdp")]
    for r in rows:
        print(json.dumps(r), flush=True)
    ddp, fsdp = rows
    if ddp["ok"] and fsdp["ok"]:
        print(f"\n{n / 1e6:.0f}M parameters, {args.workers} workers: peak worker RSS DDP {ddp['peak_worker_gb']} GB, "
              f"FSDP {fsdp['peak_worker_gb']} GB: {fsdp['peak_worker_gb'] / ddp['peak_worker_gb']:.2f}x (every "
              f"worker's peak: DDP {ddp['peaks_gb']}, FSDP {fsdp['peaks_gb']}); "
              f"fp32 AdamW state {16 * n / 1e9:.1f} GB in all, {16 * n / 1e9 / args.workers:.1f} GB a worker sharded")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
