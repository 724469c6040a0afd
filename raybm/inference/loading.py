"""Loading a model folder for prediction, with a choice of backend, and what it is.

``load_predictor(model_dir, backend, threads)`` returns a ``Predictor``: texts in, class
probabilities out. It is what the Serve deployment, the dashboard and the benchmarks run,
so they all see the same numbers. Backends:

- ``torch``: the saved safetensors weights in fp32 (fp16 on a GPU when asked);
- ``int8``: the same model with PyTorch dynamic int8 quantization of its Linear layers,
  applied at load time (CPU only);
- ``onnx``: ONNX Runtime over the folder's ``model.onnx`` (an export variant: fp32, or
  int8 when the export quantized it);
- ``auto``: what the folder is: ``onnx`` for an ONNX variant, ``int8`` for the int8
  variant, else ``torch``.

``model_info(model_dir)`` says what a model folder holds: base model, labels, the run or
sweep it came from and that run's test metrics, for ``GET /metadata`` and the dashboard.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.metrics import softmax
from raybm.runtime import quiet_tokenizers
from raybm.storage.fs import resolve_uri
from raybm.storage.layout import (
    CALIBRATION_FILE,
    DRIFT_REFERENCE_FILE,
    EXPORTS,
    LABEL_MAP_FILE,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    RUNS,
    SWEEPS,
    VARIANT_FILE,
    WEIGHTS_FILE,
    WINNER_FILE,
    weight_files,
)
from raybm.storage.records import ExportManifest, RunRecord, Winner

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    from torch import nn
    from transformers import BatchEncoding, PreTrainedTokenizerBase

BACKENDS = ("auto", "torch", "int8", "onnx")


def read_label_map(model_dir: str, storage: StorageConfig | None = None) -> list[str]:
    """The labels of a model folder, local or (with ``storage``) ``s3://``."""
    if model_dir.startswith("s3://"):
        fs, path = resolve_uri(model_dir, storage or StorageConfig())
        try:
            with fs.open_input_stream(f"{path}/label_map.json") as f:
                return list(json.loads(f.read())["labels"])
        except FileNotFoundError:
            raise RaybmError(f"{model_dir}: not a raybm model folder (no label_map.json)") from None
    path = os.path.join(model_dir, LABEL_MAP_FILE)
    if not os.path.isfile(path):
        raise RaybmError(f"{model_dir}: not a raybm model folder (no label_map.json)")
    with open(path, encoding="utf-8") as f:
        return list(json.load(f)["labels"])


def read_calibration(model_dir: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """A model folder's calibration (local or, with ``storage``, ``s3://``): the temperature
    its logits are divided by before the softmax, and what it was fitted on; a temperature of
    1 (the model's own confidences) for a folder without one."""
    try:
        if model_dir.startswith("s3://"):
            fs, path = resolve_uri(model_dir, storage or StorageConfig())
            with fs.open_input_stream(f"{path}/{CALIBRATION_FILE}") as f:
                found = json.loads(f.read())
        else:
            with open(os.path.join(model_dir, CALIBRATION_FILE), encoding="utf-8") as f:
                found = json.load(f)
    except FileNotFoundError:
        return {"temperature": 1.0}
    temperature = found.get("temperature")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < 1e3:
        raise RaybmError(f"{model_dir}: {CALIBRATION_FILE} holds no usable temperature ({temperature!r})")
    return found


def load_model_folder(model_dir: str) -> tuple[nn.Module, PreTrainedTokenizerBase, list[str]]:
    """(model in eval mode, tokenizer, labels) from a raybm model folder. Safetensors only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raybm.models.build import with_pad_token
    from raybm.models.registry import prepare_transformers

    prepare_transformers()  # raybm's own architectures load like any other

    labels = read_label_map(model_dir)
    if weight_files(model_dir) is None:
        raise RaybmError(f"{model_dir}: no model.safetensors (raybm loads safetensors weights only)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(model_dir), model_dir)
    except Exception as e:  # noqa: BLE001 - safetensors and transformers raise many kinds on a bad folder
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise RaybmError(
            f"{model_dir}: cannot load the model ({type(e).__name__}: {first}); the folder is "
            f"incomplete or corrupt, retrain or copy it again"
        ) from None
    model.eval()
    return model, tokenizer, labels


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: str | list[str], **kwargs: Any) -> BatchEncoding:
    """``tokenizer(texts, **kwargs)`` under the tokenizer's own lock. A fast tokenizer keeps
    its truncation and padding settings in its Rust backend and each call resets them, so
    two threads calling one tokenizer with different settings (a replica's batches, its
    explanations, its watcher) corrupt each other's answers; one call at a time does not
    (a process holds one model's tokenizer, and a call takes well under a model call)."""
    with _TOKENIZE_LOCK:
        return tokenizer(texts, **kwargs)


_TOKENIZE_LOCK = threading.Lock()

# The share of a model call's tokens that may be padding: measured on 2 CPU cores (MiniLM,
# 1 thread; BENCHMARKS.md), groups cut at 0.2 ran random batches of 16-32 texts 1.3-1.5x
# faster than one padded batch on PyTorch fp32 and ONNX int8 alike, and no slower at 1-4.
PAD_WASTE = 0.2


def length_groups(lengths: np.ndarray, batch_size: int, max_waste: float = PAD_WASTE) -> list[np.ndarray]:
    """The rows of texts of these token ``lengths`` cut into model calls: fewest tokens first,
    at most ``batch_size`` rows a call, and a call ends before a longer row would make more
    than ``max_waste`` of its padded tokens padding."""
    groups: list[np.ndarray] = []
    order = np.argsort(lengths, kind="stable")
    start, tokens = 0, 0
    for i, j in enumerate(order):
        rows, width = i - start + 1, int(lengths[j])
        if i > start and (rows > batch_size or rows * width - (tokens + width) > max_waste * rows * width):
            groups.append(order[start:i])
            start, tokens = i, 0
        tokens += width
    groups.append(order[start:])
    return groups


class TextClassifier:
    """What every loaded model does: ``predict(texts)`` through its ``probabilities`` of
    tokenized rows (``Predictor`` on PyTorch, ``OnnxPredictor`` on ONNX Runtime)."""

    tokenizer: Any
    labels: list[str]
    max_length: int
    batch_size: int

    def predict(self, texts: list[str]) -> np.ndarray:
        """Class probabilities (calibrated: the logits over the model's temperature), one row per
        text, in order. The texts run in groups of about one length, fewest tokens first (at
        most ``batch_size`` a group, each padded to its own longest text by at most
        ``PAD_WASTE`` of its tokens): a batch of tweets with one long review would otherwise
        pad them all to the review, and on a CPU padding costs what it pads."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        if len(texts) == 1:
            enc = tokenize(self.tokenizer, texts, truncation=True, max_length=self.max_length, return_tensors="np")
            return self.probabilities(enc["input_ids"], enc["attention_mask"])
        ids = tokenize(self.tokenizer, texts, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = np.array([len(x) for x in ids])
        probs: np.ndarray = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        pad_id = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for rows in length_groups(lengths, self.batch_size):
            width = int(lengths[rows].max())
            input_ids: np.ndarray = np.full((len(rows), width), pad_id, dtype=np.int64)
            mask: np.ndarray = np.zeros((len(rows), width), dtype=np.int64)
            for r, j in enumerate(rows):
                span = slice(width - lengths[j], width) if left else slice(0, lengths[j])
                input_ids[r, span], mask[r, span] = ids[j], 1
            probs[rows] = self.probabilities(input_ids, mask)
        return probs

    def probabilities(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of tokenized rows."""
        raise NotImplementedError


@dataclass
class Predictor(TextClassifier):
    """A loaded model: ``predict(texts)`` gives one row of class probabilities per text."""

    model: Any
    tokenizer: Any
    labels: list[str]
    backend: str
    max_length: int = 128
    batch_size: int = 64
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0  # the model's calibration (read_calibration)

    def probabilities(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of tokenized rows (the explainer perturbs these)."""
        import torch

        with torch.inference_mode():
            logits = self.model(
                input_ids=torch.as_tensor(input_ids, dtype=torch.long).to(self.device),
                attention_mask=torch.as_tensor(attention_mask, dtype=torch.long).to(self.device),
            ).logits
            return torch.softmax(logits.float() / self.temperature, dim=-1).cpu().numpy()


def model_max_length(model_dir: str, default: int = 128) -> int:
    """The ``data.max_length`` the model was trained with (from its raybm_config.yaml)."""
    path = os.path.join(model_dir, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    return int((raw.get("data") or {}).get("max_length") or default)


@dataclass
class OnnxPredictor(TextClassifier):
    """ONNX Runtime over a variant folder's model.onnx; same interface as ``Predictor``."""

    session: Any
    tokenizer: Any
    labels: list[str]
    backend: str = "onnx"
    max_length: int = 128
    batch_size: int = 64
    device: str = "cpu"
    temperature: float = 1.0  # the model's calibration (read_calibration)

    def probabilities(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of tokenized rows (the explainer perturbs these)."""
        logits = self.session.run(
            ["logits"],
            {
                "input_ids": np.asarray(input_ids, dtype=np.int64),
                "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            },
        )[0]
        return softmax(logits, self.temperature).astype(np.float32)


def variant_manifest(model_dir: str) -> ExportManifest | None:
    """The ``manifest.json`` of an export variant folder, or None for a trained model folder."""
    path = os.path.join(model_dir, VARIANT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return ExportManifest.from_json(json.load(f), path)


def auto_backend(model_dir: str) -> str:
    """The backend a model folder is for: ``onnx``, ``int8`` or ``torch``."""
    manifest = variant_manifest(model_dir)
    if manifest is not None and manifest.backend in BACKENDS[1:]:
        return manifest.backend
    if os.path.isfile(os.path.join(model_dir, ONNX_FILE)) and weight_files(model_dir) is None:
        return "onnx"
    return "torch"


def check_model_files(model_dir: str, backend: str = "auto") -> str:
    """Raise a clear error unless ``model_dir`` holds what ``backend`` loads; returns the
    resolved backend."""
    read_label_map(model_dir)
    if backend == "auto":
        backend = auto_backend(model_dir)
    needed = ONNX_FILE if backend == "onnx" else WEIGHTS_FILE
    if not (os.path.isfile(os.path.join(model_dir, ONNX_FILE)) if backend == "onnx" else weight_files(model_dir)):
        hint = (
            "make one with raybm export --variants onnx"
            if backend == "onnx"
            else "raybm loads safetensors weights only"
        )
        raise RaybmError(f"{model_dir}: no {needed} for backend {backend} ({hint})")
    return backend


def load_onnx(
    model_dir: str, threads: int | None = None, max_length: int | None = None, batch_size: int = 64
) -> OnnxPredictor:
    """An ONNX Runtime predictor over the folder's ``model.onnx``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RaybmError(
            "the onnx backend needs onnxruntime, which comes with raybm's serve and export extras: "
            "pip install 'raybm[serve]'"
        ) from None
    from transformers import AutoTokenizer

    from raybm.models.build import with_pad_token
    from raybm.models.registry import prepare_transformers

    prepare_transformers()  # raybm's config types

    labels = read_label_map(model_dir)
    path = os.path.join(model_dir, ONNX_FILE)
    if not os.path.isfile(path):
        raise RaybmError(f"{model_dir}: no {ONNX_FILE}; make one with raybm export --variants onnx")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        tokenizer = with_pad_token(AutoTokenizer.from_pretrained(model_dir), model_dir)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RaybmError(f"{model_dir}: cannot load {ONNX_FILE}: {str(e).splitlines()[0]}") from None
    return OnnxPredictor(
        session=session,
        tokenizer=tokenizer,
        labels=labels,
        max_length=max_length or model_max_length(model_dir),
        batch_size=batch_size,
        temperature=read_calibration(model_dir)["temperature"],
    )


def load_predictor(
    model_dir: str,
    backend: str = "torch",
    threads: int | None = None,
    max_length: int | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> TextClassifier:
    """Load a raybm model folder for prediction with the given backend."""
    import torch

    if backend not in BACKENDS:
        raise RaybmError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = auto_backend(model_dir)
    if backend == "onnx":
        if device != "cpu":
            raise RaybmError("raybm runs ONNX models on CPU; use backend torch on a GPU")
        return load_onnx(model_dir, threads, max_length, batch_size)
    if threads:
        torch.set_num_threads(threads)
    quiet_tokenizers()
    model, tokenizer, labels = load_model_folder(model_dir)
    if backend == "int8":
        if device != "cpu":
            raise RaybmError("the int8 backend runs on CPU only; use backend torch on a GPU")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif device != "cpu":
        model = model.to(device)
        if device.startswith("cuda"):
            model = model.half()
    model.eval()
    return Predictor(
        model=model,
        tokenizer=tokenizer,
        labels=labels,
        backend=backend,
        max_length=max_length or model_max_length(model_dir),
        batch_size=batch_size,
        device=device,
        temperature=read_calibration(model_dir)["temperature"],
    )


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_info(model_dir: str, source: str | None = None, storage: Any = None) -> dict[str, Any]:
    """What a model folder is: name, base model, labels, the run or sweep it came from and
    its test metrics. ``source``: where the folder was fetched from (an ``s3://`` URI), when
    ``model_dir`` is a local copy; the run's or sweep's records are read there. Locations
    are given relative to the results root (``runs/<run>/model``), never as local paths."""
    labels = read_label_map(model_dir)
    card: dict[str, Any] = {
        "labels": labels,
        "base_model": None,
        "dataset": None,
        "source": None,
        "source_kind": None,
        "test_metrics": None,
        "calibration": read_calibration(model_dir),
        "drift_reference": _read_json(os.path.join(model_dir, DRIFT_REFERENCE_FILE))
        if os.path.isfile(os.path.join(model_dir, DRIFT_REFERENCE_FILE))
        else None,
    }
    cfg_path = os.path.join(model_dir, MODEL_CONFIG_FILE)
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        card["base_model"] = (raw.get("model") or {}).get("name")
        card["dataset"] = shown_source((raw.get("data") or {}).get("source"))
    if source and source.startswith("s3://"):
        fs, path = resolve_uri(source, storage or StorageConfig())
    else:
        fs, path = None, os.path.abspath(source or model_dir)
    parts = path.rstrip("/").split("/")
    parent = "/".join(parts[:-1])
    for file, kind, key, record_type in (
        (WINNER_FILE, "sweep", SWEEPS, Winner),
        (METRICS_FILE, "run", RUNS, RunRecord),
    ):
        raw = _read_record(fs, f"{parent}/{file}")
        if raw is not None:  # <root>/sweeps/<sweep>/model or <root>/runs/<run>/model
            record = record_type.from_json(raw, f"{parent}/{file}")
            card.update(source=f"{key}/{parts[-2]}", source_kind=kind, test_metrics=record.test)
            if isinstance(record, Winner):
                card["winner"] = record.summary
            break
    if card["source"]:
        card["name"], card["model"] = parts[-2], f"{card['source']}/{parts[-1]}"
    elif len(parts) >= 3 and parts[-3] == EXPORTS:  # <root>/exports/<export>/<variant>
        card["name"], card["model"] = parts[-1], "/".join(parts[-3:])
    else:
        card["name"] = card["model"] = parts[-1]
    return card


def shown_source(source: Any) -> str | None:
    """A ``data.source`` as a model's card shows it to anyone who asks (``/metadata``): a
    built-in corpus by name, an ``s3://`` URI without any user part, a local file by its
    name only (the machine's folders are nobody's business)."""
    if not source:
        return None
    source = str(source)
    if "://" in source:
        scheme, _, rest = source.partition("://")
        location = rest.split("/", 1)
        host = location[0].rsplit("@", 1)[-1]
        return f"{scheme}://{host}" + (f"/{location[1]}" if len(location) > 1 else "")
    return os.path.basename(source.rstrip("/").rstrip(os.sep)) or source


def _read_record(fs: pafs.FileSystem | None, path: str) -> dict[str, Any] | None:
    """A run's or sweep's JSON record on ``fs`` (None: a local path), or None if absent."""
    if fs is None:
        return _read_json(path) if os.path.isfile(path) else None
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
