"""The model card (README.md) written into every published model folder."""

import yaml

from raybm.models.card import render

TEST = {
    "accuracy": 0.9164,
    "f1_macro": 0.9004,
    "precision_macro": 0.905,
    "recall_macro": 0.896,
    "examples": 2225,
    "per_class": {
        "negative": {"precision": 0.937, "recall": 0.943, "f1": 0.94, "support": 1553},
        "positive": {"precision": 0.867, "recall": 0.854, "f1": 0.861, "support": 672},
    },
}
CFG = {
    "model": {"name": "all-minilm-l6-v2", "pooling": "auto"},
    "data": {"max_length": 64},
    "train": {
        "strategy": "full",
        "epochs": 2,
        "optimizer": "adamw",
        "lr": 8e-5,
        "scheduler": "cosine",
        "batch_size": 32,
        "weight_decay": 0.01,
        "label_smoothing": 0.1,
        "layerwise_lr_decay": 0.9,
        "seed": 0,
        "l1": 0.0,
    },
}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_has_hub_metadata_scores_recipe_and_how_to_load():
    text = render(
        "q6",
        "run",
        CFG,
        ["negative", "positive"],
        "twitter-29b86ebe",
        TEST,
        notes=["the checkpoint of epoch 2 of 2"],
        model_type="raybm-pooled",
    )
    meta = front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["pipeline_tag"] == "text-classification" and "raybm" in meta["tags"]
    assert "| 0.9164 | 0.9004 | 0.9050 | 0.8960 |" in text
    assert "| positive | 0.867 | 0.854 | 0.861 | 672 |" in text
    assert "(2225 examples)" in text and "`twitter-29b86ebe`" in text and "`negative`, `positive`" in text
    assert "| learning rate | 8e-05 |" in text and "| layer-wise LR decay | 0.9 |" in text
    assert "| seed | 0 |" in text and "l1" not in text and "auto" not in text  # unset settings are left out
    assert "| classifier input | mean of the token vectors |" in text
    assert "prepare_transformers()" in text  # a folder of raybm's own architecture without its code
    shipped = render(
        "q6", "run", CFG, ["negative", "positive"], "d", TEST, model_type="raybm-pooled", code_files=["pooled.py"]
    )
    assert "prepare_transformers()" not in shipped and "`pooled.py`" in shipped
    assert 'pipeline("text-classification", model="<this folder>", trust_remote_code=True)' in shipped
    assert "- the checkpoint of epoch 2 of 2" in text


def test_a_plain_transformers_model_loads_with_a_pipeline_and_local_bases_get_no_hub_link():
    cfg = {**CFG, "model": {"name": "/data/models/my-bert"}}
    text = render("r", "sweep", cfg, ["a", "b"], "d", TEST, model_type="bert")
    assert "base_model" not in front_matter(text)
    assert 'pipeline("text-classification"' in text and "prepare_transformers()" not in text
    assert "winner of a raybm sweep" in text
    hub = render("r", "soup", {**CFG, "model": {"name": "org/some-model"}}, ["a", "b"], "d", TEST)
    assert front_matter(hub)["base_model"] == "org/some-model" and "model soup" in hub


def test_a_folder_without_its_config_still_gets_scores_and_labels():
    text = render("ab", "soup", {}, ["a", "b"], "d", TEST)
    assert "fine-tuned from" not in text and "Training recipe" not in text
    assert "| 0.9164 |" in text and "`a`, `b`" in text


def test_the_card_says_how_confidences_are_calibrated_and_how_a_lora_model_was_trained():
    calibrated = {**TEST, "temperature": 1.83, "ece": 0.0841, "ece_calibrated": 0.0213}
    lora = {
        **CFG,
        "train": {
            **CFG["train"],
            "strategy": "lora",
            "lora_rank": 8,
            "lora_alpha": 16.0,
            "lora_dropout": 0.05,
            "lora_targets": [],
        },
    }
    text = render("q7", "run", lora, ["negative", "positive"], "twitter-29b86ebe", calibrated)
    assert "T = 1.830" in text and "0.084 before, 0.021 after" in text
    assert (
        "| strategy | LoRA (PEFT), merged into the weights: rank 8, alpha 16, dropout 0.05, adapting the "
        "attention query and value projections |"
    ) in text
    assert "## Confidence" not in render("q6", "run", CFG, ["negative", "positive"], "d", TEST)


def test_the_card_says_the_precision_the_weights_trained_in():
    asked_fp16 = {**CFG, "train": {**CFG["train"], "precision": "fp16"}}
    on_cpu = render("r", "run", asked_fp16, ["a", "b"], "d", TEST, trained_precision="fp32")
    assert "| precision | fp32 (train.precision=fp16 does not apply on the device it trained on) |" in on_cpu
    on_gpu = render("r", "run", asked_fp16, ["a", "b"], "d", TEST, trained_precision="fp16")
    assert "| precision | fp16 |" in on_gpu
    auto = render(
        "r",
        "run",
        {**CFG, "train": {**CFG["train"], "precision": "auto"}},
        ["a", "b"],
        "d",
        TEST,
        trained_precision="bf16",
    )
    assert "| precision | bf16 |" in auto
    plain = render("r", "run", CFG, ["a", "b"], "d", TEST).splitlines()
    assert not any(line.startswith("| precision |") for line in plain)  # unknown and unset: left out
