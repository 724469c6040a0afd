"""QLoRA's base model: a pretrained classifier whose frozen weights are held in 4 bits
(NF4, with bitsandbytes) on a GPU, ready for LoRA adapters to train on top of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raybm.errors import RaybmError
from raybm.models.build import classifier_config, init_head, resolve_model_source, resolve_pooling

if TYPE_CHECKING:
    import torch

    from raybm.config import ModelConfig


def quantized_classifier(
    model_cfg: ModelConfig, labels: list[str], device: torch.device, seed: int, gradient_checkpointing: bool
) -> torch.nn.Module:
    """The pretrained classifier for ``labels`` with its base weights in NF4 (double
    quantization, bf16 compute) on ``device`` (a GPU), prepared for k-bit training by PEFT:
    norms and the head in fp32, gradients reaching the adapters through the frozen base,
    and activation checkpointing when asked."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    if device.type != "cuda":
        raise RaybmError("train.quantize_base needs a GPU worker (bitsandbytes' 4-bit kernels are CUDA's)")
    torch.manual_seed(seed)
    config, has_weights = classifier_config(model_cfg, labels)
    if not has_weights or resolve_pooling(model_cfg) == "mean":
        raise RaybmError(
            f"train.quantize_base: {model_cfg.name} is not a pretrained transformer loaded whole "
            f"(a built-in tiny or baseline model, or mean pooling); use quantize_base=none"
        )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_source(model_cfg.name),
        config=config,
        quantization_config=quantization,
        device_map={"": device.index or 0},
        trust_remote_code=model_cfg.trust_remote_code,
    )
    init_head(model, model_cfg)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
