"""An FSDP model's pretrained weights with no whole copy anywhere: every rank (rank 0 too)
builds the model's skeleton (parameters on the meta device, buffers real), shards it, and
rank 0 streams the weights out of the model folder's safetensors files (one or many) a
batch at a time, each rank keeping its own shards (``broadcast_from_rank0``). Parameters the
files lack (a new head, LoRA adapters) are initialised on rank 0 one small module at a time
and streamed the same way. Rank 0's peak while loading: one batch, not the model.

Used when the files fit the model (``stream_plan``); otherwise rank 0 builds the whole
model and broadcasts it (``raybm.train.fsdp.wrap_fsdp``), as before.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raybm.errors import RaybmError

if TYPE_CHECKING:
    from torch import nn

STREAM_BATCH_BYTES = 512 * 2**20  # tensors rank 0 holds at a time while streaming
MAX_MISSING_SHARE = 0.05  # of the parameters the files may lack (a head, adapters); more: not this model's files


@dataclass
class StreamPlan:
    """Where each of a model's state entries comes from."""

    from_files: dict[str, tuple[str, str]]  # model key -> (file, key in that file)
    missing: list[str]  # parameters no file holds: initialised on rank 0


def plain_key(model_key: str) -> str:
    """A state key of the model as it trains -> the key of the same tensor in the plain model
    (PEFT's wrappers taken off: its prefix, ``base_layer``, a saved module's copies)."""
    key = model_key.removeprefix("base_model.model.")
    for wrapper in (".base_layer", ".modules_to_save.default", ".original_module"):
        key = key.replace(wrapper, "")
    return key


def stream_plan(model: nn.Module, files: list[str]) -> StreamPlan | None:
    """Which file holds each state entry of ``model`` (its skeleton), and which parameters
    none does; None when the files lack more than ``MAX_MISSING_SHARE`` of the parameters
    (they are not this model's weights under names raybm can map)."""
    from safetensors import safe_open

    held: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            held.update(dict.fromkeys(f.keys(), path))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "") or ""
    params = dict(model.named_parameters())
    from_files, missing = {}, []
    for key in model.state_dict():
        plain = plain_key(key)
        candidates = [plain, f"{prefix}.{plain}", plain.removeprefix(f"{prefix}.")] if prefix else [plain]
        hit = next((c for c in candidates if c in held), None)
        if hit is not None and "lora_" not in key:
            from_files[key] = (held[hit], hit)
        elif key in params:
            missing.append(key)
    total = sum(p.numel() for p in params.values())
    if sum(params[k].numel() for k in missing) > MAX_MISSING_SHARE * total:
        return None
    return StreamPlan(from_files, missing)


def init_missing(model: nn.Module, missing: list[str], seed: int) -> dict:
    """Rank 0: values for the parameters no file holds, each owning module built alone in
    host memory and initialised as its model does (PEFT's LoRA init for adapters, the
    model's own ``_init_weights`` otherwise)."""
    import torch

    torch.manual_seed(seed)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    owners: dict[str, list[str]] = {}
    for key in missing:
        owners.setdefault(_owner(model, key), []).append(key)
    out = {}
    for owner, keys in owners.items():
        module = copy.deepcopy(model.get_submodule(owner) if owner else model)
        module.to_empty(device="cpu")
        if hasattr(module, "reset_lora_parameters"):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, model.peft_config[adapter].init_lora_weights)
        else:
            with torch.no_grad():
                for sub in module.modules():
                    if hasattr(base, "_init_weights"):
                        base._init_weights(sub)
                    elif hasattr(sub, "reset_parameters"):
                        sub.reset_parameters()
        state = module.state_dict()
        for key in keys:
            out[key] = state[key[len(owner) + 1 :] if owner else key].detach().clone()
        del module
    return out


def _owner(model: nn.Module, key: str) -> str:
    """The module whose init sets ``key``: its nearest LoRA layer, else the module holding it."""
    parts = key.split(".")[:-1]
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if hasattr(model.get_submodule(name), "reset_lora_parameters"):
            return name
    return ".".join(parts)


def stream_weights(model: nn.Module, plan: StreamPlan, initial: dict, dtypes: dict, extra: dict | None = None) -> None:
    """Fill a sharded, materialised model from rank 0: the files' tensors by ``plan``, then
    ``initial`` (``init_missing``'s) and ``extra`` (a LoRA checkpoint's adapters, by model
    key), a batch of at most ``STREAM_BATCH_BYTES`` at a time. A collective: every rank
    calls it with the same plan; only rank 0's ``initial`` and ``extra`` are read."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    rank0 = dist.get_rank() == 0
    batches = _batches(plan)
    count = [len(batches)]
    dist.broadcast_object_list(count, src=0)
    if count[0] != len(batches):  # each rank planned from its own copy of the files: they differ
        raise RaybmError(
            f"the model's weight files differ between nodes ({count[0]} batches on rank 0, "
            f"{len(batches)} here); give every node the same model folder"
        )
    for batch in batches:
        part = {}
        if rank0:
            for path, items in batch.items():
                with safe_open(path, framework="pt") as f:
                    for model_key, file_key in items:
                        part[model_key] = f.get_tensor(file_key).to(dtypes[model_key])
        set_model_state_dict(model, part, options=options)
        del part
    last = {**initial, **(extra or {})} if rank0 else {}
    set_model_state_dict(model, {k: v.to(dtypes[k]) for k, v in last.items()}, options=options)


def _batches(plan: StreamPlan) -> list[dict[str, list[tuple[str, str]]]]:
    """The files' entries in runs of at most ``STREAM_BATCH_BYTES``, file by file."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = {}
    for model_key, (path, file_key) in sorted(plan.from_files.items(), key=lambda kv: kv[1]):
        by_file.setdefault(path, []).append((model_key, file_key))
    batches: list[dict[str, list[tuple[str, str]]]] = []
    size = STREAM_BATCH_BYTES
    for path, items in by_file.items():
        with safe_open(path, framework="pt") as f:
            for model_key, file_key in items:
                piece = f.get_slice(file_key)
                n = _numel(piece.get_shape()) * 4
                if size + n > STREAM_BATCH_BYTES and size:
                    batches.append({})
                    size = 0
                batches[-1].setdefault(path, []).append((model_key, file_key))
                size += n
    return batches


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
