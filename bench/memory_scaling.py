"""Memory per training worker as workers are added, side by side in one run: DDP, FSDP on 2
and on 3 workers, LoRA; on generated Llama-style models of about 0.4B and 0.9B parameters.

    .venv/bin/python bench/memory_scaling.py            # both models, every case (~30 min on 2 cores)
    .venv/bin/python bench/memory_scaling.py --only 0.4b

Each model is a randomly initialised Llama-style classifier (MiniLM's tokenizer) saved as an
ordinary model folder. Each case is one `raybm train` (batch 4, length 32, 3 steps an
epoch, a checkpoint each epoch). Each second the peak resident memory of every Ray Train
worker process is read (the kernel's high-water mark, VmHWM: no peak between reads is
missed, only the last second of a process's life). Printed per case: every worker's peak,
the step time, the checkpoint's size and the seconds to write and store it, and raybm's own
estimate (raybm.train.memory) beside the measured peak. The 0.9B FSDP case trains 2 epochs
on 2 workers, one of which is killed (SIGKILL) once rank 0 says the first checkpoint is
stored: it must resume from the shards and publish.

On a GPU machine, ``--gpu`` runs the GPU cases instead (each on one GPU, bf16, batch 8,
length 128, 20 steps): FSDP2 on the 0.9B model (tokens/s, peak GPU memory), FSDP2 with
``train.cpu_offload`` on models of growing size until one fails (``--offload-sizes``), and
QLoRA (``train.quantize_base=nf4``, needs bitsandbytes) on the 0.9B model.

    python bench/memory_scaling.py --gpu [--offload-sizes 1.5b,3b,5b]

Targets (issue 31): FSDP on 2 workers at most 0.6x of DDP's peak per worker on the 0.4B
model, at most 0.45x on 3; LoRA on the 0.9B model at most 0.35x of DDP-full's peak; every
estimate within 30% of the measured peak.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    "0.4b": (1536, 12),
    "0.9b": (2048, 16),  # hidden, layers: 387M and 867M parameters
    "1.5b": (2560, 18),
    "3b": (3072, 26),
    "5b": (4096, 24),
    "8b": (4096, 40),
}  # for --gpu offload
GPU = [
    "train.use_gpu=yes",
    "train.gpus_per_worker=1",
    "train.precision=bf16",
    "data.max_length=128",
    "train.batch_size=8",
    "train.max_steps_per_epoch=20",
    "train.epochs=1",
    "train.num_workers=1",
]
COMMON = [
    "data.max_length=32",
    "train.batch_size=4",
    "train.max_steps_per_epoch=3",
    "train.keep_checkpoints=1",
    "train.eval_batch_size=16",
    "train.check_memory=false",
]  # the estimate is compared here, not enforced


def build_model(folder: str, hidden: int, layers: int) -> int:
    """A random Llama-style classifier with MiniLM's tokenizer, saved as a model folder; its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from raybm.models.build import load_tokenizer

    tok = load_tokenizer("all-minilm-l6-v2")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class Sampler(threading.Thread):
    """Each Ray Train worker process's peak resident memory (the kernel's high-water mark,
    read once a second until the process ends); once
    ``kill`` is set (rank 0 said its first checkpoint is stored), SIGKILLs one worker other
    than rank 0, once."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()
        self.kill = threading.Event()
        self.killed: int | None = None

    def run(self) -> None:
        import psutil

        while not self.stop.wait(1.0):
            workers = []
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), high_water_mark(proc.pid))
                        workers.append(proc.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                    continue
            if self.kill.is_set() and self.killed is None and len(workers) > 1:
                self.killed = sorted(workers)[-1]  # started after rank 0's (Ray starts ranks in order)
                os.kill(self.killed, signal.SIGKILL)


def high_water_mark(pid: int) -> int:
    """A process's peak resident memory so far (bytes): the kernel's own mark (VmHWM), so
    a peak shorter than the sampling second is not missed."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(label: str, model: str, data: str, root: str, settings: list[str], kill: bool = False) -> dict:
    """One `raybm train` with its workers sampled."""
    from raybm.storage.results import Results

    name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    sampler = Sampler()
    sampler.start()
    started = time.time()
    cmd = [
        sys.executable,
        "-m",
        "raybm.cli",
        "train",
        f"storage.root={root}",
        f"data.source={data}",
        "data.text_column=text",
        "data.label_column=label",
        f"model.name={model}",
        f"name={name}",
        *COMMON,
        *settings,
    ]
    out = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in out.stdout:  # rank 0's line comes once Ray Train has registered the checkpoint
        lines.append(line)
        if kill and "checkpoint of epoch 1 written and stored" in line:
            sampler.kill.set()
    out.wait()
    sampler.stop.set()
    sampler.join()
    text = "".join(lines)
    saves = [float(s) for s in re.findall(r"checkpoint of epoch \d+ written and stored in ([\d.]+) s", text)]
    row = {
        "case": label,
        "ok": out.returncode == 0,
        "seconds": round(time.time() - started, 1),
        "peaks_gb": sorted((round(v / 1e9, 2) for v in sampler.peaks.values()), reverse=True),
        "checkpoint_s": saves,
        "killed_worker": sampler.killed,
        "error": None if out.returncode == 0 else text[-2000:],
    }
    row["peak_gb"] = row["peaks_gb"][0] if row["peaks_gb"] else 0.0
    run_dir = os.path.join(root, "runs", name)
    history = os.path.join(run_dir, "history.json")
    if os.path.exists(history):
        epochs = json.load(open(history))
        row["step_s"] = round(sum(h["train_seconds"] for h in epochs) / max(1, 3 * len(epochs)), 2)
        row["resumed_from"] = [h["resumed_from_epoch"] for h in epochs]
    sizes = [
        sum(os.path.getsize(f) for f in glob.glob(os.path.join(c, "**"), recursive=True) if os.path.isfile(f))
        for c in glob.glob(os.path.join(run_dir, "checkpoint_*"))
    ]
    row["checkpoint_gb"] = round(max(sizes, default=0) / 1e9, 2)
    row["published"] = os.path.exists(os.path.join(run_dir, "model", "model.safetensors"))
    if os.path.exists(history) and epochs[-1].get("gpu_peak_memory_gb") is not None:
        row["gpu_peak_gb"] = round(epochs[-1]["gpu_peak_memory_gb"], 2)
        row["tokens_per_s"] = round(epochs[-1]["steady_samples_per_s"] * 128)
    shutil.rmtree(run_dir, ignore_errors=True)  # the disk: 0.9B checkpoints are ~10 GB
    del Results
    return row


def estimated(model: str, settings: list[str]) -> tuple[float, float]:
    """raybm's estimate (GB) for a case: (per worker, rank 0)."""
    from raybm.config import build_config
    from raybm.train.memory import GB, architecture, estimate

    cfg = build_config(overrides=[f"model.name={model}", *COMMON, *settings])
    est = estimate(cfg, architecture(cfg, ["neg", "pos"]), use_gpu=False)
    return round(est.per_worker / GB, 2), round(est.rank0 / GB, 2)


def cases(size: str) -> list[tuple[str, list[str], bool]]:
    """(label, settings, kill a worker) of each case on a model size."""
    if size == "0.4b":
        return [
            ("0.4B DDP 2 workers", ["train.num_workers=2", "train.epochs=1"], False),
            ("0.4B FSDP 2 workers", ["train.num_workers=2", "train.parallelism=fsdp", "train.epochs=1"], False),
            (
                "0.4B FSDP 3 workers",
                ["train.num_workers=3", "train.cpus_per_worker=0.66", "train.parallelism=fsdp", "train.epochs=1"],
                False,
            ),
        ]
    return [
        ("0.9B DDP 1 worker", ["train.num_workers=1", "train.cpus_per_worker=2", "train.epochs=1"], False),
        (
            "0.9B LoRA 1 worker",
            [
                "train.num_workers=1",
                "train.cpus_per_worker=2",
                "train.strategy=lora",
                "train.lr=0.001",
                "train.epochs=1",
            ],
            False,
        ),
        (
            "0.9B FSDP 2 workers, 2 epochs, a worker killed",
            ["train.num_workers=2", "train.parallelism=fsdp", "train.epochs=2", "train.max_failures=1"],
            True,
        ),
    ]


def gpu_cases(offload_sizes: list[str]) -> list[tuple[str, str, list[str]]]:
    """(model size, label, settings) of the GPU cases."""
    out = [
        ("0.9b", "0.9B FSDP2 bf16, 1 GPU", [*GPU, "train.parallelism=fsdp"]),
        ("0.9b", "0.9B QLoRA nf4, 1 GPU", [*GPU, "train.strategy=lora", "train.lr=0.001", "train.quantize_base=nf4"]),
    ]
    for size in offload_sizes:
        out.append(
            (
                size,
                f"{size.upper()} FSDP2 bf16 + cpu_offload, 1 GPU",
                [*GPU, "train.parallelism=fsdp", "train.cpu_offload=true"],
            )
        )
    return out


def run_gpu(work: str, data: str, offload_sizes: list[str]) -> list[dict]:
    """The GPU cases, each model built once; the offload sizes stop at the first that fails."""
    rows: list[dict] = []
    built: dict[str, str] = {}
    for size, label, settings in gpu_cases(offload_sizes):
        if size not in built:
            for old in built.values():
                shutil.rmtree(old, ignore_errors=True)
            built = {size: os.path.join(work, f"model-{size}")}
            print(f"model {size}: {build_model(built[size], *MODELS[size]) / 1e6:.0f}M parameters", flush=True)
        row = run_case(label, built[size], data, os.path.join(work, "results"), settings)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if "cpu_offload" in label and not row["ok"]:
            break
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--gpu", action="store_true", help="the GPU cases (FSDP2 bf16, offload, QLoRA)")
    parser.add_argument("--case", default="", help="only the cases whose label contains this")
    parser.add_argument("--offload-sizes", default="1.5b,3b,5b", help="model sizes tried with cpu_offload, in order")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pandas as pd

    work = tempfile.mkdtemp(prefix="raybm-memory-")
    data = os.path.join(work, "data.csv")
    words = ["good", "bad", "great", "awful", "fine", "poor", "lovely", "broken"]
    pd.DataFrame(
        {
            "text": [f"{words[i % 8]} thing number {i}" for i in range(400)],
            "label": ["pos" if i % 2 == 0 else "neg" for i in range(400)],
        }
    ).to_csv(data, index=False)
    if args.gpu:
        rows = run_gpu(work, data, [s for s in args.offload_sizes.split(",") if s])
        shutil.rmtree(work, ignore_errors=True)
        return 0 if all(r["ok"] for r in rows) else 1
    rows = []
    for size in [args.only] if args.only else ["0.4b", "0.9b"]:
        model = os.path.join(work, f"model-{size}")
        n = build_model(model, *MODELS[size])
        print(f"model {size}: {n / 1e6:.0f}M parameters", flush=True)
        for label, settings, kill in cases(size):
            if args.case not in label:
                continue
            row = run_case(label, model, data, os.path.join(work, "results"), settings, kill)
            row["estimate_gb"], row["estimate_rank0_gb"] = estimated(model, settings)
            row["estimate_over_measured"] = (
                round(row["estimate_rank0_gb"] / row["peak_gb"], 2) if row["peak_gb"] else None
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
        shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    report(rows)
    return 0 if all(r["ok"] for r in rows) else 1


def report(rows: list[dict]) -> None:
    """The ratios the targets are about."""
    by = {r["case"]: r for r in rows}

    def ratio(a: str, b: str) -> str:
        if a in by and b in by and by[a]["ok"] and by[b]["ok"]:
            return f"{by[a]['peak_gb'] / by[b]['peak_gb']:.2f}x"
        return "n/a"

    print("\ncase | peak per worker (GB, every worker) | estimate rank 0 / others | step s | checkpoint GB, s")
    for r in rows:
        print(
            f"{r['case']} | {r['peak_gb']} {r['peaks_gb']} | {r['estimate_rank0_gb']} / {r['estimate_gb']} | "
            f"{r.get('step_s')} | {r['checkpoint_gb']}, {r['checkpoint_s']}{'' if r['ok'] else ' FAILED'}"
        )
    print(f"0.4B FSDP 2 workers / DDP: {ratio('0.4B FSDP 2 workers', '0.4B DDP 2 workers')} (target <= 0.6)")
    print(f"0.4B FSDP 3 workers / DDP: {ratio('0.4B FSDP 3 workers', '0.4B DDP 2 workers')} (target <= 0.45)")
    print(f"0.9B LoRA / DDP full: {ratio('0.9B LoRA 1 worker', '0.9B DDP 1 worker')} (target <= 0.35)")


if __name__ == "__main__":
    sys.exit(main())
