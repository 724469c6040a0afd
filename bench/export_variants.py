"""Export variants side by side: size, latency, throughput and accuracy, in one run.

    .venv/bin/python bench/export_variants.py --model results/runs/<run>/model \
        [--variants hf,onnx,int8,onnx-int8,fp16,pruned,distilled] [key=value ...]

Runs ``raybm export`` on a trained model (pruned and distilled train on Ray Train on the
model's own training data), then, for the reference and every variant, on the same test
split and machine: model file size, single-sentence latency at 1 thread (p50/p95, from the
export's manifests), batch-32 throughput at 2 threads, test accuracy and macro-F1.
Targets: the best int8 variant at least 4x faster than fp32 PyTorch at 1 thread, at most
1 accuracy point lower, at most a third of the size; the distilled student at least 2x
faster than its teacher, at most 2 points lower.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def throughput(folder: str, backend: str, texts: list[str], threads: int = 2, batch: int = 32) -> float:
    from raybm.inference.loading import load_predictor

    p = load_predictor(folder, backend, threads=threads, batch_size=batch)
    p.predict(texts[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        p.predict(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained raybm model folder (or run / sweep folder)")
    parser.add_argument("--config", help="a raybm YAML (storage.root, export.* settings)")
    parser.add_argument("--variants", default="hf,onnx,int8,onnx-int8,fp16,pruned,distilled")
    parser.add_argument("--throughput-texts", type=int, default=640)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from raybm.commands.models import format_exports
    from raybm.config import load_config
    from raybm.export.measure import eval_split
    from raybm.export.variants import BACKEND, TRAINED, run_export
    from raybm.inference.locate import local_model, locate_model

    cfg = load_config(args.config, args.overrides)
    variants = args.variants.split(",")
    if any(v in TRAINED for v in variants):
        from raybm.runtime import ensure_ray, quiet_ray_data

        ensure_ray(cfg.ray)
        quiet_ray_data()
    started = time.time()
    result = run_export(cfg, args.model, variants)
    print(f"export took {time.time() - started:.0f} s")
    model_dir = local_model(locate_model(args.model, cfg), cfg)
    split = eval_split(model_dir, cfg)
    texts = split[0][: args.throughput_texts] if split else None
    if texts is None:
        print("no prepared test split for this model: accuracy and throughput not measured")
        return 1
    ref = result.reference
    ref["throughput_b32_t2"] = throughput(model_dir, "torch", texts)
    for v, m in result.manifests.items():
        m.measured["throughput_b32_t2"] = throughput(os.path.join(result.folder, v), BACKEND[v], texts)

    print(
        f"\n{result.name}: {ref['examples']} test examples; p50/p95 one sentence at 1 thread; "
        f"throughput in batches of 32 at 2 threads"
    )
    print("| variant | size MB | accuracy | macro-F1 | agreement | p50 ms | p95 ms | sentences/s (b32, 2 thr) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("reference (fp32 PyTorch)", ref["model_bytes"], ref, 1.0)] + [
        (v, m.model_bytes, m.measured, m.measured.get("agreement_with_reference")) for v, m in result.manifests.items()
    ]
    for name, size, mm, agree in rows:
        print(
            f"| {name} | {size / 1e6:.1f} | {mm['accuracy']:.4f} | {mm['f1_macro']:.4f} | {agree:.3f} | "
            f"{mm['latency_p50_ms']:.2f} | {mm['latency_p95_ms']:.2f} | {mm['throughput_b32_t2']:.0f} |"
        )
    print()
    print(format_exports(ref, result.manifests))

    ok = True
    int8 = [v for v in ("int8", "onnx-int8") if v in result.manifests]
    if int8:
        best = min(int8, key=lambda v: result.manifests[v].measured["latency_p50_ms"])
        m = result.manifests[best]
        speed = ref["latency_p50_ms"] / m.measured["latency_p50_ms"]
        drop = ref["accuracy"] - m.measured["accuracy"]
        size = m.model_bytes / ref["model_bytes"]
        met = speed >= 4 and drop <= 0.01 and size <= 1 / 3
        ok &= met
        print(
            f"\nbest int8 ({best}): {speed:.1f}x faster at 1 thread (>= 4), accuracy {-drop:+.4f} (>= -0.01), "
            f"size {size:.2f}x (<= 0.33): {'met' if met else 'NOT met'}"
        )
    if "distilled" in result.manifests:
        m = result.manifests["distilled"]
        speed = ref["latency_p50_ms"] / m.measured["latency_p50_ms"]
        drop = ref["accuracy"] - m.measured["accuracy"]
        met = speed >= 2 and drop <= 0.02
        ok &= met
        print(
            f"distilled ({m.settings['student_layers']} layers): {speed:.1f}x faster than its teacher (>= 2), "
            f"accuracy {-drop:+.4f} (>= -0.02): {'met' if met else 'NOT met'}"
        )
    if "pruned" in result.manifests:
        s = result.manifests["pruned"].settings
        print(
            f"pruned: sparsity reached {s['sparsity_reached']:.3f} (target {s['target_sparsity']}), accuracy "
            f"{result.manifests['pruned'].measured['accuracy'] - ref['accuracy']:+.4f}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
