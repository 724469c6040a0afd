"""Model and tokenizer builders (the fine-tuning strategies are in ``raybm.models.strategies``).

Names resolve to a local folder when they can: a built-in model shipped in a package, a
tiny random model for tests, or a Hugging Face folder. Nothing is downloaded unless the
name is a hub name and the network allows it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from raybm.errors import RaybmError
from raybm.models.architectures import ARCHITECTURES, head_modules
from raybm.models.baseline import TextCNNConfig
from raybm.models.catalog import (  # noqa: F401 - names many modules take from here
    BASELINE_MODELS,
    BUILTIN_MODELS,
    TINY_MODELS,
    TINY_SIZE,
    check_model,
    load_tokenizer,
    local_model,
    resolve_model_source,
    with_pad_token,
)
from raybm.models.pooled import PooledClassifier, PooledClassifierConfig
from raybm.models.registry import prepare_transformers

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

    from raybm.config import ModelConfig

# ------------------------------------------------------------------------- building


def label_settings(labels: list[str]) -> dict:
    """The config settings that name a classifier's classes."""
    id2label = {i: lab for i, lab in enumerate(labels)}
    return dict(num_labels=len(labels), id2label=id2label, label2id={lab: i for i, lab in id2label.items()})


def classifier_config(model_cfg: ModelConfig, labels: list[str]) -> tuple[PretrainedConfig, bool]:
    """(the classifier's config, whether pretrained weights exist for it): the base model's
    config with ``labels``, the dropout overrides, a pad token for a decoder and layer cropping."""
    prepare_transformers()
    from transformers import AutoConfig

    common = label_settings(labels)
    if model_cfg.name in TINY_MODELS:
        return _crop(_tuned(tiny_config(model_cfg.name, common), model_cfg), model_cfg), False
    if model_cfg.name in BASELINE_MODELS:
        tokenizer = load_tokenizer(model_cfg.name)
        config = TextCNNConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, **common)
        if (
            model_cfg.keep_layers is not None
            or model_cfg.hidden_dropout is not None
            or model_cfg.attention_dropout is not None
        ):
            raise RaybmError(
                "model.keep_layers, hidden_dropout and attention_dropout do not apply to "
                "textcnn; use model.classifier_dropout"
            )
        if model_cfg.classifier_dropout is not None:
            config.dropout = model_cfg.classifier_dropout
        return config, False
    source = resolve_model_source(model_cfg.name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code, **common)
    except (OSError, ValueError) as e:
        raise RaybmError(f"cannot load model {model_cfg.name!r}: {str(e).splitlines()[0]}") from None
    return _crop(_tuned(config, model_cfg), model_cfg), True


def _tuned(config, model_cfg):
    _apply_dropout(config, model_cfg)
    if config.pad_token_id is None:  # a decoder: it finds each text's last token by the pad id
        config.pad_token_id = load_tokenizer(model_cfg.name, model_cfg.trust_remote_code).pad_token_id
    return config


def _crop(config, model_cfg):
    """Layer cropping: ``model.keep_layers`` first layers (from_pretrained then skips the rest)."""
    if model_cfg.keep_layers is None:
        return config
    pooled = getattr(config, "model_type", "") == "raybm-pooled"  # a raybm mean-pooling model folder as the base
    n = config.encoder.get("num_hidden_layers") if pooled else getattr(config, "num_hidden_layers", None)
    if n is None or model_cfg.keep_layers > n:
        raise RaybmError(
            f"model.keep_layers={model_cfg.keep_layers}, but {model_cfg.name} has "
            f"{n if n is not None else 'no countable'} layers"
        )
    if pooled:
        config.encoder["num_hidden_layers"] = model_cfg.keep_layers
        return config
    config.num_hidden_layers = model_cfg.keep_layers
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per layer (ModernBERT, Qwen2, ...)
        config.layer_types = config.layer_types[: model_cfg.keep_layers]
    return config


def classifier_skeleton(model_cfg: ModelConfig, labels: list[str]) -> nn.Module:
    """The classifier's modules on the meta device: no memory and no weights, to check what a
    strategy needs of the architecture before anything runs."""
    prepare_transformers()
    import torch
    from transformers import AutoModelForSequenceClassification

    config, _ = classifier_config(model_cfg, labels)
    with torch.device("meta"):
        if resolve_pooling(model_cfg) == "mean":
            return _mean_pooled(model_cfg, config, label_settings(labels), pretrained=False)
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_cfg.trust_remote_code)


def checkpointed_part(model: nn.Module) -> nn.Module | None:
    """The module whose layers recompute activations under gradient checkpointing: the model,
    or the encoder inside a mean-pooling classifier; None when it has no such support."""
    part = model.encoder if isinstance(model, PooledClassifier) else model
    return part if getattr(part, "supports_gradient_checkpointing", False) else None


def supports_checkpointing(model: nn.Module) -> bool:
    """Whether ``train.gradient_checkpointing`` works for this model."""
    return checkpointed_part(model) is not None


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: gradients
    reach frozen embeddings' outputs too, as LoRA and partial fine-tuning need)."""
    part = checkpointed_part(model)
    if part is None:
        raise RaybmError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def build_classifier(model_cfg: ModelConfig, labels: list[str], *, pretrained: bool = True, seed: int = 0) -> nn.Module:
    """A sequence classifier with a fresh head for ``labels``.

    ``pretrained=False`` gives the same architecture with random weights (the ``scratch``
    strategy). Dropout overrides, layer cropping and head re-initialization from
    ``model_cfg`` are applied here.
    """
    prepare_transformers()
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config, has_weights = classifier_config(model_cfg, labels)
    pretrained = pretrained and has_weights
    if resolve_pooling(model_cfg) == "mean":
        model = _mean_pooled(model_cfg, config, label_settings(labels), pretrained)
    elif pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_source(model_cfg.name), config=config, trust_remote_code=model_cfg.trust_remote_code
        )
    else:
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    init_head(model, model_cfg)
    return model


def init_head(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Re-initialize the classification head as ``model.head_init`` says (``default``: as built)."""
    import torch

    if model_cfg.head_init == "default":
        return
    for module in head_modules(model):
        for p in module.parameters(recurse=False):
            if p.dim() > 1:
                if model_cfg.head_init == "xavier":
                    torch.nn.init.xavier_uniform_(p)
                else:
                    torch.nn.init.normal_(p, std=0.02)
            else:
                torch.nn.init.zeros_(p)


def tiny_config(name: str, common: dict) -> PretrainedConfig:
    """The config of a tiny random model (``TINY_MODELS``) over MiniLM's tokenizer: its special
    token ids, and no pad token for a decoder."""
    prepare_transformers()
    from transformers import CONFIG_MAPPING, AutoConfig

    tokenizer = load_tokenizer(name)
    kind, settings = TINY_MODELS[name]
    ids = {
        "pad_token_id": None if ARCHITECTURES[kind].decoder else tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
    }
    defaults = CONFIG_MAPPING[kind]()
    ids = {key: value for key, value in ids.items() if hasattr(defaults, key)}
    return AutoConfig.for_model(kind, vocab_size=len(tokenizer), **{**TINY_SIZE, **settings, **ids}, **common)


def resolve_pooling(model_cfg: ModelConfig) -> str:
    """``cls`` or ``mean`` for this model (``auto``: mean for sentence-transformers folders)."""
    if model_cfg.pooling != "auto":
        if model_cfg.pooling == "mean" and model_cfg.name in BASELINE_MODELS:
            raise RaybmError("model.pooling=mean does not apply to textcnn (it max-pools its convolutions)")
        return model_cfg.pooling
    if model_cfg.name in TINY_MODELS or model_cfg.name in BASELINE_MODELS:
        return "cls"
    source = resolve_model_source(model_cfg.name)
    st_folder = os.path.isfile(os.path.join(source, "modules.json")) or os.path.isfile(
        os.path.join(source, "config_sentence_transformers.json")
    )
    return "mean" if st_folder else "cls"


def _mean_pooled(model_cfg: ModelConfig, config: PretrainedConfig, common: dict, pretrained: bool) -> PooledClassifier:
    """A PooledClassifier around the encoder of ``config`` (weights from the base model)."""
    from transformers import AutoModel

    from raybm.models.pooled import PooledClassifier

    dropout = model_cfg.classifier_dropout
    if dropout is None:
        dropout = getattr(config, "classifier_dropout", None)
    if dropout is None:
        dropout = getattr(config, "hidden_dropout_prob", 0.1)
    encoder = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", "num_labels")}
    model = PooledClassifier(
        PooledClassifierConfig(encoder=encoder, pooling="mean", classifier_dropout=dropout, **common)
    )
    if pretrained:
        base = AutoModel.from_pretrained(
            resolve_model_source(model_cfg.name),
            config=config.__class__(**encoder),
            trust_remote_code=model_cfg.trust_remote_code,
        )
        missing, _ = model.encoder.load_state_dict(base.state_dict(), strict=False)
        if missing:
            raise RaybmError(
                f"model {model_cfg.name!r}: weights missing for {missing[:3]} when building "
                f"the mean-pooling classifier; set model.pooling=cls"
            )
    return model


_DROPOUT_KEYS = {
    "hidden_dropout": ("hidden_dropout_prob", "dropout", "hidden_dropout"),
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout"),
    "classifier_dropout": ("classifier_dropout", "seq_classif_dropout"),
}


def _apply_dropout(config: PretrainedConfig, model_cfg: ModelConfig) -> None:
    for option, keys in _DROPOUT_KEYS.items():
        value = getattr(model_cfg, option)
        if value is None:
            continue
        key = next((k for k in keys if hasattr(config, k)), None)
        if key is None and option == "classifier_dropout":
            key = "classifier_dropout"  # BERT-style configs accept it even when unset
        if key is None:
            raise RaybmError(f"model.{option}: {model_cfg.name} has no such setting (looked for {', '.join(keys)})")
        setattr(config, key, value)
