"""The fixed toll of a raybm run and of a sweep trial, against a plain PyTorch loop, in one run.

    .venv/bin/python bench/run_overhead.py [--model tiny-bert] [--what run,sweep] [--threads 2]
    python bench/run_overhead.py --gpu [--precision bf16]      # on a GPU machine: both sides on the GPU

A whole ``raybm train`` (Ray start, the prepared split read and tokenized, the Ray Train
worker group, 2 epochs with validation, checkpoints, the published model scored on the
test split) against a plain loop in this process doing the same work on the same prepared
split (tokenize, 2 epochs with validation, score test). Same model, batch size, sequence
length, optimizer and torch threads. Prints the ratio of whole-run wall times and where
raybm's seconds outside training and validation go. ``--what sweep``: a 4-trial grid
(learning rates, one trial at a time) against 4 plain runs sharing one tokenization, once
per ``--trial-runners`` (trials in their own process, and in a Ray Train worker group).

Targets (tiny-bert, full binary twitter corpus): outside training and validation at most
15 s a run and 10 s a sweep trial; with all-minilm-l6-v2 a whole run at most 1.1x plain.
The data stage (cleaning, splitting) runs once before any timing: both sides start from
the prepared split. ``--gpu``: raybm's worker (``train.use_gpu=yes``) and the plain loop
train on the GPU, in ``--precision`` (fp32, or bf16 autocast on both sides); on a GPU a
step's compute is small, so the fixed toll weighs most there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raybm.ray_patches import POLL_INTERVAL_ENV, POLL_INTERVAL_S

LRS = (1e-3, 5e-4, 2e-4, 1e-4)


class Clock:
    """Timestamps of raybm's own progress lines (the breakdown's boundaries)."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []

    def __call__(self, line: str) -> None:
        self.lines.append((time.time(), line))

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)


def plain_run(
    model_name: str,
    labels: list[str],
    data: dict,
    epochs: int,
    batch: int,
    lr: float,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict:
    """Train ``epochs`` with validation after each, then score test, on ``device`` (bf16:
    autocast, as raybm's loop does); seconds per part."""
    import numpy as np
    import torch

    from raybm.config import build_config
    from raybm.data.tokenizing import pad_collate
    from raybm.inference.evaluate import metrics_from_confusion
    from raybm.models.build import build_classifier

    cfg = build_config(overrides=[f"model.name={model_name}", f"train.lr={lr}"])
    torch.manual_seed(0)
    model = build_classifier(cfg.model, labels).to(device)
    dev = torch.device(device)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()

    def batches(split: str, size: int, shuffle: bool, seed: int = 0):
        ids, mask, y = data[split]
        order = np.random.default_rng(seed).permutation(len(y)) if shuffle else np.arange(len(y))
        for lo in range(0, len(y), size):
            pick = order[lo : lo + size]
            yield {
                k: v.to(dev)
                for k, v in pad_collate(
                    {"input_ids": ids[pick], "attention_mask": mask[pick], "labels": y[pick]}
                ).items()
            }

    def score(split: str) -> dict:
        model.eval()
        cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
        with torch.no_grad(), torch.autocast(**amp):
            for b in batches(split, 256, False):
                pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                np.add.at(cm, (b["labels"].cpu().numpy(), pred.cpu().numpy()), 1)
        model.train()
        return metrics_from_confusion(cm, labels)

    seconds = {"train": 0.0, "validation": 0.0}
    model.train()
    for epoch in range(epochs):
        t0 = time.time()
        for b in batches("train", batch, True, seed=epoch):
            with torch.autocast(**amp):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = loss_fn(logits.float(), b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.time()
        val = score("validation")
        seconds["train"] += t1 - t0
        seconds["validation"] += time.time() - t1
    t0 = time.time()
    test = score("test")
    seconds["test"] = time.time() - t0
    return {"seconds": seconds, "val_f1": val["f1_macro"], "test_f1": test["f1_macro"]}


def plain_device(args) -> tuple[str, str]:
    """The plain loop's device and precision: raybm's, as ``--gpu`` and ``--precision`` set them."""
    return ("cuda" if args.gpu else "cpu"), args.precision


def tokenize_splits(model_name: str, frames: dict, max_length: int) -> dict:
    """Every split tokenized in this process (the plain loop's data preparation)."""
    import numpy as np

    from raybm.models.build import load_tokenizer

    tok = load_tokenizer(model_name)
    out = {}
    for split, frame in frames.items():
        enc = tok(frame["text"].tolist(), truncation=True, max_length=max_length)
        ragged = []
        for key in ("input_ids", "attention_mask"):  # one array per row, as Ray Data hands them to pad_collate
            col = np.empty(len(enc[key]), dtype=object)
            col[:] = [np.asarray(r, dtype=np.int64) for r in enc[key]]
            ragged.append(col)
        out[split] = (*ragged, np.asarray(frame["label"], dtype=np.int64))
    return out


def epoch_seconds(history: list[dict]) -> float:
    """Training plus validation, epoch by epoch, as each epoch's record says."""
    return sum(h["finished_at"] - h["started_at"] for h in history)


def breakdown(
    started: float, ray_up: float, clock: Clock, history: list[dict], ended: float
) -> list[tuple[str, float]]:
    """Where a raybm run's wall time went, in order."""
    fit = clock.first("Training run")
    # The workers score test when they can ("Scored ... in the training worker", after
    # publishing); otherwise the driver does ("Scoring the best checkpoint ...").
    scored = clock.first("Scored")
    scoring = scored or clock.first("Scoring")
    first, last = history[0]["started_at"], history[-1]["finished_at"]
    epochs = epoch_seconds(history)
    loop_started, loop_ready = history[0]["loop_started_at"], history[0]["loop_ready_at"]
    return [
        ("Ray start", ray_up - started),
        ("read and tokenize the prepared splits", fit - ray_up),
        ("Ray Train: controller and worker processes", loop_started - fit),
        ("worker: imports, model, wrap, splits read whole (until it is ready)", loop_ready - loop_started),
        ("worker: ready until epoch 1 starts", first - loop_ready),
        ("training and validation (the epochs themselves)", epochs),
        ("between epochs (checkpoints, reports)", (last - first) - epochs),
        *(
            [
                ("after the epochs: test scored in the worker, Ray Train shutdown, publish", scoring - last),
                ("write metrics, history, model card", ended - scoring),
            ]
            if scored
            else [
                ("end of training to test scoring (checkpoint, publish)", scoring - last),
                ("score the test split (a Ray Data job), write results", ended - scoring),
            ]
        ),
    ]


def empty_fit_seconds() -> float:
    """Ray Train's own floor here: one TorchTrainer.fit of one CPU worker whose loop only reports."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(_config):
        ray.train.report({"done": 1})

    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)  # as raybm's runs poll
    started = time.time()
    TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name=f"empty-{int(started)}", storage_path="/tmp/raybm-bench-empty"),
    ).fit()
    return time.time() - started


def bench_run(args, base: list[str], frames: dict, labels: list[str]) -> None:
    import ray

    from raybm.commands.common import start
    from raybm.config import build_config
    from raybm.train.driver import run_training

    cfg = build_config(overrides=[*base, f"train.lr={LRS[0]}", f"name=overhead-{int(time.time())}"])
    started = time.time()
    start(cfg, ["train"])  # as `raybm train` starts: checks, Ray, imports warmed meanwhile
    ray_up = time.time()
    clock = Clock()
    result = run_training(cfg, log=clock)
    ended = time.time()
    floor = empty_fit_seconds()
    ray.shutdown()
    raybm_wall = ended - started
    parts = breakdown(started, ray_up, clock, result.history, ended)

    t0 = time.time()
    data = tokenize_splits(args.model, frames, args.max_length)
    tokenize_s = time.time() - t0
    plain = plain_run(args.model, labels, data, args.epochs, args.batch, LRS[0], *plain_device(args))
    plain_wall = tokenize_s + sum(plain["seconds"].values())

    outside = raybm_wall - epoch_seconds(result.history)
    print(
        f"\nA whole run: {args.model}, {args.epochs} epochs, batch {args.batch}, length {args.max_length}, "
        f"{args.threads} torch threads, {len(frames['train']):,} training rows, "
        f"{'GPU' if args.gpu else 'CPU'}, {args.precision}"
    )
    print(f"{'path':<58}{'seconds':>9}")
    for what, s in parts:
        print(f"  raybm: {what:<50}{s:>9.1f}")
    print(f"{'raybm train, whole run':<58}{raybm_wall:>9.1f}")
    print(f"  plain: {'tokenize in process':<50}{tokenize_s:>9.1f}")
    for what, s in plain["seconds"].items():
        print(f"  plain: {what:<50}{s:>9.1f}")
    print(f"{'plain loop, whole run':<58}{plain_wall:>9.1f}")
    print(f"ratio raybm / plain: {raybm_wall / plain_wall:.2f}")
    print(
        f"raybm outside training and validation: {outside:.1f} s (target <= 15 s with tiny-bert); "
        f"plain: {plain_wall - plain['seconds']['train'] - plain['seconds']['validation']:.1f} s"
    )
    print(f"Ray Train's floor here: an empty TorchTrainer.fit (1 worker, no data) took {floor:.1f} s")
    print(f"test macro-F1: raybm {result.metrics.test['f1_macro']:.4f}, plain {plain['test_f1']:.4f}")


def empty_sweep_seconds(n: int) -> float:
    """Ray Tune and Train's own floor here: ``n`` trials one at a time, each a function
    trainable fitting a TorchTrainer (1 worker) whose loop only reports, as raybm's trials do."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def loop(_config):
        ray.train.report({"score": 1.0})

    def trial(_params):
        os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)  # as raybm's trials poll
        TorchTrainer(
            loop,
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(
                name=f"empty-{tune.get_context().get_trial_id()}",
                storage_path="/tmp/raybm-bench-empty",
                callbacks=[TuneReportCallback()],
            ),
        ).fit()

    started = time.time()
    tune.Tuner(
        tune.with_resources(trial, {"memory": 512 * 1024 * 1024}),
        param_space={"x": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name=f"empty-sweep-{int(started)}", storage_path="/tmp/raybm-bench-empty", verbose=0),
    ).fit()
    return time.time() - started


def empty_tune_seconds(n: int) -> float:
    """Ray Tune's own floor here: ``n`` trials one at a time, each a function trainable
    holding one CPU that imports torch and reports once, as raybm's in-process trials do."""
    from ray import tune

    def trial(_params):
        import torch  # noqa: F401

        tune.report({"score": 1.0})

    started = time.time()
    tune.Tuner(
        tune.with_resources(trial, {"CPU": 1}),
        param_space={"x": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name=f"empty-tune-{int(started)}", storage_path="/tmp/raybm-bench-empty", verbose=0),
    ).fit()
    return time.time() - started


def bench_sweep(args, base: list[str], frames: dict, labels: list[str]) -> None:
    import ray

    from raybm.commands.common import start
    from raybm.config import build_config
    from raybm.tune.sweep import run_sweep

    grid = ", ".join(f"{lr:g}" for lr in LRS)
    n = len(LRS)
    walls = {}
    for runner in args.trial_runners.split(","):
        cfg = build_config(
            overrides=[
                *base,
                f"name=overhead-sweep-{runner}-{int(time.time())}",
                "tune.max_concurrent_trials=1",
                "tune.num_samples=1",
                "tune.soup=none",
                "tune.scheduler=fifo",
                f"tune.trial_runner={runner}",
                f"tune.search_space={{train.lr: 'grid([{grid}])'}}",
            ]
        )
        started = time.time()
        start(cfg, ["tune"])  # as `raybm tune` starts
        result = run_sweep(cfg, log=lambda _: None)
        ended = time.time()
        floors = {
            "in_trial": ("Ray Tune's", "a function trainable that imports torch and reports", empty_tune_seconds),
            "ray_train": ("Ray Tune and Train's", "an empty TorchTrainer.fit", empty_sweep_seconds),
        }
        what, each, measure = floors[runner]
        floor = measure(n)
        ray.shutdown()
        computed = sum(epoch_seconds(row.history) for row in result.leaderboard)
        walls[runner] = (ended - started, computed, floor, what, each)

    t0 = time.time()
    data = tokenize_splits(args.model, frames, args.max_length)
    plain_wall = time.time() - t0
    for lr in LRS:
        plain = plain_run(args.model, labels, data, args.epochs, args.batch, lr, *plain_device(args))
        plain_wall += sum(plain["seconds"].values())
    print(f"\nA sweep of {n} trials, one at a time ({args.model}, {args.epochs} epochs each), against {n} plain runs")
    print(f"{'plain: tokenize once, 4 runs, each scored on test':<58}{plain_wall:>9.1f}")
    for runner, (wall, computed, floor, what, each) in walls.items():
        print(f"tune.trial_runner={runner}:")
        print(f"  {'raybm sweep (winner scored on test)':<56}{wall:>9.1f}")
        print(f"  {'  of which the trials epochs themselves':<56}{computed:>9.1f}")
        print(f"  ratio raybm / plain: {wall / plain_wall:.2f}")
        print(f"  raybm outside training and validation: {(wall - computed) / n:.1f} s a trial (target <= 10 s)")
        print(
            f"  {what} floor here: an empty sweep of {n} trials (each {each}) took {floor:.1f} s, "
            f"{floor / n:.1f} s a trial"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--what", default="run,sweep", help="run, sweep or both (comma-separated)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-rows", type=int, default=0, help="0: the whole corpus")
    parser.add_argument("--root", default="/tmp/raybm-bench-overhead")
    parser.add_argument("--gpu", action="store_true", help="both sides train on the GPU (train.use_gpu=yes)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--trial-runners",
        default="in_trial,ray_train",
        help="the sweep's tune.trial_runner values to measure, one sweep each",
    )
    args = parser.parse_args()

    import pandas as pd

    from raybm.config import build_config
    from raybm.data import run_data_stage
    from raybm.runtime import ensure_ray
    from raybm.storage.results import Results

    base = [
        f"storage.root={args.root}",
        "data.source=twitter-sentiment",
        "data.labels=[negative, positive]",
        f"data.max_length={args.max_length}",
        f"model.name={args.model}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}",
        f"train.torch_threads={args.threads}",
        "train.warmup_ratio=0",
        "train.log_every_steps=100000",
        "train.keep_checkpoints=1",
        "tune.measure_cost=false",
        f"train.use_gpu={'yes' if args.gpu else 'no'}",
        f"train.precision={args.precision}",
        *([f"data.max_rows={args.max_rows}"] if args.max_rows else []),
    ]
    cfg = build_config(overrides=base)
    ray_ctx = ensure_ray(cfg.ray)  # the data stage, once, outside every timing
    prepared = run_data_stage(cfg, log=lambda _: None)
    import ray

    ray.shutdown()
    del ray_ctx
    results = Results.from_config(cfg.storage)
    frames = {s: pd.read_parquet(results.dataset_split_dir(prepared.name, s)) for s in ("train", "validation", "test")}
    labels = results.dataset_label_map(prepared.name)["labels"]
    for what in args.what.split(","):
        {"run": bench_run, "sweep": bench_sweep}[what.strip()](args, base, frames, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
