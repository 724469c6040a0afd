"""Run this model without raybm: pip install onnxruntime tokenizers numpy

(raybm export copies this file into the mobile bundle as predict.py.)

    python predict.py "what a lovely day" "this is awful"
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def load() -> tuple[list[str], Tokenizer, ort.InferenceSession, float]:
    """The labels, tokenizer, ONNX Runtime session and calibration temperature of the model
    beside this file."""
    with open(os.path.join(HERE, "label_map.json"), encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    with open(os.path.join(HERE, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    tok_settings = manifest["tokenizer"]
    tokenizer = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=tok_settings["max_length"])
    tokenizer.enable_padding(pad_id=tok_settings["pad_id"], pad_token=tok_settings["pad_token"])
    session = ort.InferenceSession(os.path.join(HERE, "model.onnx"), providers=["CPUExecutionProvider"])
    return labels, tokenizer, session, float(manifest.get("temperature", 1.0))


def predict(
    texts: list[str], labels: list[str], tokenizer: Tokenizer, session: ort.InferenceSession, temperature: float = 1.0
) -> list[tuple[str, float]]:
    """(label, calibrated confidence) for each text."""
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0] / temperature
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [(labels[int(p.argmax())], float(p.max())) for p in probs]


if __name__ == "__main__":
    texts = sys.argv[1:] or ["what a lovely day", "this is awful"]
    for text, (label, confidence) in zip(texts, predict(texts, *load())):
        print(json.dumps({"text": text, "label": label, "confidence": round(confidence, 4)}))
