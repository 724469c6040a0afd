"""Sweep efficiency: the same search space run as a full grid (FIFO, every trial to the
end) and under ASHA, on the same prepared data, in one run.

    .venv/bin/python bench/tune_efficiency.py [--root /tmp/bench-tune] [key=value ...]

Prints the trial-epochs each sweep used and its best validation macro-F1. Target: ASHA
within 0.5 F1 point of the grid's best with at most half its trial-epochs.

Defaults: the from-scratch TextCNN baseline (fast enough on 2 CPU cores to run a real
grid) on 6,000 tweets of the binary twitter corpus, 8 epochs, a 4 x 3 grid over the
learning rate and weight decay. Any config key can be overridden after the options, e.g.
``model.name=all-minilm-l6-v2 model.keep_layers=2`` on a machine with more time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPACE = {"train.lr": "grid([3e-4, 1e-3, 3e-3, 1e-2])", "train.weight_decay": "grid([0.0, 0.01, 0.1])"}
BASE = [
    "data.source=twitter-sentiment",
    "data.labels=[negative, positive]",
    "data.max_rows=6000",
    "data.max_length=48",
    "model.name=textcnn",
    "train.epochs=8",
    "train.batch_size=64",
    "train.warmup_ratio=0",
    "train.log_every_steps=1000",
    "train.cpus_per_worker=0.9",
    "tune.grace_period=1",
    "tune.reduction_factor=3",
    "tune.max_concurrent_trials=2",
    "tune.num_samples=1",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/bench-tune", help="results folder for both sweeps")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from raybm.config import build_config
    from raybm.runtime import ensure_ray, quiet_ray_data
    from raybm.tune.leaderboard import format_leaderboard
    from raybm.tune.sweep import run_sweep

    space = "{" + ", ".join(f"{k}: '{v}'" for k, v in SPACE.items()) + "}"
    rows = []
    for scheduler in ("fifo", "asha"):
        cfg = build_config(
            overrides=[
                *BASE,
                f"storage.root={args.root}",
                f"tune.search_space={space}",
                f"tune.scheduler={scheduler}",
                f"name=efficiency-{scheduler}",
                *args.overrides,
            ]
        )
        ensure_ray(cfg.ray)
        quiet_ray_data()
        started = time.time()
        result = run_sweep(cfg, log=lambda _: None)
        seconds = time.time() - started
        metric = cfg.tune.metric
        print(f"\n{scheduler.upper()} leaderboard:\n{format_leaderboard(result.leaderboard, metric)}", flush=True)
        rows.append(
            {
                "sweep": "full grid (FIFO)" if scheduler == "fifo" else "ASHA",
                "trials": len(result.leaderboard),
                "trial_epochs": sum(r.epochs_run for r in result.leaderboard),
                "best": max(s for r in result.leaderboard if (s := r.score()) is not None),
                "stopped": sum(r.status == "stopped" for r in result.leaderboard),
                "seconds": seconds,
            }
        )

    grid, asha = rows
    print(f"\n{'sweep':<18}{'trials':>8}{'stopped':>9}{'trial-epochs':>14}{'best val F1':>13}{'seconds':>9}")
    for r in rows:
        print(
            f"{r['sweep']:<18}{r['trials']:>8}{r['stopped']:>9}{r['trial_epochs']:>14}{r['best']:>13.4f}"
            f"{r['seconds']:>9.0f}"
        )
    epochs_ratio = asha["trial_epochs"] / grid["trial_epochs"]
    gap = (grid["best"] - asha["best"]) * 100
    print(f"ASHA / grid trial-epochs: {epochs_ratio:.2f} (target <= 0.50); F1 gap: {gap:+.2f} points (target <= 0.50)")
    ok = epochs_ratio <= 0.5 and gap <= 0.5
    print(f"target {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
