"""Export and compression: ``raybm export --model ... --variants ...``.

Each variant of a trained model lands in ``<storage.root>/exports/<name>/<variant>/``,
built in a staging folder and renamed into place once complete (a failed export leaves
nothing that looks finished). Every variant folder carries ``manifest.json``: source
model, method, settings, size, and (``export.measure``) its accuracy and macro-F1 on the
source dataset's test split, its agreement with the reference, and its single-sentence
latency at one thread.

Variants:
    hf          the model folder as trained (safetensors): the reference
    onnx        ONNX (dynamic batch and sequence axes); logits checked against PyTorch
    int8        PyTorch dynamic int8 (Linear layers), applied at load time from fp32 weights
    onnx-int8   ONNX Runtime dynamic int8 quantization of the ONNX model (weights stored int8)
    fp16        half-precision weights, for GPU serving
    pruned      global magnitude pruning of the encoder's Linear weights, then a short
                fine-tune on Ray Train that keeps the zeros; the sparsity reached is measured
    distilled   a student with the teacher's lowest ``export.distill_layers`` layers, trained
                on Ray Train on the teacher's soft labels plus the hard labels

``mobile/`` is then the smallest ONNX variant within ``export.mobile_max_drop`` accuracy
of the reference, with its tokenizer, label map and a ``predict.py`` that needs only
onnxruntime, tokenizers and numpy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raybm.config import JobConfig
from raybm.errors import RaybmError
from raybm.export.folders import copy_side_files, model_bytes
from raybm.export.measure import eval_split, measure
from raybm.export.mobile import publish_mobile
from raybm.export.onnx import export_onnx, quantize_onnx
from raybm.export.trained import prune_model, source_config, sparsity, train_variant
from raybm.inference.loading import load_model_folder, model_info
from raybm.inference.locate import local_model, locate_model, model_name
from raybm.storage.fs import copy_to_local, is_s3, write_json_file
from raybm.storage.layout import EXPORTS, MOBILE_DIR, MODEL_CARD_FILE, ONNX_FILE, SUMMARY_FILE, VARIANT_FILE
from raybm.storage.lease import hold_lease
from raybm.storage.model_cache import fetch_model
from raybm.storage.records import ExportManifest
from raybm.storage.results import Results

VARIANTS = ("hf", "onnx", "int8", "onnx-int8", "fp16", "pruned", "distilled")
BACKEND = {
    "hf": "torch",
    "onnx": "onnx",
    "int8": "int8",
    "onnx-int8": "onnx",
    "fp16": "torch",
    "pruned": "torch",
    "distilled": "torch",
}
TRAINED = ("pruned", "distilled")  # variants that run Ray Train


@dataclass
class ExportResult:
    """What an export made: its name and folder, each variant's manifest, the reference, the mobile bundle."""

    name: str
    folder: str
    manifests: dict[str, ExportManifest]
    reference: dict[str, Any] | None
    mobile: str | None


def check_source(model_dir: str) -> None:
    """Load the source once, so a corrupt or incomplete folder fails before anything is
    written."""
    load_model_folder(model_dir)


def run_export(
    cfg: JobConfig, model_spec: str, variants: list[str] | None = None, log: Callable[[str], None] = print
) -> ExportResult:
    """Build ``variants`` of a model under ``<root>/exports/<name>/``.

    On an S3 root the model is fetched into a temporary folder, the variants are built and
    measured there, and the finished ``exports/<name>/`` tree is uploaded (marked complete
    last). Pruned and distilled variants train on Ray Train with the job's storage, S3 too.
    """
    e = cfg.export
    variants = list(dict.fromkeys(variants or e.variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise RaybmError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    results = Results.from_config(cfg.storage)
    located = locate_model(model_spec, cfg, shared=True)
    source_uri = located if is_s3(located) else None
    if not results.remote:
        model_dir = local_model(located, cfg)
        name = model_name(located) if source_uri else model_info(model_dir)["name"]
        with hold_lease(results, EXPORTS, name, f"export {name!r}", log=log) as lease:  # one writer per export
            return _export(cfg, model_dir, variants, results, log, source_uri=source_uri, check_lease=lease.check)
    with tempfile.TemporaryDirectory(prefix="raybm-export-") as tmp:
        model_dir = located
        if source_uri:
            log(f"fetching {source_uri} ...")
            model_dir = fetch_model(source_uri, cfg.storage, os.path.join(tmp, "source"))
        local = Results(os.path.join(tmp, "out"), cfg.storage)
        done = _export(cfg, model_dir, variants, local, log, source_uri=located)
        final = results.export_dir(done.name)
        log(f"uploading {done.name} to {results.uri(final)} ...")
        with hold_lease(results, EXPORTS, done.name, f"export {done.name!r}", log=log) as lease:
            results.publish(
                final, lambda folder: shutil.copytree(done.folder, folder), local_build=True, before_publish=lease.check
            )
        return ExportResult(
            done.name,
            results.uri(final),
            done.manifests,
            done.reference,
            results.uri(results.join(final, MOBILE_DIR)) if done.mobile else None,
        )


def _export(
    cfg: JobConfig,
    model_dir: str,
    variants: list[str],
    results: Results,
    log: Callable[[str], None],
    source_uri: str | None = None,
    check_lease: Callable[[], None] = lambda: None,
) -> ExportResult:
    """Build the variants of the local ``model_dir`` under the local ``results`` root."""
    e = cfg.export
    check_source(model_dir)
    if any(v in TRAINED for v in variants):
        source_config(model_dir, cfg)  # the training data must be known before anything runs
    card = model_info(model_dir)
    # A model fetched from S3 sits in a temporary folder: its name comes from where it was.
    name = model_name(source_uri) if source_uri else card["name"]
    out = results.export_dir(name)
    os.makedirs(out, exist_ok=True)

    split = eval_split(model_dir, cfg) if e.measure else None
    texts, labels = split if split else (None, None)
    if e.measure and split is None:
        log(f"no prepared test split found for {name}; variants are timed but not scored")
    reference = None
    if e.measure:
        log(f"measuring the reference ({model_dir}) ...")
        reference = measure(model_dir, "torch", texts, labels, e.latency_samples)
        reference["model_bytes"] = model_bytes(model_dir)
    ref_pred = reference.pop("_pred", None) if reference else None

    manifests: dict[str, ExportManifest] = {}
    with tempfile.TemporaryDirectory(prefix="raybm-export-") as work:
        for v in variants:
            log(f"variant {v} ...")
            started = time.time()

            def build(folder: str, v: str = v, started: float = started) -> ExportManifest:
                settings = _build(v, model_dir, folder, work, cfg, name, out, log)
                manifest = ExportManifest(
                    variant=v,
                    backend=BACKEND[v],
                    source=source_uri or card["model"],
                    source_name=name,
                    base_model=card.get("base_model"),
                    settings=settings,
                    model_bytes=model_bytes(folder),
                    build_seconds=round(time.time() - started, 1),
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                )
                if e.measure:
                    m = measure(folder, BACKEND[v], texts, labels, e.latency_samples)
                    pred = m.pop("_pred", None)
                    if pred is not None and ref_pred is not None:
                        m["agreement_with_reference"] = float((pred == ref_pred).mean())
                    manifest.measured = m
                write_json_file(os.path.join(folder, VARIANT_FILE), manifest.to_json())
                return manifest

            # fencing: nothing is published by a job that lost its lease
            manifest = results.publish(os.path.join(out, v), build, before_publish=check_lease)
            manifests[v] = manifest
            size = manifest.model_bytes / 1e6
            extra = ""
            if "accuracy" in manifest.measured:
                mm = manifest.measured
                extra = f", accuracy {mm['accuracy']:.4f}, p50 {mm['latency_p50_ms']} ms"
            log(f"  {v}: {size:.1f} MB{extra} -> {os.path.join(out, v)}")

    mobile = publish_mobile(manifests, reference, out, e, results, log)
    summary = {
        "name": name,
        "source": source_uri or card["model"],
        "reference": reference,
        "variants": {v: m.to_json() for v, m in manifests.items()},
        "mobile": mobile,
    }
    results.write_json(os.path.join(out, SUMMARY_FILE), summary)
    return ExportResult(name, out, manifests, reference, mobile)


def _build(
    v: str, model_dir: str, staging: str, work: str, cfg: JobConfig, name: str, out: str, log: Callable[[str], None]
) -> dict:
    e = cfg.export
    if v == "hf":
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(VARIANT_FILE, ONNX_FILE))
        return {"method": "copy of the trained model (safetensors)"}
    if v == "int8":
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(VARIANT_FILE, ONNX_FILE, MODEL_CARD_FILE))
        return {
            "method": "torch.ao.quantization.quantize_dynamic on Linear layers, applied when loaded",
            "note": "weights are stored in fp32; the model is int8 in memory",
        }
    if v == "onnx":
        return {"method": "torch.onnx.export", **export_onnx(model_dir, staging, e.opset)}
    if v == "onnx-int8":
        fp32 = os.path.join(out, "onnx")
        if not os.path.isfile(os.path.join(fp32, ONNX_FILE)):
            fp32 = os.path.join(work, "onnx-fp32")
            export_onnx(model_dir, fp32, e.opset)
        return quantize_onnx(fp32, staging)
    if v == "fp16":
        model, tokenizer, _ = load_model_folder(model_dir)
        model.half().save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        copy_side_files(model_dir, staging)
        return {"method": "half-precision weights", "dtype": "float16"}
    if v == "pruned":
        base = os.path.join(work, "pruned-base")
        reached = prune_model(model_dir, base, e.prune_sparsity)
        log(f"  pruned {reached:.1%} of the encoder's Linear weights; fine-tuning {e.prune_epochs} epoch(s) ...")
        run = f"{name}-pruned{round(100 * e.prune_sparsity)}"
        trained = train_variant(
            model_dir,
            cfg,
            run,
            {
                "model": {"name": base, "keep_layers": None, "head_init": "default", "pooling": "auto"},
                "train": {
                    "strategy": "full",
                    "epochs": e.prune_epochs,
                    "lr": e.prune_lr,
                    "keep_sparsity": True,
                    "parallelism": "ddp",  # the zeros are kept on whole weight matrices
                    "early_stopping_patience": 0,
                    "distill_from": None,
                },
            },
            log,
        )
        copy_to_local(trained, cfg.storage, staging)

        after = sparsity(load_model_folder(staging)[0])
        return {
            "method": "global L1 unstructured pruning of encoder Linear weights, then fine-tuning with the zeros kept",
            "target_sparsity": e.prune_sparsity,
            "sparsity_after_pruning": reached,
            "sparsity_reached": after,
            "finetune_epochs": e.prune_epochs,
            "finetune_lr": e.prune_lr,
            "finetune_run": run,
        }
    if v == "distilled":
        run = f"{name}-distilled{e.distill_layers}"
        log(f"  training a {e.distill_layers}-layer student on the teacher's soft labels ...")
        trained = train_variant(
            model_dir,
            cfg,
            run,
            {
                "model": {
                    "name": model_dir,
                    "keep_layers": e.distill_layers,
                    "head_init": "default",
                    "pooling": "auto",
                },
                "train": {
                    "strategy": "full",
                    "epochs": e.distill_epochs,
                    "lr": e.distill_lr,
                    "distill_from": model_dir,
                    "distill_alpha": e.distill_alpha,
                    "distill_temperature": e.distill_temperature,
                    "keep_sparsity": False,
                    "early_stopping_patience": 0,
                },
            },
            log,
        )
        copy_to_local(trained, cfg.storage, staging)
        return {
            "method": "knowledge distillation into the teacher's lowest layers",
            "teacher": model_dir,
            "student_layers": e.distill_layers,
            "epochs": e.distill_epochs,
            "lr": e.distill_lr,
            "alpha": e.distill_alpha,
            "temperature": e.distill_temperature,
            "train_run": run,
        }
    raise AssertionError(v)
