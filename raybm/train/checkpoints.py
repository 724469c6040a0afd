"""Checkpoints as the training workers write and read them: a loadable model folder plus
the training state, first written to a worker's own scratch folder on its node."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from raybm.config import JobConfig
from raybm.results import EPOCH_METRICS_FILE, LABEL_MAP_FILE, MODEL_CONFIG_FILE, TRAIN_STATE_FILE, WEIGHTS_FILE

# What a usable checkpoint holds. A checkpoint folder whose upload a lost node or a stopped
# job cut short has only some of its files (S3 writes each file whole, in any order); the
# epoch's validation metrics inside it are what sweeps rank checkpoints by.
CHECKPOINT_FILES = (WEIGHTS_FILE, "config.json", LABEL_MAP_FILE, "tokenizer_config.json", EPOCH_METRICS_FILE)


def save_checkpoint(folder: str, model, tokenizer, cfg: JobConfig, labels: list[str], state: dict,
                     metrics: dict, weights: dict | None = None) -> None:
    """Write a checkpoint into ``folder``: a loadable model folder (weights, tokenizer, label
    map, the job config) plus the training state and the epoch's metrics."""
    import torch

    model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, LABEL_MAP_FILE), "w", encoding="utf-8") as f:
        json.dump({"labels": labels, "label_to_id": {lab: i for i, lab in enumerate(labels)}}, f, indent=2)
    with open(os.path.join(folder, MODEL_CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(cfg.to_yaml())
    torch.save(state, os.path.join(folder, TRAIN_STATE_FILE))
    with open(os.path.join(folder, EPOCH_METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)


def load_weights(folder: str, model) -> None:
    """Load a checkpoint's weights into ``model`` (unwrapped)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)), strict=False)


def load_checkpoint(folder: str, model) -> dict:
    """Load the weights into ``model``; return the training state (optimizer, epoch ...)."""
    import torch

    load_weights(folder, model)
    return torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True)


def checkpoint_scratch(root: str | None = None) -> str:
    """This worker's own folder for local checkpoint copies (under ``root``, by default the
    node's temp folder). Folders of workers that died on this node (killed, so no clean-up
    of their own ran) are removed first."""
    root = root or os.path.join(tempfile.gettempdir(), "raybm-checkpoints")
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
