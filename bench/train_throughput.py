"""Training throughput: raybm's Ray Train path against a plain PyTorch loop, in one run.

    .venv/bin/python bench/train_throughput.py [--threads 2] [--steps 60] [--model all-minilm-l6-v2]

Same model, data (the twitter corpus's training split), batch size (32), sequence length
(64, padded to full length in both), optimizer (AdamW), clipping and torch threads.
Steady state excludes the first 3 steps on both sides; Ray's start-up cost (Ray Train
workers, Ray Data pipeline, checkpoints) is reported separately. Target: ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH, LENGTH, WARM = 32, 64, 3


def plain_loop(cfg, texts: list[str], labels_ids: list[int], labels: list[str], steps: int, threads: int) -> float:
    """Samples/s of a hand-written loop after WARM steps."""
    import torch

    from raybm.models.build import build_classifier, load_tokenizer
    from raybm.train.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_classifier(cfg.model, labels)
    tok = load_tokenizer(cfg.model.name)
    opt = build_optimizer(model, cfg.train)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    t0, n = None, 0
    for i in range(steps):
        lo = (i * BATCH) % (len(texts) - BATCH)
        enc = tok(texts[lo : lo + BATCH], truncation=True, max_length=LENGTH, padding="max_length", return_tensors="pt")
        y = torch.tensor(labels_ids[lo : lo + BATCH])
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = loss_fn(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == WARM - 1:
            t0 = time.time()
        elif i >= WARM:
            n += BATCH
    return n / (time.time() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--root", default="bench-results")
    args = parser.parse_args()

    import pandas as pd

    from raybm.config import build_config
    from raybm.runtime import ensure_ray, quiet_ray_data
    from raybm.storage.results import Results
    from raybm.train.driver import run_training

    rows = int(args.steps * BATCH / 0.8) + 64  # a train split of about `steps` batches
    cfg = build_config(
        overrides=[
            f"storage.root={args.root}",
            "data.source=twitter-sentiment",
            f"data.max_rows={rows}",
            f"data.max_length={LENGTH}",
            "data.padding=max_length",
            f"model.name={args.model}",
            "train.epochs=2",
            f"train.batch_size={BATCH}",
            f"train.max_steps_per_epoch={args.steps}",
            f"train.torch_threads={args.threads}",
            "train.log_every_steps=1000",
            "train.keep_checkpoints=1",
        ]
    )
    ensure_ray(cfg.ray)
    quiet_ray_data()

    started = time.time()
    result = run_training(cfg, log=lambda _: None)
    ray_wall = time.time() - started
    epoch2 = result.history[-1]
    ray_rate = epoch2["steady_samples_per_s"]

    results = Results.from_config(cfg.storage)
    train = pd.read_parquet(results.dataset_split_dir(result.metrics.dataset, "train"))
    labels = results.dataset_label_map(result.metrics.dataset)["labels"]
    plain_rate = plain_loop(cfg, train["text"].tolist(), train["label"].tolist(), labels, args.steps, args.threads)

    train_seconds = sum(h["train_seconds"] for h in result.history)
    print(
        f"\nTraining throughput: {args.model}, batch {BATCH}, length {LENGTH}, {args.threads} torch threads, "
        f"{args.steps} steps an epoch"
    )
    print(f"{'path':<34}{'samples/s (steady)':>20}")
    print(f"{'plain PyTorch loop':<34}{plain_rate:>20.1f}")
    print(f"{'raybm on Ray Train (epoch 2)':<34}{ray_rate:>20.1f}")
    print(f"ratio raybm / plain: {ray_rate / plain_rate:.3f}  (target >= 0.90)")
    print(
        f"raybm wall time {ray_wall:.0f}s for 2 epochs, of which training about {train_seconds:.0f}s; "
        f"the rest is Ray start-up, data preparation, validation, checkpoints and the test scoring"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
