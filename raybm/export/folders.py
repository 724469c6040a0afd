"""Model folders as export builds them: the side files every variant carries, its size on
disk, and the probe texts that check a converted model."""

from __future__ import annotations

import json
import os
import shutil

from raybm.models.catalog import code_files
from raybm.storage.layout import CALIBRATION_FILE, DRIFT_REFERENCE_FILE, LABEL_MAP_FILE, MODEL_CONFIG_FILE

# The files besides the weights that make a folder loadable (label map, raybm's config,
# transformers' config and the tokenizer's files).
SIDE_FILES = (
    LABEL_MAP_FILE,
    MODEL_CONFIG_FILE,
    CALIBRATION_FILE,
    DRIFT_REFERENCE_FILE,
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

PROBE_TEXTS = [
    "a short one",
    "a somewhat longer sentence to check the dynamic sequence axis works fine",
    "ok",
    "not bad at all, really",
    "the worst, the very worst",
]


def _code_files(folder: str) -> list[str]:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return code_files(json.load(f))
    except (OSError, ValueError):
        return []


def copy_side_files(src: str, dst: str) -> None:
    """Copy the side files of the model folder ``src`` into ``dst``, its architecture's
    code files (``raybm.models.catalog.code_files``) included."""
    os.makedirs(dst, exist_ok=True)
    for name in (*SIDE_FILES, *_code_files(src)):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def model_bytes(folder: str) -> int:
    """Bytes of the weights in a model folder (safetensors, ONNX and its external data)."""
    return sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if f.endswith((".onnx", ".safetensors", ".onnx.data"))
    )
