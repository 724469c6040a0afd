"""LoRA against full fine-tuning, side by side in one run, both as real `raybm train` runs.

    .venv/bin/python bench/lora.py [--rows 4000 | --rows 0] [--epochs 1] [--root /tmp/bench-results]

The same model (all-MiniLM-L6-v2), data (the twitter corpus, ``--rows`` rows, 8:1:1; 0: all),
batch size, sequence length and epochs; each strategy at its own learning rate (full
fine-tuning 1e-4, LoRA ``--lora-lr``, 3e-3 by default: the adapters start at zero and need
a larger step). Printed
for each: trainable parameters, the weights one checkpoint holds, the training worker's
peak memory (resident set; on a GPU its peak allocation), steady samples/s and the test
scores; then the ratios LoRA / full. A third run adds gradient checkpointing to full
fine-tuning (memory against time). Targets: LoRA trains at most 2% of the parameters, its
checkpoint is at most 5% of a full one, and its test macro-F1 is within 1 point (0.01) of
full fine-tuning's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "full": ["train.strategy=full", "train.lr=1e-4"],
    "lora": ["train.strategy=lora"],  # lr, rank, targets: --lora-lr, --lora-rank, --lora-targets
    "full + gradient checkpointing": ["train.strategy=full", "train.lr=1e-4", "train.gradient_checkpointing=true"],
}


def run(name: str, overrides: list[str], common: list[str]) -> dict:
    """One `raybm train` run; what the table shows of it."""
    from raybm.config import build_config
    from raybm.train.driver import run_training

    cfg = build_config(overrides=[*common, *overrides, f"name=bench-{name.split()[0]}-{int(time.time())}"])
    started = time.time()
    result = run_training(cfg, log=lambda _: None)
    last = result.history[-1]
    test = result.metrics.test
    return {
        "variant": name,
        "trainable": last["trainable_params"],
        "checkpoint_mb": last["checkpoint_weights_mb"],
        "peak_mb": last.get("gpu_peak_memory_gb", 0) * 1e3 or last["peak_rss_mb"],
        "samples_s": last["steady_samples_per_s"],
        "accuracy": test["accuracy"],
        "f1": test["f1_macro"],
        "wall_s": time.time() - started,
    }


def show(r: dict) -> None:
    """One compared run's line."""
    print(
        f"{r['variant']:<32} trainable {r['trainable']:>11,}  checkpoint {r['checkpoint_mb']:7.2f} MB  "
        f"peak {r['peak_mb']:7.0f} MB  {r['samples_s']:6.1f} samples/s  test acc {r['accuracy']:.4f}  "
        f"macro-F1 {r['f1']:.4f}  ({r['wall_s']:.0f} s)",
        flush=True,
    )


def start(root: str, rows: int, epochs: int, threads: int) -> list[str]:
    """The settings every compared run shares (MiniLM, the twitter corpus, batch 32, length
    64, warm-up 10%), after starting the local Ray they all run on."""
    from raybm.config import build_config
    from raybm.runtime import ensure_ray, quiet_ray_data

    common = [
        f"storage.root={root}",
        "data.source=twitter-sentiment",
        *([f"data.max_rows={rows}"] if rows else []),
        "data.max_length=64",
        "model.name=all-minilm-l6-v2",
        f"train.epochs={epochs}",
        "train.batch_size=32",
        f"train.torch_threads={threads}",
        "train.log_every_steps=1000",
        "train.keep_checkpoints=1",
        "train.warmup_ratio=0.1",
    ]
    ensure_ray(build_config(overrides=common).ray)
    quiet_ray_data()
    return common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="rows of the corpus to use; 0: all of it")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="bench-results")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", default="", help="comma-separated Linear names; empty: the architecture's")
    parser.add_argument("--skip-checkpointing", action="store_true", help="only full and LoRA")
    args = parser.parse_args()

    common = start(args.root, args.rows, args.epochs, args.threads)
    rows = []
    for name, overrides in VARIANTS.items():
        if args.skip_checkpointing and "checkpointing" in name:
            continue
        lora = (
            [
                f"train.lr={args.lora_lr}",
                f"train.lora_rank={args.lora_rank}",
                f"train.lora_targets=[{args.lora_targets}]",
            ]
            if name == "lora"
            else []
        )
        rows.append(run(name, overrides + lora, common))
        show(rows[-1])
    full, lora = rows[0], rows[1]
    size_ratio = lora["checkpoint_mb"] / full["checkpoint_mb"]
    trainable_ratio = lora["trainable"] / full["trainable"]
    f1_gap = full["f1"] - lora["f1"]
    print(
        f"\nLoRA / full: trainable {trainable_ratio:.4f}, checkpoint {size_ratio:.4f}, "
        f"peak memory {lora['peak_mb'] / full['peak_mb']:.3f}, samples/s {lora['samples_s'] / full['samples_s']:.3f}; "
        f"macro-F1 {lora['f1']:.4f} vs {full['f1']:.4f} (gap {f1_gap:+.4f})"
    )
    if len(rows) > 2:
        gc = rows[2]
        print(
            f"gradient checkpointing / full: peak memory {gc['peak_mb'] / full['peak_mb']:.3f}, "
            f"samples/s {gc['samples_s'] / full['samples_s']:.3f}"
        )
    ok = trainable_ratio <= 0.02 and size_ratio <= 0.05 and f1_gap <= 0.01
    print("targets (trainable <= 2%, checkpoint <= 5%, macro-F1 within 0.01):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
