"""The mobile bundle: the smallest ONNX variant within the allowed accuracy drop, with its
tokenizer, label map and ``predict.py`` (``mobile_predict.py`` here), which needs only
onnxruntime, tokenizers and numpy."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

from raybm.inference.loading import model_max_length, read_calibration
from raybm.storage.fs import write_json_file
from raybm.storage.layout import LABEL_MAP_FILE, MOBILE_DIR, ONNX_FILE, VARIANT_FILE
from raybm.storage.records import ExportManifest

if TYPE_CHECKING:
    from collections.abc import Callable

    from raybm.config import ExportConfig
    from raybm.storage.results import Results

PREDICT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mobile_predict.py")


def build_mobile(variant_dir: str, out_dir: str, manifest: dict[str, Any]) -> None:
    """The mobile bundle of the ONNX variant in ``variant_dir``, written to ``out_dir``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(variant_dir)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy2(os.path.join(variant_dir, ONNX_FILE), os.path.join(out_dir, ONNX_FILE))
    shutil.copy2(os.path.join(variant_dir, LABEL_MAP_FILE), os.path.join(out_dir, LABEL_MAP_FILE))
    tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copy2(PREDICT_SCRIPT, os.path.join(out_dir, "predict.py"))
    manifest = {
        **manifest,
        "tokenizer": {
            "max_length": model_max_length(variant_dir),
            "pad_id": tok.pad_token_id or 0,
            "pad_token": tok.pad_token or "[PAD]",
        },
        "temperature": read_calibration(variant_dir)["temperature"],
    }
    write_json_file(os.path.join(out_dir, VARIANT_FILE), manifest)


def publish_mobile(
    manifests: dict[str, ExportManifest],
    reference: dict[str, Any] | None,
    out: str,
    e: ExportConfig,
    results: Results,
    log: Callable[[str], object],
) -> str | None:
    """Copy the smallest ONNX variant within the allowed accuracy drop into mobile/."""
    candidates = [m for m in manifests.values() if m.backend == "onnx"]
    if not candidates:
        return None
    ref_acc = (reference or {}).get("accuracy")
    if ref_acc is not None:
        candidates = [m for m in candidates if m.measured.get("accuracy", -1) >= ref_acc - e.mobile_max_drop]
    if not candidates:
        log(f"no ONNX variant is within {e.mobile_max_drop:.0%} accuracy of the reference; no mobile artifact")
        return None
    best = min(candidates, key=lambda m: m.model_bytes)
    results.publish(
        os.path.join(out, MOBILE_DIR),
        lambda folder: build_mobile(
            os.path.join(out, best.variant),
            folder,
            {**best.to_json(), "variant": MOBILE_DIR, "from_variant": best.variant},
        ),
    )
    log(f"mobile artifact: {best.variant} ({best.model_bytes / 1e6:.1f} MB) -> {os.path.join(out, MOBILE_DIR)}")
    return os.path.join(out, MOBILE_DIR)
