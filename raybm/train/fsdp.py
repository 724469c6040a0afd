"""Fully sharded data parallel training with torch's FSDP2 (``fully_shard``): sharding the
model, and gathering the few full tensors a LoRA checkpoint keeps (the sharded checkpoints
themselves: ``raybm.train.sharded``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raybm.errors import RaybmError
from raybm.train.fsdp_loading import StreamPlan, init_missing, stream_weights
from raybm.train.host_memory import release_freed_memory

if TYPE_CHECKING:
    import torch
    from torch import nn


def wrap_fsdp(
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    offload: bool = False,
    stream: StreamPlan | None = None,
    extra: dict | None = None,
    seed: int = 0,
) -> nn.Module:
    """Shard ``model`` over all workers with FSDP2, in place: one unit per encoder layer
    (the architecture table's layer stack) plus the root for the rest, so a forward pass
    holds one layer's full weights at a time and each worker keeps 1/N of every parameter,
    gradient and optimizer moment. Parameter names stay those of the plain model (no wrapper
    modules): optimizer groups, freezing by strategy and checkpoint keys all use them. On a
    GPU with bf16 the gathered weights and the compute are bf16 and gradients reduce in fp32
    (``MixedPrecisionPolicy``). Returns ``model``.

    Rank 0 comes with the weights in host memory; every other rank with the model built on
    the meta device (shapes, no memory). Once sharded, rank 0 broadcasts the weights one
    tensor at a time and each rank keeps its own shards (``broadcast_from_rank0``), then the
    buffers: no rank but 0 ever holds a full copy, and rank 0 holds one only until then.

    ``offload`` (GPU workers): the shards, their gradients and the optimizer state stay in
    host memory and each layer's weights go to the GPU only to be gathered and used
    (``CPUOffloadPolicy``); the optimizer then steps on the CPU.

    ``stream``: every rank, rank 0 too, comes with the model's skeleton, and rank 0 streams
    the weights from the files a batch at a time instead (``raybm.train.fsdp_loading``; the
    parameters no file holds initialised with ``seed``; ``extra``: rank 0's LoRA adapters to
    resume from): no rank ever holds a whole copy.

    raybm shards it itself rather than through Ray Train's ``prepare_model``, which needs
    CUDA and leaves a single worker unwrapped: this runs on CPU workers (gloo) too, and one
    worker runs the same code as many."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from raybm.models.architectures import model_parts

    kwargs = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    try:
        layers = list(model_parts(model).layers)
    except RaybmError:  # no layer stack (the TextCNN baseline): one unit
        layers = []
    rank0 = dist.get_rank() == 0
    if stream is not None:  # every rank holds a skeleton: real buffers, parameters on meta
        initial = init_missing(model, stream.missing, seed) if rank0 else {}
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    full = model.state_dict() if rank0 and stream is None else {}  # references: no copy
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if not rank0 or stream is not None:  # this rank's shards, filled from rank 0 below (in host memory when offloaded)
        model.to_empty(device="cpu" if offload else device)
    if stream is not None:
        _put_buffers(model, buffers, device)
        stream_weights(model, stream, initial, dtypes, extra)
        return model
    if offload:  # the buffers (rotary frequencies ...) are used on the GPU, never offloaded
        _put_buffers(model, dict(model.named_buffers()), device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for _, buffer in model.named_buffers():  # not sharded; some (rotary frequencies) are in no state dict
        dist.broadcast(buffer, src=0)
    if rank0:
        release_freed_memory()
    return model


def _put_buffers(model: nn.Module, buffers: dict, device: torch.device) -> None:
    """Set each of ``model``'s buffers (by name) to the given value, on ``device``."""
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value.to(device)


def gather_full(model: nn.Module, names: list[str]) -> dict:
    """The full tensors of a sharded model's state entries ``names`` (a LoRA run's adapters
    and head), in rank 0's host memory (empty on the other ranks): a collective, every rank
    calls it with the same names. Only these are gathered, never the frozen base model."""
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    state = model.state_dict()  # this rank's shards, no communication
    out = {}
    for name in names:
        value = state[name]
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if rank0:
            out[name] = full.detach().cpu()
    return out
