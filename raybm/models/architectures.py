"""Where each architecture keeps its parts: the stack of transformer layers, the embeddings,
the modules after the last layer (a final norm), whether it classifies from the last token
(a decoder), and which Linear modules LoRA adapts by default.

One row per Hugging Face ``model_type`` for the common architectures; any other
architecture is read by a generic walk (``walk_parts``): its layers are the largest
``ModuleList`` under the base model, the modules beside them that hold an ``nn.Embedding``
are its embeddings, and the other modules beside them come after the last layer. The suite
checks that the walk agrees with every row of the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raybm.errors import RaybmError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Paths under the base model (``model.base_model``), dotted."""

    layers: str  # the nn.ModuleList of transformer layers, bottom first
    embeddings: tuple[str, ...]  # frozen with the embeddings; the lowest learning rate under layer-wise decay
    after: tuple[str, ...] = ()  # after the last layer (a final norm): trained and decayed with the top layer
    decoder: bool = False  # classifies from the last token: needs a pad token to find it in a batch
    lora_targets: tuple[str, ...] = ()  # the Linear modules LoRA adapts by default (attention query and value)


_BERT_LIKE = Architecture("encoder.layer", ("embeddings",), lora_targets=("query", "value"))
_LLAMA_LIKE = Architecture(
    "layers", ("embed_tokens",), after=("norm",), decoder=True, lora_targets=("q_proj", "v_proj")
)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": Architecture("encoder.layer", ("embeddings", "embeddings_project"), lora_targets=("query", "value")),
    "distilbert": Architecture("transformer.layer", ("embeddings",), lora_targets=("q_lin", "v_lin")),
    # DeBERTa's relative position embeddings and their norm sit beside the layers.
    "deberta-v2": Architecture(
        "encoder.layer",
        ("embeddings", "encoder.rel_embeddings", "encoder.LayerNorm"),
        lora_targets=("query_proj", "value_proj"),
    ),
    "modernbert": Architecture("layers", ("embeddings",), after=("final_norm",), lora_targets=("Wqkv",)),
    "gpt2": Architecture("h", ("wte", "wpe"), after=("ln_f",), decoder=True, lora_targets=("c_attn",)),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": Architecture("layers", ("embed_tokens",), after=("norm",), decoder=True, lora_targets=("qkv_proj",)),
}


@dataclass
class Parts:
    """A built model's parts (modules), as the strategies use them."""

    architecture: str  # the base model's model_type
    layers: list  # bottom first
    embeddings: list
    after: list
    head: list  # every module outside the base model, plus a pooler inside it
    decoder: bool


def _module(root: nn.Module, path: str) -> Any:  # a submodule (or None), found by attribute
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def unwrapped(model: nn.Module) -> nn.Module:
    """The classifier inside a PEFT (LoRA) model, else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_type(model: nn.Module) -> str:
    """The architecture's name (the base model's ``model_type``)."""
    model = unwrapped(model)
    for owner in (model.base_model, model):
        kind = getattr(getattr(owner, "config", None), "model_type", None)
        if kind:
            return kind
    return type(model).__name__


def head_modules(model: nn.Module) -> list:
    """Modules outside the base model (classifier, pre-classifier, DeBERTa's pooler, ModernBERT's
    head) plus a pooler inside it (BERT's)."""
    model = unwrapped(model)
    base = model.base_model
    mods = [m for _, m in model.named_children() if m is not base]
    pooler = getattr(base, "pooler", None)
    return mods + ([pooler] if pooler is not None else [])


def model_parts(model: nn.Module) -> Parts:
    """The parts of ``model`` by the table, else by the generic walk; a RaybmError naming the
    architecture when it has no layer stack (the TextCNN baseline)."""
    import torch

    model = unwrapped(model)
    kind = model_type(model)
    base = model.base_model
    row = ARCHITECTURES.get(kind)
    if row is not None and isinstance(_module(base, row.layers), torch.nn.ModuleList):
        pick = lambda paths: [m for m in (_module(base, p) for p in paths) if m is not None]  # noqa: E731
        return Parts(
            kind,
            list(_module(base, row.layers)),
            pick(row.embeddings),
            pick(row.after),
            head_modules(model),
            row.decoder,
        )
    return walk_parts(model)


def walk_parts(model: nn.Module) -> Parts:
    """The generic walk: the largest ModuleList under the base model is the layer stack; each
    module beside it on the way down is an embedding when it comes before the stack (modules
    register in the order they run) or holds an ``nn.Embedding``, else a module after the
    last layer."""
    import torch

    model = unwrapped(model)
    kind = model_type(model)
    base = model.base_model
    head = head_modules(model)
    in_head = {id(m) for h in head for m in h.modules()}
    lists = [
        (sum(p.numel() for p in m.parameters()), name, m)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.ModuleList)
        and len(m) > 0
        and id(m) not in in_head
        and all(any(True for _ in layer.children()) for layer in m)
    ]  # layers, not a list of convolutions
    if not lists:
        raise RaybmError(f"{kind} has no stack of transformer layers")
    _, path, layers = max(lists, key=lambda x: x[0])
    embeddings: list = []
    after: list = []
    owner = base
    for name in path.split("."):
        before = True
        for child_name, child in owner.named_children():
            if child_name == name:
                before = False
                continue
            if id(child) in in_head or not any(True for _ in child.parameters()):
                continue
            holds_embedding = any(isinstance(m, torch.nn.Embedding) for m in child.modules())
            (embeddings if before or holds_embedding else after).append(child)
        owner = getattr(owner, name)
    decoder = bool(getattr(getattr(model, "config", None), "is_decoder", False)) or hasattr(model, "score")
    return Parts(kind, list(layers), embeddings, after, head, decoder)


def weight_layers(module: nn.Module) -> list:
    """Every layer with a weight matrix under ``module``: ``nn.Linear``, and transformers'
    ``Conv1D`` (GPT-2's, a Linear with its weight transposed)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [m for m in module.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def lora_targets(model: nn.Module) -> list[str]:
    """The module names LoRA adapts by default for this model's architecture."""
    kind = model_type(model)
    row = ARCHITECTURES.get(kind)
    if row is not None:
        return list(row.lora_targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    if kind in PEFT_TARGETS:
        return list(PEFT_TARGETS[kind])
    raise RaybmError(
        f"no default LoRA target modules for {kind}; name them with train.lora_targets "
        f"(Linear module names inside its layers, e.g. [q_proj, v_proj])"
    )
