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

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from raybm.config import JobConfig, build_config, merge_raw
from raybm.errors import RaybmError
from raybm.lease import hold_lease
from raybm.inference.loading import ONNX_FILE, VARIANT_FILE, load_predictor, model_card, resolve_model
from raybm.results import Results, copy_to_local, fetch_model, is_s3, resolve_uri

VARIANTS = ("hf", "onnx", "int8", "onnx-int8", "fp16", "pruned", "distilled")
BACKEND = {"hf": "torch", "onnx": "onnx", "int8": "int8", "onnx-int8": "onnx", "fp16": "torch",
           "pruned": "torch", "distilled": "torch"}
TRAINED = ("pruned", "distilled")  # variants that run Ray Train
SIDE_FILES = ("label_map.json", "raybm_config.yaml", "config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt")
ONNX_TOLERANCE = 1e-4  # fp32 ONNX logits must match PyTorch's to this relative error
MOBILE = "mobile"


@dataclass
class ExportResult:
    name: str
    folder: str
    manifests: dict[str, dict[str, Any]]
    reference: dict[str, Any] | None
    mobile: str | None


# ----------------------------------------------------------------------------- helpers


def _copy_side_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _model_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".onnx", ".safetensors", ".onnx.data")))


def check_source(model_dir: str) -> None:
    """Load the source once, so a corrupt or incomplete folder fails before anything is
    written."""
    from raybm.inference.loading import load_model_folder

    load_model_folder(model_dir)


def _logits_module(model):
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(model).eval()


PROBE_TEXTS = ["a short one", "a somewhat longer sentence to check the dynamic sequence axis works fine",
               "ok", "not bad at all, really", "the worst, the very worst"]


def export_onnx(model_dir: str, out_dir: str, opset: int = 17) -> dict[str, Any]:
    """``model.onnx`` (fp32, dynamic batch and sequence) plus side files in ``out_dir``;
    returns the largest relative error of its logits against PyTorch on probe texts."""
    import onnxruntime as ort
    import torch

    from raybm.inference.loading import load_model_folder

    model, tokenizer, _ = load_model_folder(model_dir)
    module = _logits_module(model)
    enc = tokenizer(PROBE_TEXTS[:2], padding=True, return_tensors="pt")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ONNX_FILE)
    with torch.no_grad():
        torch.onnx.export(module, (enc["input_ids"], enc["attention_mask"]), path, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True)
    _copy_side_files(model_dir, out_dir)
    # Check on a different batch and length than the one traced.
    enc = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = module(enc["input_ids"], enc["attention_mask"]).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": enc["input_ids"].numpy(),
                                   "attention_mask": enc["attention_mask"].numpy()})[0]
    rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))
    if rel > ONNX_TOLERANCE:
        raise RaybmError(f"the ONNX export disagrees with PyTorch: max relative logit error {rel:.2e} "
                         f"> {ONNX_TOLERANCE:g}")
    return {"opset": opset, "max_relative_logit_error": rel}


def quantize_onnx(fp32_dir: str, out_dir: str) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    os.makedirs(out_dir, exist_ok=True)
    quantize_dynamic(os.path.join(fp32_dir, ONNX_FILE), os.path.join(out_dir, ONNX_FILE), weight_type=QuantType.QInt8)
    _copy_side_files(fp32_dir, out_dir)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8"}


def pruning_targets(model) -> list:
    """The Linear layers of the encoder (not the classification head)."""
    import torch

    from raybm.models.build import head_modules

    head = {id(m) for hm in head_modules(model) for m in hm.modules()}
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in head]


def sparsity(model) -> float:
    targets = pruning_targets(model)
    zeros = sum(int((m.weight == 0).sum()) for m in targets)
    total = sum(m.weight.numel() for m in targets)
    return zeros / max(1, total)


def prune_model(model_dir: str, out_dir: str, amount: float) -> float:
    """Global unstructured L1 pruning of the encoder's Linear weights; saves a model folder."""
    import torch.nn.utils.prune as prune

    from raybm.inference.loading import load_model_folder

    model, tokenizer, _ = load_model_folder(model_dir)
    targets = pruning_targets(model)
    prune.global_unstructured([(m, "weight") for m in targets], pruning_method=prune.L1Unstructured, amount=amount)
    for m in targets:
        prune.remove(m, "weight")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _copy_side_files(model_dir, out_dir)
    return sparsity(model)


# Where and how fast to train is this job's business, not the source model's.
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "torch_threads", "use_gpu", "precision", "parallelism",
                 "log_every_steps")


def source_config(model_dir: str, cfg: JobConfig) -> dict[str, Any]:
    """The config the source model was trained with, on this job's storage, Ray and
    training resources."""
    import yaml

    path = os.path.join(model_dir, "raybm_config.yaml")
    if not os.path.isfile(path):
        raise RaybmError(f"{model_dir}: no raybm_config.yaml, so its training data is unknown; the pruned and "
                         f"distilled variants train on it")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    raw.pop("tune", None)
    mine = cfg.to_dict()
    raw.update(storage=mine["storage"], ray=mine["ray"])
    raw["train"] = {**(raw.get("train") or {}), **{k: mine["train"][k] for k in RESOURCE_KEYS}}
    return raw


def _train_variant(model_dir: str, cfg: JobConfig, run_name: str, overrides: dict[str, Any], log) -> str:
    """Train on Ray Train from the source config with ``overrides``; returns the model folder."""
    from raybm.train.driver import run_training

    raw = merge_raw(source_config(model_dir, cfg), {"name": run_name, **overrides})
    job = build_config(raw)
    return run_training(job, log=log).model_dir


# --------------------------------------------------------------------------- measuring


def eval_split(model_dir: str, cfg: JobConfig) -> tuple[list[str], np.ndarray] | None:
    """The test split of the dataset the model was trained on, when it is prepared here."""
    import pyarrow.parquet as pq

    from raybm.data.pipeline import dataset_name
    from raybm.data.sources import resolve_source
    from raybm.inference.loading import read_label_map

    try:
        job = build_config(source_config(model_dir, cfg))
        results = Results.from_config(job.storage)
        name = dataset_name(job, resolve_source(job.data, job.storage))
    except RaybmError:
        return None
    if name not in results.list_datasets() or results.dataset_label_map(name)["labels"] != read_label_map(model_dir):
        return None
    table = pq.read_table(results.dataset_split_dir(name, "test"), filesystem=results.fs, columns=["text", "label"])
    return table.column("text").to_pylist(), table.column("label").to_numpy()


def measure(folder: str, backend: str, texts: list[str] | None, labels: np.ndarray | None,
            latency_samples: int, threads: int = 2) -> dict[str, Any]:
    """Accuracy / macro-F1 on ``texts`` and single-sentence latency at 1 thread."""
    import torch

    from raybm.metrics import confusion_matrix, metrics_from_confusion

    out: dict[str, Any] = {}
    saved = torch.get_num_threads()
    try:
        if texts is not None:
            p = load_predictor(folder, backend, threads=threads)
            pred = p.predict(texts).argmax(-1)
            m = metrics_from_confusion(confusion_matrix(labels, pred, len(p.labels)), p.labels)
            out.update(accuracy=m["accuracy"], f1_macro=m["f1_macro"], examples=m["examples"], _pred=pred)
        sample = (texts or PROBE_TEXTS * (latency_samples // len(PROBE_TEXTS) + 1))[:latency_samples]
        p = load_predictor(folder, backend, threads=1)
        p.predict(sample[:5])  # warm-up
        times = []
        for t in sample:
            t0 = time.perf_counter()
            p.predict([t])
            times.append(time.perf_counter() - t0)
        out.update(latency_p50_ms=round(1000 * float(np.percentile(times, 50)), 2),
                   latency_p95_ms=round(1000 * float(np.percentile(times, 95)), 2), latency_threads=1)
    finally:
        torch.set_num_threads(saved)
    return out


# ----------------------------------------------------------------------------- mobile

MOBILE_EXAMPLE = '''"""Run this model without raybm: pip install onnxruntime tokenizers numpy

    python predict.py "what a lovely day" "this is awful"
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def load():
    with open(os.path.join(HERE, "label_map.json"), encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    with open(os.path.join(HERE, "manifest.json"), encoding="utf-8") as f:
        tok_settings = json.load(f)["tokenizer"]
    tokenizer = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=tok_settings["max_length"])
    tokenizer.enable_padding(pad_id=tok_settings["pad_id"], pad_token=tok_settings["pad_token"])
    session = ort.InferenceSession(os.path.join(HERE, "model.onnx"), providers=["CPUExecutionProvider"])
    return labels, tokenizer, session


def predict(texts, labels, tokenizer, session):
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [(labels[int(p.argmax())], float(p.max())) for p in probs]


if __name__ == "__main__":
    texts = sys.argv[1:] or ["what a lovely day", "this is awful"]
    for text, (label, confidence) in zip(texts, predict(texts, *load())):
        print(json.dumps({"text": text, "label": label, "confidence": round(confidence, 4)}))
'''


def build_mobile(variant_dir: str, out_dir: str, manifest: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    from raybm.inference.loading import model_max_length

    tok = AutoTokenizer.from_pretrained(variant_dir)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy2(os.path.join(variant_dir, ONNX_FILE), os.path.join(out_dir, ONNX_FILE))
    shutil.copy2(os.path.join(variant_dir, "label_map.json"), os.path.join(out_dir, "label_map.json"))
    tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "predict.py"), "w", encoding="utf-8") as f:
        f.write(MOBILE_EXAMPLE)
    manifest = {**manifest, "tokenizer": {"max_length": model_max_length(variant_dir),
                                          "pad_id": tok.pad_token_id or 0, "pad_token": tok.pad_token or "[PAD]"}}
    with open(os.path.join(out_dir, VARIANT_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


# ------------------------------------------------------------------------------- main


def run_export(cfg: JobConfig, model_spec: str, variants: list[str] | None = None,
               log: Callable[[str], None] = print) -> ExportResult:
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
    if not results.remote:
        model_dir = resolve_model(model_spec, cfg.storage.root)
        name = model_card(model_dir)["name"]
        with hold_lease(results, "exports", name, f"export {name!r}", log=log):  # one writer per export
            return _export(cfg, model_dir, variants, results, log)
    with tempfile.TemporaryDirectory(prefix="raybm-export-") as tmp:
        source_uri = remote_model(results, model_spec)
        log(f"fetching {source_uri} ...")
        model_dir = fetch_model(source_uri, cfg.storage, os.path.join(tmp, "source"))
        local = Results(os.path.join(tmp, "out"), cfg.storage)
        done = _export(cfg, model_dir, variants, local, log, source_uri=source_uri)
        final = results.export_dir(done.name)
        log(f"uploading {done.name} to {results.uri(final)} ...")
        with hold_lease(results, "exports", done.name, f"export {done.name!r}", log=log):
            results.upload_dir(done.folder, final)
        return ExportResult(done.name, results.uri(final), done.manifests, done.reference,
                            results.uri(results.join(final, MOBILE)) if done.mobile else None)


def remote_model(results: Results, spec: str) -> str:
    """The URI of a model folder in an S3 results root: an s3:// model, run or sweep folder,
    or the name of a run or sweep."""
    if is_s3(spec):
        _, base = resolve_uri(spec, results.storage)
        candidates = [base, results.join(base, "model")]
    elif "/" in spec or os.sep in spec:
        raise RaybmError(f"--model {spec!r}: with an S3 storage.root ({results.root}), give an s3:// model "
                         f"folder or the name of a run or sweep under it")
    else:
        candidates = [results.path(kind, spec, "model") for kind in ("sweeps", "runs")]
    for folder in candidates:
        if results.exists(results.join(folder, "label_map.json")):
            return f"s3://{folder}"
    raise RaybmError(f"--model {spec!r}: no model folder (with label_map.json) found as an s3:// folder or as a "
                     f"run or sweep name under {results.root}")


def uri_name(uri: str) -> str:
    """The name of the run or sweep an ``s3://`` model folder belongs to (``.../<name>/model``),
    else the folder's own name."""
    parts = uri.rstrip("/").split("/")
    return parts[-2] if parts[-1] == "model" and len(parts) > 3 else parts[-1]


def _export(cfg: JobConfig, model_dir: str, variants: list[str], results: Results, log,
            source_uri: str | None = None) -> ExportResult:
    """Build the variants of the local ``model_dir`` under the local ``results`` root."""
    e = cfg.export
    check_source(model_dir)
    if any(v in TRAINED for v in variants):
        source_config(model_dir, cfg)  # the training data must be known before anything runs
    card = model_card(model_dir)
    # A model fetched from S3 sits in a temporary folder: its name comes from where it was.
    name = uri_name(source_uri) if source_uri else card["name"]
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
        reference["model_bytes"] = _model_bytes(model_dir)
    ref_pred = reference.pop("_pred", None) if reference else None

    manifests: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="raybm-export-") as work:
        for v in variants:
            log(f"variant {v} ...")
            started = time.time()
            staging = results.staging_dir("exports", f"{name}-{v}")
            try:
                settings = _build(v, model_dir, staging, work, cfg, name, out, log)
                manifest = {"variant": v, "backend": BACKEND[v], "source": source_uri or model_dir, "source_name": name,
                            "base_model": card.get("base_model"), "settings": settings,
                            "model_bytes": _model_bytes(staging), "build_seconds": round(time.time() - started, 1),
                            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                if e.measure:
                    m = measure(staging, BACKEND[v], texts, labels, e.latency_samples)
                    pred = m.pop("_pred", None)
                    if pred is not None and ref_pred is not None:
                        m["agreement_with_reference"] = float((pred == ref_pred).mean())
                    manifest["measured"] = m
                with open(os.path.join(staging, VARIANT_FILE), "w", encoding="utf-8") as f:
                    json.dump(manifest, f, indent=2)
                results.publish(staging, os.path.join(out, v))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            manifests[v] = manifest
            size = manifest["model_bytes"] / 1e6
            extra = ""
            if "measured" in manifest and "accuracy" in manifest["measured"]:
                mm = manifest["measured"]
                extra = f", accuracy {mm['accuracy']:.4f}, p50 {mm['latency_p50_ms']} ms"
            log(f"  {v}: {size:.1f} MB{extra} -> {os.path.join(out, v)}")

    mobile = _mobile(manifests, reference, out, e, results, log)
    summary = {"name": name, "source": source_uri or model_dir, "reference": reference,
               "variants": manifests, "mobile": mobile}
    results.write_json(os.path.join(out, "summary.json"), summary)
    return ExportResult(name, out, manifests, reference, mobile)


def _build(v: str, model_dir: str, staging: str, work: str, cfg: JobConfig, name: str, out: str, log) -> dict:
    e = cfg.export
    if v == "hf":
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(VARIANT_FILE, ONNX_FILE))
        return {"method": "copy of the trained model (safetensors)"}
    if v == "int8":
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(VARIANT_FILE, ONNX_FILE, "README.md"))
        return {"method": "torch.ao.quantization.quantize_dynamic on Linear layers, applied when loaded",
                "note": "weights are stored in fp32; the model is int8 in memory"}
    if v == "onnx":
        return {"method": "torch.onnx.export", **export_onnx(model_dir, staging, e.opset)}
    if v == "onnx-int8":
        fp32 = os.path.join(out, "onnx")
        if not os.path.isfile(os.path.join(fp32, ONNX_FILE)):
            fp32 = os.path.join(work, "onnx-fp32")
            export_onnx(model_dir, fp32, e.opset)
        return quantize_onnx(fp32, staging)
    if v == "fp16":
        from raybm.inference.loading import load_model_folder

        model, tokenizer, _ = load_model_folder(model_dir)
        model.half().save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _copy_side_files(model_dir, staging)
        return {"method": "half-precision weights", "dtype": "float16"}
    if v == "pruned":
        base = os.path.join(work, "pruned-base")
        reached = prune_model(model_dir, base, e.prune_sparsity)
        log(f"  pruned {reached:.1%} of the encoder's Linear weights; fine-tuning {e.prune_epochs} epoch(s) ...")
        run = f"{name}-pruned{round(100 * e.prune_sparsity)}"
        trained = _train_variant(model_dir, cfg, run, {
            "model": {"name": base, "keep_layers": None, "head_init": "default", "pooling": "auto"},
            "train": {"strategy": "full", "epochs": e.prune_epochs, "lr": e.prune_lr, "keep_sparsity": True,
                      "parallelism": "ddp",  # the zeros are kept on whole weight matrices
                      "early_stopping_patience": 0, "distill_from": None}}, log)
        copy_to_local(trained, cfg.storage, staging)
        from raybm.inference.loading import load_model_folder

        after = sparsity(load_model_folder(staging)[0])
        return {"method": "global L1 unstructured pruning of encoder Linear weights, then fine-tuning with the "
                          "zeros kept", "target_sparsity": e.prune_sparsity, "sparsity_after_pruning": reached,
                "sparsity_reached": after, "finetune_epochs": e.prune_epochs, "finetune_lr": e.prune_lr,
                "finetune_run": run}
    if v == "distilled":
        run = f"{name}-distilled{e.distill_layers}"
        log(f"  training a {e.distill_layers}-layer student on the teacher's soft labels ...")
        trained = _train_variant(model_dir, cfg, run, {
            "model": {"name": model_dir, "keep_layers": e.distill_layers, "head_init": "default", "pooling": "auto"},
            "train": {"strategy": "full", "epochs": e.distill_epochs, "lr": e.distill_lr, "distill_from": model_dir,
                      "distill_alpha": e.distill_alpha, "distill_temperature": e.distill_temperature,
                      "keep_sparsity": False, "early_stopping_patience": 0}}, log)
        copy_to_local(trained, cfg.storage, staging)
        return {"method": "knowledge distillation into the teacher's lowest layers", "teacher": model_dir,
                "student_layers": e.distill_layers, "epochs": e.distill_epochs, "lr": e.distill_lr,
                "alpha": e.distill_alpha, "temperature": e.distill_temperature, "train_run": run}
    raise AssertionError(v)


def _mobile(manifests, reference, out, e, results, log) -> str | None:
    """Copy the smallest ONNX variant within the allowed accuracy drop into mobile/."""
    candidates = [m for v, m in manifests.items() if m["backend"] == "onnx"]
    if not candidates:
        return None
    ref_acc = (reference or {}).get("accuracy")
    if ref_acc is not None:
        candidates = [m for m in candidates if m.get("measured", {}).get("accuracy", -1) >= ref_acc - e.mobile_max_drop]
    if not candidates:
        log(f"no ONNX variant is within {e.mobile_max_drop:.0%} accuracy of the reference; no mobile artifact")
        return None
    best = min(candidates, key=lambda m: m["model_bytes"])
    staging = results.staging_dir("exports", f"{os.path.basename(out)}-{MOBILE}")
    try:
        build_mobile(os.path.join(out, best["variant"]), staging,
                     {**best, "variant": MOBILE, "from_variant": best["variant"]})
        results.publish(staging, os.path.join(out, MOBILE))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"mobile artifact: {best['variant']} ({best['model_bytes'] / 1e6:.1f} MB) -> {os.path.join(out, MOBILE)}")
    return os.path.join(out, MOBILE)
