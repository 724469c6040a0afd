"""Checkpoints as the training workers write and read them: a loadable model folder plus
the training state, first written to a worker's own scratch folder on its node."""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING

from raybm.config import JobConfig, load_config
from raybm.local_paths import private_temp_dir
from raybm.models.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from raybm.storage.layout import (
    CALIBRATION_FILE,
    DRIFT_REFERENCE_FILE,
    EPOCH_METRICS_FILE,
    LABEL_MAP_FILE,
    MODEL_CARD_FILE,
    MODEL_CONFIG_FILE,
    SHARDS_INDEX_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
)
from raybm.train.sharded import drop_shards, is_sharded, publish_sharded

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

# What a usable checkpoint holds. A checkpoint folder whose upload a lost node or a stopped
# job cut short has only some of its files (S3 writes each file whole, in any order); the
# epoch's validation metrics inside it are what sweeps rank checkpoints by. Its weights are
# one of CHECKPOINT_WEIGHTS: the whole model's, a LoRA run's adapters and head, or an FSDP
# run's shards (their index says how many files; raybm.train.sharded.check_shards).
CHECKPOINT_FILES = ("config.json", LABEL_MAP_FILE, "tokenizer_config.json", EPOCH_METRICS_FILE)
CHECKPOINT_WEIGHTS = (WEIGHTS_FILE, ADAPTER_WEIGHTS_FILE, SHARDS_INDEX_FILE)


def save_checkpoint(
    folder: str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: JobConfig,
    labels: list[str],
    state: dict,
    metrics: dict,
    weights: dict | None = None,
    drift_reference: dict | None = None,
    adapter_keys: dict[str, str] | None = None,
    sharded: bool = False,
) -> None:
    """Write a checkpoint into ``folder``: a loadable model folder (weights, tokenizer, label
    map, the job config) plus the training state and the epoch's metrics. Under LoRA the
    weights are the adapters' and the head's only (``as_model_folder`` merges them).
    ``weights``: a LoRA FSDP run's adapters gathered whole, with ``adapter_keys``
    (``raybm.models.lora.adapter_keys``). ``sharded``: the weights are the ranks' shards,
    already written (``raybm.train.sharded``); only the model's config goes here."""
    import torch

    from raybm.models.lora import is_lora, save_adapter_weights

    if sharded:
        model.config.save_pretrained(folder)
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
    if is_lora(model) and weights is not None and adapter_keys is not None:
        save_adapter_weights(folder, weights, adapter_keys)  # PEFT's own filter loses the adapters here
    if is_lora(model):
        model.get_base_model().config.save_pretrained(folder)
        _remove(folder, MODEL_CARD_FILE)  # PEFT's card of the adapters: a published model gets raybm's
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, LABEL_MAP_FILE), "w", encoding="utf-8") as f:
        json.dump({"labels": labels, "label_to_id": {lab: i for i, lab in enumerate(labels)}}, f, indent=2)
    with open(os.path.join(folder, MODEL_CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(cfg.to_yaml())
    if "val_temperature" in metrics:  # fitted on this epoch's validation logits (train.scoring.validate)
        with open(os.path.join(folder, CALIBRATION_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "temperature": metrics["val_temperature"],
                    "ece": metrics["val_ece"],
                    "ece_calibrated": metrics["val_ece_calibrated"],
                    "fitted_on": "validation",
                    "examples": metrics["val_examples"],
                    "epoch": metrics["epoch"],
                },
                f,
                indent=2,
            )
    if drift_reference is not None:  # what a served model's traffic is compared with (raybm.serve.watch)
        with open(os.path.join(folder, DRIFT_REFERENCE_FILE), "w", encoding="utf-8") as f:
            json.dump(drift_reference, f, indent=2)
    torch.save(state, os.path.join(folder, TRAIN_STATE_FILE))
    with open(os.path.join(folder, EPOCH_METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)


def load_weights(folder: str, model: nn.Module) -> None:
    """Load a checkpoint's weights into ``model`` (unwrapped; a PEFT model for a LoRA
    checkpoint). A sharded checkpoint's go into the sharded model instead
    (``raybm.train.sharded.load_sharded``): nothing here."""
    from safetensors.torch import load_file

    from raybm.models.lora import load_adapter

    if os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_FILE)):
        load_adapter(folder, model)
        return
    if is_sharded(folder):
        return
    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)), strict=False)


def as_model_folder(folder: str) -> str:
    """Make a checkpoint folder on local disk a plain model folder, in place: a LoRA
    checkpoint gets the base model with its adapters merged (the adapter files go), an FSDP
    checkpoint its weights out of the shards (the shards go); any other is one already.
    Returns ``folder``."""
    if is_sharded(folder) and not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_FILE)):
        publish_sharded(folder)
        return folder
    if is_sharded(folder):  # LoRA under FSDP: the shards are the optimizer's only
        drop_shards(folder)
    if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_FILE)):
        return folder
    # Only now: these import torch and transformers, seconds a driver otherwise never spends.
    from raybm.models.build import build_classifier, local_model
    from raybm.models.lora import add_lora, load_adapter, merged

    cfg = load_config(os.path.join(folder, MODEL_CONFIG_FILE))
    with open(os.path.join(folder, LABEL_MAP_FILE), encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    model = add_lora(build_classifier(local_model(cfg.model, cfg.storage), labels, seed=cfg.train.seed), cfg.train)
    load_adapter(folder, model)
    merged(model).save_pretrained(folder, safe_serialization=True)
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, MODEL_CARD_FILE):
        _remove(folder, name)
    return folder


def _remove(folder: str, name: str) -> None:
    path = os.path.join(folder, name)
    if os.path.exists(path):
        os.remove(path)


def load_checkpoint(folder: str, model: nn.Module) -> dict:
    """Load the weights into ``model`` (None: only the training state is wanted); return the
    training state (optimizer, epoch ...)."""
    import torch

    if model is not None:
        load_weights(folder, model)
    return torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True)


def checkpoint_scratch(root: str | None = None) -> str:
    """This worker's own folder for local checkpoint copies (under ``root``, by default the
    node's temp folder). Folders of workers that died on this node (killed, so no clean-up
    of their own ran) are removed first."""
    root = root or private_temp_dir("checkpoints")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.isdigit() and int(name) != os.getpid() and not _process_alive(int(name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    mine = os.path.join(root, str(os.getpid()))
    os.makedirs(mine, exist_ok=True)
    return mine


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
