"""Fully sharded data parallel training: wrapping the model, and its full state dicts for
checkpoints and resuming."""

from __future__ import annotations

from raybm.errors import RaybmError


def wrap_fsdp(model, device):
    """Shard ``model`` over all workers with FSDP: one unit per encoder layer plus one for the
    rest, so a forward pass holds one layer's full weights at a time. The original
    parameters stay visible (names for freezing by strategy and for the optimizer's groups).

    raybm wraps it itself rather than through Ray Train's ``prepare_model``, which needs
    CUDA and leaves a single worker unwrapped: this runs on CPU workers (gloo) too, and one
    worker runs the same code as many."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from raybm.models.architectures import model_parts

    try:
        policy = ModuleWrapPolicy({type(layer) for layer in model_parts(model).layers})
    except RaybmError:  # no layer stack (the TextCNN baseline): one unit
        policy = None
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=device)


def _fsdp_configs(device, rank0_only: bool):
    """FSDP's full state dict settings: gathered to host memory on GPUs."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig

    offload = device.type != "cpu"  # gathered to host memory; on CPU it is there already
    return (FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=False))


def fsdp_full_state(wrapped, optimizer, device) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts of an FSDP model, gathered to rank 0 (a collective:
    every rank calls it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, *_fsdp_configs(device, True)):
        return wrapped.state_dict(), FSDP.optim_state_dict(wrapped, optimizer)


def fsdp_optim_to_load(wrapped, optimizer, full: dict, device) -> dict:
    """This rank's optimizer state out of a full one (the state dict type must be set)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, *_fsdp_configs(device, False)):
        return FSDP.optim_state_dict_to_load(wrapped, optimizer, full)
