import os

# Tests never download anything.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A raybm model folder holding a tiny random BERT (2 classes), as training writes it."""
    from raybm.config import build_config
    from raybm.models import build_classifier, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    cfg = build_config(overrides=["model.name=tiny-bert"])
    build_classifier(cfg.model, ["negative", "positive"], seed=1).save_pretrained(folder, safe_serialization=True)
    load_tokenizer("tiny-bert").save_pretrained(folder)
    (folder / "label_map.json").write_text(json.dumps({"labels": ["negative", "positive"],
                                                       "label_to_id": {"negative": 0, "positive": 1}}))
    return str(folder)
