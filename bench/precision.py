"""bf16 autocast against fp32 on the CPU, side by side in one run, as real `raybm train` runs.

    .venv/bin/python bench/precision.py [--rows 4000] [--epochs 2] [--root /tmp/bench-results]

Full fine-tuning of all-MiniLM-L6-v2 on the twitter corpus (``--rows`` rows, 8:1:1; 0: all),
batch 32, length 64, lr 1e-4, once with ``train.precision=fp32`` and once with
``train.precision=bf16`` (autocast in the training steps; validation and test score in
fp32). Printed for each: steady samples/s, the worker's peak memory and the test scores;
then the ratios bf16 / fp32. Targets: faster steps where the CPU computes bf16 natively
(AMX or AVX512-BF16), and test macro-F1 within 1 point of fp32's.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora import run, show, start

VARIANTS = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000, help="rows of the corpus to use; 0: all of it")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="bench-results")
    args = parser.parse_args()

    from raybm.train.optim import cpu_has_native_bf16

    print(f"this CPU computes bf16 natively: {cpu_has_native_bf16()}", flush=True)
    common = start(args.root, args.rows, args.epochs, args.threads)
    rows = []
    for name, overrides in VARIANTS.items():
        rows.append(run(name, ["train.strategy=full", "train.lr=1e-4", *overrides], common))
        show(rows[-1])
    fp32, bf16 = rows
    gap = fp32["f1"] - bf16["f1"]
    speed = bf16["samples_s"] / fp32["samples_s"]
    print(
        f"\nbf16 / fp32: samples/s {speed:.3f}, peak memory {bf16['peak_mb'] / fp32['peak_mb']:.3f}; "
        f"macro-F1 {bf16['f1']:.4f} vs {fp32['f1']:.4f} (gap {gap:+.4f})"
    )
    ok = gap <= 0.01 and (speed > 1 or not cpu_has_native_bf16())
    print("targets (faster where the CPU has native bf16, macro-F1 within 0.01):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
