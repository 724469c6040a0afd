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
    from raybm.models.build import build_classifier, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    cfg = build_config(overrides=["model.name=tiny-bert"])
    build_classifier(cfg.model, ["negative", "positive"], seed=1).save_pretrained(folder, safe_serialization=True)
    load_tokenizer("tiny-bert").save_pretrained(folder)
    (folder / "label_map.json").write_text(json.dumps({"labels": ["negative", "positive"],
                                                       "label_to_id": {"negative": 0, "positive": 1}}))
    return str(folder)


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 HTTP API (moto's server) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setenv(k, v)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        yield endpoint
    server.stop()
