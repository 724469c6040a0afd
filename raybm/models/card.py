"""The model card: a README.md in every model folder raybm publishes.

Hugging Face shows a folder's README.md as its model card (the YAML block at the top is
the hub's metadata), so a model pushed to a hub, or copied to a colleague, says what it
is: base model, labels, data, recipe, test scores and how to load it. Written after the
test split is scored; everything in it comes from the folder's own ``raybm_config.yaml``
and the numbers just measured.
"""

from __future__ import annotations

from typing import Any

import yaml

from raybm.models.catalog import code_files
from raybm.storage.layout import LABEL_MAP_FILE, MODEL_CARD_FILE, MODEL_CONFIG_FILE
from raybm.storage.results import Results

# Built-in short names and where their weights come from on the hub.
_HUB_IDS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}

# raybm's own architectures: transformers loads them once raybm has registered them.
_RAYBM_TYPES = ("raybm-pooled", "raybm-textcnn")


def _hub_id(name: str | None) -> str | None:
    if not name:
        return None
    if name in _HUB_IDS:
        return _HUB_IDS[name]
    looks_like_hub = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if looks_like_hub else None


def _precision(asked: str | None, trained: str | None) -> str | None:
    """The precision the weights were trained in; the setting as well where the device
    did not honour it (``fp16`` on a CPU trains in fp32)."""
    if trained is None or asked in (None, "auto", trained):
        return trained or asked
    return f"{trained} (train.precision={asked} does not apply on the device it trained on)"


def _recipe(cfg: dict[str, Any], trained_precision: str | None = None) -> list[tuple[str, Any]]:
    t, m, d = cfg.get("train") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    strategy = t.get("strategy")
    if strategy == "lora":  # the published weights have the adapters merged in
        strategy = (
            f"LoRA (PEFT), merged into the weights: rank {t.get('lora_rank')}, alpha "
            f"{_fmt(t.get('lora_alpha'))}, dropout {_fmt(t.get('lora_dropout'))}, adapting "
            f"{', '.join(t.get('lora_targets') or []) or 'the attention query and value projections'}"
        )
    rows = [
        ("strategy", strategy),
        ("epochs", t.get("epochs")),
        ("optimizer", t.get("optimizer")),
        ("learning rate", t.get("lr")),
        ("schedule", t.get("scheduler")),
        ("batch size", t.get("batch_size")),
        ("max length (tokens)", d.get("max_length")),
        ("weight decay", t.get("weight_decay")),
        ("label smoothing", t.get("label_smoothing")),
        ("layer-wise LR decay", t.get("layerwise_lr_decay")),
        ("pooling", m.get("pooling")),
        ("encoder layers kept", m.get("keep_layers")),
        ("gradient checkpointing", t.get("gradient_checkpointing") or None),
        ("precision", _precision(t.get("precision"), trained_precision)),
        ("seed", t.get("seed")),
    ]
    off = {"layer-wise LR decay": 1.0}
    return [(k, v) for k, v in rows if (v not in (None, "", 0.0, "auto") and off.get(k) != v) or k == "seed"]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def render(
    name: str,
    kind: str,
    cfg: dict[str, Any],
    labels: list[str],
    dataset: str,
    test: dict[str, Any],
    notes: list[str] | None = None,
    model_type: str | None = None,
    trained_precision: str | None = None,
    code_files: list[str] | None = None,
) -> str:
    """The README.md text. ``kind``: run, sweep or soup; ``notes``: lines on how it was chosen;
    ``trained_precision``: what the training loop ran in (an epoch record's ``precision``);
    ``code_files``: the architecture's modules the folder carries (its ``auto_map``)."""
    base = (cfg.get("model") or {}).get("name")
    hub = _hub_id(base)
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["raybm", "text-classification"],
    }
    if hub:
        meta["base_model"] = hub
    out = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    made = {
        "run": "a raybm training run",
        "sweep": "the winner of a raybm sweep (Ray Tune)",
        "soup": "a raybm model soup (the mean of fine-tuned models' weights)",
    }[kind]
    origin = f" fine-tuned from `{base}`{f' ([{hub}](https://huggingface.co/{hub}))' if hub else ''}" if base else ""
    out += [
        f"A text classifier{origin}: {made}, on the prepared dataset `{dataset}`. "
        f"Labels: {', '.join(f'`{lab}`' for lab in labels)}.",
        "",
    ]
    out += [
        "## Test scores",
        "",
        f"On the held-out test split ({test.get('examples', '?')} examples), never seen in training or selection:",
        "",
        "| accuracy | macro-F1 | macro precision | macro recall |",
        "|---|---|---|---|",
        f"| {test['accuracy']:.4f} | {test['f1_macro']:.4f} | {test['precision_macro']:.4f} | "
        f"{test['recall_macro']:.4f} |",
        "",
    ]
    per_class = test.get("per_class") or {}
    if per_class:
        out += ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        out += [
            f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
            for lab, m in per_class.items()
        ]
        out.append("")
    if "temperature" in test:
        out += [
            "## Confidence",
            "",
            f"Confidences are calibrated by temperature scaling: the logits are divided by "
            f"T = {test['temperature']:.3f}, fitted on the validation split (`calibration.json`; "
            f"raybm's predict, serve and dashboard apply it). Expected calibration error on the test split: "
            f"{test['ece']:.3f} before, {test['ece_calibrated']:.3f} after (0 is perfect: a stated 90% is "
            f"right 90% of the time); transformers' own pipeline shows the uncalibrated ones.",
            "",
        ]
    if notes:
        out += ["## How it was chosen", "", *[f"- {n}" for n in notes], ""]
    if cfg:
        recipe = _recipe(cfg, trained_precision)
        if model_type == "raybm-pooled":
            recipe = [(k, v) for k, v in recipe if k != "pooling"] + [("classifier input", "mean of the token vectors")]
        out += ["## Training recipe", "", "| setting | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in recipe]
        out += ["", "The whole resolved job config is in `raybm_config.yaml` beside this file.", ""]
    out += [
        "## Use",
        "",
        "```",
        'raybm predict --model <this folder> --text "what a great flight"',
        "raybm serve --model <this folder>",
        "raybm export --model <this folder> --variants onnx-int8",
        "```",
        "",
    ]
    if model_type in _RAYBM_TYPES and code_files:
        out += [
            f"This folder's architecture (`{model_type}`) is raybm's own; its code ships in the folder "
            f"({', '.join(f'`{c}`' for c in code_files)}: torch and transformers only, named in `config.json`'s "
            "`auto_map` as on the Hugging Face Hub), so it loads without raybm once you trust that code:",
            "",
            "```python",
            "from transformers import pipeline",
            'classify = pipeline("text-classification", model="<this folder>", trust_remote_code=True)',
            '# or: AutoModelForSequenceClassification.from_pretrained("<this folder>", trust_remote_code=True)',
            "```",
            "",
            "raybm itself runs its own copy of the architecture, never the folder's.",
            "",
        ]
    elif model_type in _RAYBM_TYPES:
        out += [
            f"This folder's architecture (`{model_type}`) is raybm's own: in Python, import raybm's models "
            "before transformers' Auto classes. For use without raybm, `raybm export` writes ONNX and a "
            "self-contained mobile artifact.",
            "",
            "```python",
            "from raybm.models.registry import prepare_transformers",
            "prepare_transformers()  # registers the architecture",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "```",
            "",
        ]
    else:
        out += [
            "```python",
            "from transformers import pipeline",
            'classify = pipeline("text-classification", model="<this folder>")',
            "```",
            "",
        ]
    out += ["Weights are safetensors; raybm never loads pickle from a model folder.", ""]
    return "\n".join(out)


def write_model_card(
    results: Results,
    model_dir: str,
    *,
    name: str,
    kind: str,
    dataset: str,
    test: dict[str, Any],
    notes: list[str] | None = None,
    trained_precision: str | None = None,
) -> None:
    """Write README.md into a published model folder (``model_dir``: a path in the results
    store, local or S3); ``trained_precision`` as ``render`` takes it."""
    cfg_file = results.join(model_dir, MODEL_CONFIG_FILE)
    cfg = (yaml.safe_load(results.read_text(cfg_file)) or {}) if results.exists(cfg_file) else {}
    labels = results.read_json(results.join(model_dir, LABEL_MAP_FILE))["labels"]
    model_config = results.read_json(results.join(model_dir, "config.json"))
    model_type = model_config.get("model_type")
    published = results.is_complete(model_dir)
    results.unmark_complete(model_dir)  # _SUCCESS stays the last file written
    results.write_text(
        results.join(model_dir, MODEL_CARD_FILE),
        render(name, kind, cfg, labels, dataset, test, notes, model_type, trained_precision, code_files(model_config)),
    )
    if published:
        results.mark_complete(model_dir)
