"""Variants that train on Ray Train: pruned (global magnitude pruning, then a fine-tune that
keeps the zeros) and distilled (a student trained on the teacher's soft labels). Both train
on the data and recipe the source model was trained with."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import yaml

from raybm.config import JobConfig, build_config, merge_raw
from raybm.errors import RaybmError
from raybm.export.folders import copy_side_files
from raybm.inference.loading import load_model_folder
from raybm.storage.layout import MODEL_CONFIG_FILE
from raybm.train.driver import run_training

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn


def pruning_targets(model: nn.Module) -> list:
    """The weight matrices of the encoder (Linear layers, GPT-2's Conv1D), not the head's."""
    from raybm.models.architectures import head_modules, weight_layers

    head = {id(m) for hm in head_modules(model) for m in hm.modules()}
    return [m for m in weight_layers(model) if id(m) not in head]


def sparsity(model: nn.Module) -> float:
    """The share of zero weights in the encoder's Linear layers."""
    targets = pruning_targets(model)
    zeros = sum(int((m.weight == 0).sum()) for m in targets)
    total = sum(m.weight.numel() for m in targets)
    return zeros / max(1, total)


def prune_model(model_dir: str, out_dir: str, amount: float) -> float:
    """Global unstructured L1 pruning of the encoder's Linear weights; saves a model folder."""
    import torch.nn.utils.prune as prune

    model, tokenizer, _ = load_model_folder(model_dir)
    targets = pruning_targets(model)
    prune.global_unstructured([(m, "weight") for m in targets], pruning_method=prune.L1Unstructured, amount=amount)
    for m in targets:
        prune.remove(m, "weight")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    copy_side_files(model_dir, out_dir)
    return sparsity(model)


# Where and how fast to train is this job's business, not the source model's.
RESOURCE_KEYS = (
    "num_workers",
    "cpus_per_worker",
    "torch_threads",
    "use_gpu",
    "precision",
    "parallelism",
    "log_every_steps",
)


def source_config(model_dir: str, cfg: JobConfig) -> dict[str, Any]:
    """The config the source model was trained with, on this job's storage, Ray and
    training resources."""
    path = os.path.join(model_dir, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise RaybmError(
            f"{model_dir}: no raybm_config.yaml, so its training data is unknown; the pruned and "
            f"distilled variants train on it"
        )
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    raw.pop("tune", None)
    mine = cfg.to_dict()
    raw.update(storage=mine["storage"], ray=mine["ray"])
    raw["train"] = {**(raw.get("train") or {}), **{k: mine["train"][k] for k in RESOURCE_KEYS}}
    return raw


def train_variant(
    model_dir: str, cfg: JobConfig, run_name: str, overrides: dict[str, Any], log: Callable[[str], None]
) -> str:
    """Train on Ray Train from the source config with ``overrides``; returns the model folder."""
    raw = merge_raw(source_config(model_dir, cfg), {"name": run_name, **overrides})
    job = build_config(raw)
    return run_training(job, log=log).model_dir
