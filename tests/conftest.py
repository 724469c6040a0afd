import os

# Tests never download anything.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


import contextlib
import json

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A raybm model folder holding a tiny random BERT (2 classes), as training writes it."""
    from raybm.config import build_config
    from raybm.models.build import build_classifier, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    cfg = build_config(overrides=["model.name=tiny-bert"])
    build_classifier(cfg.model, ["negative", "positive"], seed=1).save_pretrained(folder, safe_serialization=True)
    load_tokenizer("tiny-bert").save_pretrained(folder)
    (folder / "label_map.json").write_text(
        json.dumps({"labels": ["negative", "positive"], "label_to_id": {"negative": 0, "positive": 1}})
    )
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
        for k, v in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            env.setenv(k, v)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        yield endpoint
    server.stop()


@contextlib.contextmanager
def running_mlflow_server(folder, artifacts: str | None = None, env: dict | None = None):
    """A real MLflow tracking server on loopback (SQLite store in ``folder``; artifacts in
    ``folder/artifacts`` or at ``artifacts``, e.g. an s3:// folder with ``env`` naming its
    endpoint and keys), from the virtualenv of its own that `make test` builds (the full
    mlflow package caps pyarrow below raybm's pin); yields its URL."""
    import socket
    import subprocess
    import time
    import urllib.request

    mlflow = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mlflow", "bin", "mlflow")
    assert os.path.exists(mlflow), f"{mlflow} is missing: run make test (it builds .venv-mlflow)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            artifacts or str(folder / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server for this test module, artifacts in a local folder."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(autouse=True, scope="module")
def no_ray_left_running(request):
    """A test module that leaves a Ray initialized in this process fails at its end (the
    next module's own Ray would not start: "ray.init twice"); its Ray is shut down."""
    import sys

    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.module.__name__} left Ray running in the test process")
