"""LoRA with PEFT (``train.strategy=lora``): the base model frozen, low-rank adapters beside
its attention projections and the head trained, checkpoints of the adapters and the head
only, and a published model with the adapters merged into the weights, so that predict,
export, serve and the dashboard load it as any other model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from raybm.errors import RaybmError
from raybm.models.architectures import head_modules, lora_targets, model_parts, weight_layers

if TYPE_CHECKING:
    from torch import nn

    from raybm.config import TrainConfig

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's names for what save_pretrained writes
ADAPTER_CONFIG_FILE = "adapter_config.json"


def adaptable_names(model: nn.Module) -> list[str]:
    """The short names of the Linear (and GPT-2 Conv1D) modules inside the layer stack."""
    names = set()
    for layer in model_parts(model).layers:
        kept = {id(m) for m in weight_layers(layer)}
        names |= {name.rsplit(".", 1)[-1] for name, module in layer.named_modules() if id(module) in kept}
    return sorted(names)


def target_names(model: nn.Module, targets: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The modules LoRA adapts: ``targets`` (``train.lora_targets``) or the architecture's
    default; a RaybmError naming the architecture and the names it has when one is not there."""
    from raybm.models.architectures import model_type

    chosen = list(targets) or lora_targets(model)
    have = adaptable_names(model)
    missing = [t for t in chosen if t not in have]
    if missing:
        raise RaybmError(
            f"train.lora_targets: {model_type(model)} has no Linear module named "
            f"{', '.join(missing)} in its layers; it has: {', '.join(have)}"
        )
    return chosen


def saved_heads(model: nn.Module) -> list[str]:
    """The names PEFT trains and saves whole beside the adapters: every module outside the
    base model that has weights (classifier, pre-classifier, pooler, ModernBERT's head), and
    a pooler inside it (BERT's)."""
    heads = {id(m) for m in head_modules(model)}
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if id(m) in heads and any(True for _ in m.parameters())
        }
    )


def add_lora(model: nn.Module, train_cfg: TrainConfig) -> nn.Module:
    """``model`` with LoRA adapters (PEFT): only the adapters and the head train."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = target_names(model, train_cfg.lora_targets)
    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(
        r=train_cfg.lora_rank,
        lora_alpha=train_cfg.lora_alpha,
        lora_dropout=train_cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=saved_heads(model),
        fan_in_fan_out=conv1d,
        bias="none",
    )
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries PEFT adapters."""
    return getattr(model, "peft_config", None) is not None


def adapter_state(model: nn.Module) -> dict:
    """The adapters' and the head's weights, keyed as a LoRA checkpoint holds them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def adapter_keys(model: nn.Module) -> dict[str, str]:
    """Each key of ``model``'s LoRA checkpoint -> the key of the same tensor in the model's
    full state dict (the checkpoint's keys drop the adapter's name). Taken before FSDP shards
    the model, so that the adapters are written out of a gathered full state dict by these
    names rather than by PEFT's own filter, which looks at the (sharded) modules."""
    import torch
    from peft import get_peft_model_state_dict

    names = list(model.state_dict())
    markers = {name: torch.tensor([i]) for i, name in enumerate(names)}
    return {
        saved: names[int(marker[0])] for saved, marker in get_peft_model_state_dict(model, state_dict=markers).items()
    }


def save_adapter_weights(folder: str, full_state: dict, keys: dict[str, str]) -> None:
    """Write a LoRA checkpoint's weights out of a gathered full state dict (``keys``: from
    ``adapter_keys``)."""
    from safetensors.torch import save_file

    save_file(
        {saved: full_state[name].contiguous() for saved, name in keys.items()},
        os.path.join(folder, ADAPTER_WEIGHTS_FILE),
        metadata={"format": "pt"},
    )


def load_adapter(folder: str, model: nn.Module) -> None:
    """Load a LoRA checkpoint's adapters and head into ``model`` (a PEFT model)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(folder, ADAPTER_WEIGHTS_FILE)))


def merged(model: nn.Module) -> nn.Module:
    """The plain classifier with the adapters merged into its weights (PEFT's merge_and_unload)."""
    if not is_lora(model):
        raise RaybmError("merged(): the model has no LoRA adapters")
    return model.merge_and_unload()
