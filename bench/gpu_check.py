"""GPU check of the training loop: precision, several workers on one GPU, FSDP; in one run.

    python bench/gpu_check.py [--root /tmp/gpu-check] [--epochs 2] [--batch 128] [--json out.json]

Each case is a real ``raybm`` training run on Ray Train (the full binary twitter corpus,
8:1:1 split, max length 64) on one Ray instance, one after the other:

    fp32, bf16 and fp16 (grad scaler) on one worker holding the GPU;
    bf16 with two workers sharing the GPU (0.5 GPU each; they talk over gloo);
    bf16 with FSDP on one worker (checkpoints gathered to a full state dict);
    bf16 LoRA alone, with gradient checkpointing, and with FSDP (cases 6-8);
    QLoRA: LoRA over a 4-bit (NF4) base, bitsandbytes (case 9; refused without a GPU).

For each it prints the steady-state samples/s of the last epoch, the peak GPU memory, the
validation macro-F1 and the test macro-F1 of the saved model (read back from the
checkpoint: a broken save shows as a gap between the two). A plain PyTorch bf16 loop on the
same model, batch and length, with the data already tokenized on the GPU, gives the
ceiling the Ray Train path is compared with.

``--scratch`` trains from random weights (same architecture; for machines that cannot
carry the pretrained weights). ``--smoke`` runs a tiny model on a few hundred rows on CPU,
to check this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [
    ("fp32, 1 worker", ["train.precision=fp32"]),
    ("bf16, 1 worker", ["train.precision=bf16"]),
    ("fp16 + grad scaler, 1 worker", ["train.precision=fp16"]),
    ("bf16, 2 workers sharing the GPU", ["train.precision=bf16", "train.num_workers=2", "train.gpus_per_worker=0.5"]),
    ("bf16, FSDP, 1 worker", ["train.precision=bf16", "train.parallelism=fsdp"]),
    # LoRA (issue 20): its composition with bf16, gradient checkpointing and FSDP on a GPU.
    ("bf16, LoRA r8, 1 worker", ["train.precision=bf16", "train.strategy=lora", "train.lr=3e-3"]),
    (
        "bf16, LoRA r8 + gradient checkpointing",
        ["train.precision=bf16", "train.strategy=lora", "train.lr=3e-3", "train.gradient_checkpointing=true"],
    ),
    (
        "bf16, LoRA r8, FSDP, 1 worker",
        ["train.precision=bf16", "train.strategy=lora", "train.lr=3e-3", "train.parallelism=fsdp"],
    ),
    # QLoRA (issue 31): the frozen base in 4 bits (bitsandbytes), adapters and head in bf16.
    (
        "bf16, QLoRA r8 (NF4 base), 1 worker",
        ["train.precision=bf16", "train.strategy=lora", "train.lr=3e-3", "train.quantize_base=nf4"],
    ),
]


def plain_loop(
    cfg,
    texts: list[str],
    labels_ids: list[int],
    labels: list[str],
    batch: int,
    length: int,
    steps: int,
    device: str,
    scratch: bool,
) -> float:
    """Samples/s of a hand-written bf16 loop over pre-tokenized, device-resident batches."""
    import torch

    from raybm.models.build import build_classifier, load_tokenizer
    from raybm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_classifier(cfg.model, labels, pretrained=not scratch).to(device)
    tok = load_tokenizer(cfg.model.name)
    opt = build_optimizer(model, cfg.train)
    nb = max(1, min(8, len(texts) // batch))  # batches cycled through
    enc = tok(texts[: batch * nb], truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    y = torch.tensor(labels_ids[: batch * nb], device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = device == "cuda"
    model.train()

    def one(i: int) -> None:
        lo = (i % nb) * batch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids[lo : lo + batch], attention_mask=mask[lo : lo + batch]).logits
        loss_fn(logits.float(), y[lo : lo + batch]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(5):
        one(i)
    if amp:
        torch.cuda.synchronize()
    t0 = time.time()
    for i in range(steps):
        one(i)
    if amp:
        torch.cuda.synchronize()
    return steps * batch / (time.time() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/raybm-gpu-check")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--scratch", action="store_true", help="random weights, same architecture")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 300 rows, CPU: checks this script")
    parser.add_argument("--cases", default="", help="comma-separated case numbers (1-based); empty: all")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pandas as pd
    import ray
    import torch

    from raybm.config import build_config
    from raybm.runtime import quiet_ray_data, worker_env
    from raybm.storage.results import Results
    from raybm.train.driver import run_training

    base = [
        f"storage.root={args.root}",
        "data.source=twitter-sentiment",
        "data.labels=[negative,positive]",
        "data.max_length=64",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}",
        "train.eval_batch_size=256",
        f"train.lr={args.lr}",
        "train.log_every_steps=50",
        "train.keep_checkpoints=1",
        "train.cpus_per_worker=2",
        "train.use_gpu=auto",
    ]
    if args.scratch:
        base.append("train.strategy=scratch")
    if args.smoke:
        base += ["model.name=tiny-bert", "data.max_rows=300", "train.cpus_per_worker=0.5", "train.batch_size=32"]
        args.batch = 32
    cases = CASES
    if args.cases:
        cases = [CASES[int(i) - 1] for i in args.cases.split(",")]
    # Without a GPU (--smoke) every case runs on CPU: precision falls back to fp32, the
    # "sharing" case is two CPU workers over gloo, FSDP shards over gloo.

    gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__}, GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}", flush=True)
    # No dashboard: the check needs only Ray Train, and it keeps the install small.
    ray.init(include_dashboard=False, runtime_env={"env_vars": worker_env()})
    quiet_ray_data()
    rows = []
    stamp = time.strftime("%H%M%S")  # a fresh run per case and invocation: never a resume
    for label, extra in cases:
        number = CASES.index((label, extra)) + 1
        cfg = build_config(overrides=base + extra + [f"name=gpu-check-{stamp}-{number}"])
        started = time.time()
        try:
            result = run_training(cfg, log=lambda line: print(line, flush=True))
        except Exception as e:  # noqa: BLE001 - a failed case is a result too
            print(f"CASE FAILED: {label}: {type(e).__name__}: {e}", flush=True)
            rows.append({"case": label, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        last = result.history[-1]
        row = {
            "case": label,
            "run": result.run_name,
            "steady_samples_per_s": round(last["steady_samples_per_s"], 1),
            "gpu_peak_memory_gb": last.get("gpu_peak_memory_gb"),
            "train_loss_first_last": [round(result.history[0]["train_loss"], 4), round(last["train_loss"], 4)],
            "val_f1_macro": round(last["val_f1_macro"], 4),
            "test_f1_macro": round(result.metrics.test["f1_macro"], 4),
            "test_accuracy": round(result.metrics.test["accuracy"], 4),
            "wall_s": round(time.time() - started, 1),
        }
        rows.append(row)
        print("CASE", json.dumps(row), flush=True)

    ceiling = None
    done = [r for r in rows if "error" not in r]
    if done:
        cfg = build_config(overrides=base)
        results = Results.from_config(cfg.storage)
        dataset = json.loads(open(os.path.join(args.root, "runs", done[0]["run"], "metrics.json")).read())["dataset"]
        train = pd.read_parquet(results.dataset_split_dir(dataset, "train"))
        labels = results.dataset_label_map(dataset)["labels"]
        ceiling = plain_loop(
            cfg,
            train["text"].tolist(),
            train["label"].tolist(),
            labels,
            args.batch,
            64,
            steps=20 if args.smoke else 200,
            device="cuda" if gpu else "cpu",
            scratch=args.scratch or args.smoke,
        )
    print(
        f"\nGPU check: {cfg.model.name}{' (random weights)' if args.scratch else ''}, batch {args.batch} "
        f"per worker, max length 64, {args.epochs} epoch(s), twitter corpus"
    )
    print(f"{'case':<34}{'samples/s':>10}{'peak GB':>9}{'loss first→last':>18}{'val F1':>8}{'test F1':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<34}  FAILED: {r['error'][:120]}")
            continue
        mem = f"{r['gpu_peak_memory_gb']:.2f}" if r["gpu_peak_memory_gb"] is not None else "-"
        lf = f"{r['train_loss_first_last'][0]:.3f}→{r['train_loss_first_last'][1]:.3f}"
        print(
            f"{r['case']:<34}{r['steady_samples_per_s']:>10.1f}{mem:>9}{lf:>18}{r['val_f1_macro']:>8.4f}"
            f"{r['test_f1_macro']:>8.4f}"
        )
    if ceiling:
        print(f"plain bf16 loop, data on the GPU: {ceiling:.1f} samples/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "gpu": torch.cuda.get_device_name(0) if gpu else None,
                    "torch": torch.__version__,
                    "cases": rows,
                    "plain_loop_samples_per_s": ceiling,
                    "args": vars(args),
                },
                f,
                indent=2,
            )
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
