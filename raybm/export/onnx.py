"""ONNX variants: the model traced to ONNX with its logits checked against PyTorch, and
ONNX Runtime's dynamic int8 quantization of it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from raybm.errors import RaybmError
from raybm.export.folders import PROBE_TEXTS, copy_side_files
from raybm.inference.loading import load_model_folder
from raybm.storage.layout import ONNX_FILE

ONNX_TOLERANCE = 1e-4  # fp32 ONNX logits must match PyTorch's to this relative error


def _logits_module(model):
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(model).eval()


def export_onnx(model_dir: str, out_dir: str, opset: int = 17) -> dict[str, Any]:
    """``model.onnx`` (fp32, dynamic batch and sequence) plus side files in ``out_dir``;
    returns the largest relative error of its logits against PyTorch on probe texts."""
    import onnxruntime as ort
    import torch

    model, tokenizer, _ = load_model_folder(model_dir)
    module = _logits_module(model)
    enc = tokenizer(PROBE_TEXTS[:2], padding=True, return_tensors="pt")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ONNX_FILE)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (enc["input_ids"], enc["attention_mask"]),
            path,
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=opset,
            do_constant_folding=True,
        )
    copy_side_files(model_dir, out_dir)
    # Check on a different batch and length than the one traced.
    enc = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = module(enc["input_ids"], enc["attention_mask"]).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(
        ["logits"], {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    )[0]
    rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))
    if rel > ONNX_TOLERANCE:
        raise RaybmError(
            f"the ONNX export disagrees with PyTorch: max relative logit error {rel:.2e} > {ONNX_TOLERANCE:g}"
        )
    return {"opset": opset, "max_relative_logit_error": rel}


def quantize_onnx(fp32_dir: str, out_dir: str) -> dict[str, Any]:
    """The ONNX model of ``fp32_dir`` with int8 weights (ONNX Runtime dynamic quantization) in ``out_dir``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    os.makedirs(out_dir, exist_ok=True)
    quantize_dynamic(os.path.join(fp32_dir, ONNX_FILE), os.path.join(out_dir, ONNX_FILE), weight_type=QuantType.QInt8)
    copy_side_files(fp32_dir, out_dir)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8"}
