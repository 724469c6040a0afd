"""Sharded checkpoints of an FSDP run, with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards of the model and of the optimizer's tensors into its part of
the Ray Train checkpoint (``SHARDS_DIR``, one safetensors file per rank: DCP's Hugging Face
layout, so nothing in it is unpickled when read back); Ray merges the ranks' folders into one
checkpoint. Resuming reads the shards back onto any number of workers (DCP reshards), and
publishing turns them into ``model.safetensors`` (several files past 5 GB) a few tensors at a
time: no rank, and not the driver, ever holds the whole model state at once.

The optimizer's tensors (moments, step counts) are in the shards; the rest of its state (the
parameter groups' settings, any non-tensor entry) is small and goes in the training state.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from typing import TYPE_CHECKING, BinaryIO

from raybm.errors import RaybmError
from raybm.storage.layout import SHARDS_DIR, SHARDS_INDEX_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_KEY, OPTIMIZER_KEY = "model", "optim"  # the two parts of the sharded state (key prefixes in the files)
SHARD_FILE_BYTES = 2**30  # the state in each run of shard files (a rank's file: its share of that)
PUBLISH_BATCH_BYTES = 512 * 2**20  # full tensors read at once while publishing (a larger tensor: alone)
PUBLISHED_FILE_BYTES = 5 * 10**9  # a published model's weight files (Hugging Face's default shard size)
_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def save_sharded(
    folder: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    with_model: bool,
    file_bytes: int = SHARD_FILE_BYTES,
) -> dict:
    """Write this rank's shards into ``folder/SHARDS_DIR``: the optimizer's tensors, and the
    model's unless ``with_model`` is False (a LoRA run keeps its adapters whole instead). A
    collective: every rank calls it. Each rank's part is split into files of about
    ``file_bytes / ranks`` (DCP builds each file in memory before writing it). Returns what
    the training state keeps of the optimizer, and (``"files"``) every rank's file names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # a forward without backward (validation) leaves the root's weights gathered
        if isinstance(module, FSDPModule):
            module.reshard()
    optim = get_optimizer_state_dict(model, optimizer)
    tensors, rest = _split(optim["state"])
    state = {OPTIMIZER_KEY: tensors}
    if with_model:
        state[MODEL_KEY] = get_model_state_dict(model)
    writer = _listing_writer()(
        os.path.join(folder, SHARDS_DIR),
        save_distributed=True,
        fqn_to_index_mapping=_file_of_each_tensor(state, file_bytes),
    )
    dcp.save(state, storage_writer=writer)
    return {
        "param_groups": optim["param_groups"],
        "state": rest,
        "tensors": sorted([name, key] for name, entry in tensors.items() for key in entry),
        "files": writer.files,
    }


def _listing_writer():
    """DCP's Hugging Face writer that also notes, on the coordinating rank (0), the name of
    every file each rank wrote (``files``; empty on the other ranks)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    class ListingWriter(HuggingFaceStorageWriter):
        files: list[str] = []

        def finish(self, metadata, results):
            """Note every rank's files, then finish as DCP does."""
            self.files = sorted({os.path.basename(str(r.storage_data.relative_path)) for rs in results for r in rs})
            return super().finish(metadata, results)

    return ListingWriter


def _file_of_each_tensor(state: dict, file_bytes: int) -> dict[str, int]:
    """Each tensor's key as DCP flattens it -> the number of the file it goes in (from 1):
    runs of about ``file_bytes`` of whole tensors, the same on every rank."""
    sizes: dict[str, int] = {}
    for name, value in state.get(MODEL_KEY, {}).items():
        sizes[f"{MODEL_KEY}.{name}"] = value.numel() * value.element_size()
    for name, entry in state[OPTIMIZER_KEY].items():
        for key, value in entry.items():
            sizes[f"{OPTIMIZER_KEY}.{name}.{key}"] = value.numel() * value.element_size()
    out, index, total = {}, 1, 0
    for key in sorted(sizes):
        if total and total + sizes[key] > file_bytes:
            index, total = index + 1, 0
        out[key] = index
        total += sizes[key]
    return out


def write_shards_index(folder: str, files: list[str], with_model: bool) -> None:
    """Rank 0: list every rank's shard files (``save_sharded``'s ``"files"``), so that a
    checkpoint missing one reads as incomplete."""
    with open(os.path.join(folder, SHARDS_INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"files": files, "model": with_model, "format": "torch.distributed.checkpoint/safetensors"}, f)


def load_sharded(
    folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, with_model: bool
) -> None:
    """Load a sharded checkpoint's state into this rank's shards of ``model`` (when
    ``with_model``) and ``optimizer``; ``saved``: what ``save_sharded`` returned. Any number
    of ranks: DCP reads each rank's part out of whichever files hold it. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    check_shards(folder)
    optim = get_optimizer_state_dict(model, optimizer)  # state made for every parameter: the shapes to read into
    wanted: dict[str, dict] = {}
    for name, key in saved["tensors"]:
        if name not in optim["state"] or key not in optim["state"][name]:
            raise RaybmError(
                f"{folder}: the checkpoint's optimizer state has {name}.{key}, which this model's "
                f"optimizer has not; resume with the recipe that wrote it"
            )
        wanted.setdefault(name, {})[key] = optim["state"][name][key]
    state = {OPTIMIZER_KEY: wanted}
    if with_model:
        state[MODEL_KEY] = get_model_state_dict(model)
    dcp.load(state, storage_reader=HuggingFaceStorageReader(os.path.join(folder, SHARDS_DIR)))
    if with_model:
        set_model_state_dict(model, state[MODEL_KEY])
    restored = {name: dict(entry) for name, entry in state[OPTIMIZER_KEY].items()}
    for name, entry in saved["state"].items():
        restored.setdefault(name, {}).update(entry)
    set_optimizer_state_dict(model, optimizer, {"state": restored, "param_groups": saved["param_groups"]})


def _split(state: dict) -> tuple[dict, dict]:
    """An optimizer state (parameter name -> entries) as (its tensors, everything else)."""
    import torch

    tensors: dict[str, dict] = {}
    rest: dict[str, dict] = {}
    for name, entry in state.items():
        for key, value in entry.items():
            (tensors if isinstance(value, torch.Tensor) else rest).setdefault(name, {})[key] = value
    return tensors, rest


def is_sharded(folder: str) -> bool:
    """Whether a checkpoint folder holds its weights as an FSDP run's shards."""
    return os.path.isfile(os.path.join(folder, SHARDS_INDEX_FILE))


def check_shards(folder: str) -> dict:
    """A sharded checkpoint's index, once every rank's file is there; else a clear error."""
    with open(os.path.join(folder, SHARDS_INDEX_FILE), encoding="utf-8") as f:
        index = json.load(f)
    shards = os.path.join(folder, SHARDS_DIR)
    found = os.listdir(shards) if os.path.isdir(shards) else []
    if not shards_complete(index, found):
        missing = sorted(set(index.get("files") or []) - set(found))
        raise RaybmError(
            f"{folder}: an incomplete checkpoint ({len(missing)} shard file(s) missing from {SHARDS_DIR}/: "
            f"{', '.join(missing[:3])}); its upload was cut short. Delete it to resume from the one before"
        )
    return index


def shards_complete(index: dict, names: list[str]) -> bool:
    """Whether ``names`` (the files in a checkpoint's ``SHARDS_DIR``) hold every shard file
    its ``index`` lists."""
    files = index.get("files")
    return isinstance(files, list) and bool(files) and set(files) <= set(names)


def publish_sharded(
    folder: str, batch_bytes: int = PUBLISH_BATCH_BYTES, file_bytes: int = PUBLISHED_FILE_BYTES
) -> None:
    """Turn a sharded checkpoint folder into a plain model folder, in place: the model's full
    tensors, read out of the shards a batch of at most ``batch_bytes`` at a time, streamed into
    ``model.safetensors``, or, past ``file_bytes`` of weights, into files of at most that much
    (one tensor if larger) with a ``model.safetensors.index.json`` naming each tensor's file
    (Hugging Face's layout for large models). The shards and their index go. Needs no
    process group."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not check_shards(folder)["model"]:
        raise RaybmError(f"{folder}: its shards hold no model weights (a LoRA checkpoint keeps its adapters whole)")
    shards = os.path.join(folder, SHARDS_DIR)
    meta = HuggingFaceStorageReader(shards).read_metadata().state_dict_metadata
    prefix = f"{MODEL_KEY}."
    tensors = {
        key[len(prefix) :]: (tuple(m.size), m.properties.dtype)
        for key, m in sorted(meta.items())
        if key.startswith(prefix)
    }
    files = _batches(tensors, file_bytes)
    names = (
        [WEIGHTS_FILE]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    for name, in_file in zip(names, files):
        part = {t: tensors[t] for t in in_file}
        partial = os.path.join(folder, f".{name}.partial")
        with open(partial, "wb") as out:
            _write_header(out, part)
            for batch in _batches(part, batch_bytes):
                state = {f"{prefix}{t}": torch.empty(tensors[t][0], dtype=tensors[t][1]) for t in batch}
                with warnings.catch_warnings():  # that it reads in this one process: as meant
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load(state, storage_reader=HuggingFaceStorageReader(shards), no_dist=True)
                for t in batch:
                    out.write(state[f"{prefix}{t}"].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                del state
        os.replace(partial, os.path.join(folder, name))
    if len(files) > 1:  # written last: a folder with its index has every file the index names
        index = {
            "metadata": {"total_size": sum(_nbytes(*v) for v in tensors.values())},
            "weight_map": {t: name for name, in_file in zip(names, files) for t in in_file},
        }
        with open(os.path.join(folder, f".{WEIGHTS_INDEX_FILE}.partial"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        os.replace(os.path.join(folder, f".{WEIGHTS_INDEX_FILE}.partial"), os.path.join(folder, WEIGHTS_INDEX_FILE))
    drop_shards(folder)


def drop_shards(folder: str) -> None:
    """Remove a checkpoint folder's shards and their index (a published model has neither)."""
    shutil.rmtree(os.path.join(folder, SHARDS_DIR), ignore_errors=True)
    index = os.path.join(folder, SHARDS_INDEX_FILE)
    if os.path.exists(index):
        os.remove(index)


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * dtype.itemsize


def _batches(tensors: dict, batch_bytes: int) -> list[list[str]]:
    """The tensors' names in file order, in runs of at most ``batch_bytes`` (one tensor if larger)."""
    out: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in tensors.items():
        n = _nbytes(shape, dtype)
        if out[-1] and size + n > batch_bytes:
            out.append([])
            size = 0
        out[-1].append(name)
        size += n
    return [b for b in out if b]


def _write_header(out: BinaryIO, tensors: dict) -> None:
    """The safetensors header (every tensor's dtype, shape and byte range, in this order)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        kind = _SAFETENSORS_DTYPES.get(str(dtype).removeprefix("torch."))
        if kind is None:
            raise RaybmError(f"{name}: tensors of {dtype} cannot be published as safetensors")
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
