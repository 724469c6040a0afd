import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (starting Ray costs seconds)."""
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (SQLite store, artifacts in a local folder),
    from the virtualenv of its own that `make install` builds (the full mlflow package caps
    pyarrow below raybm's pin); yields its URL."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    mlflow = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          ".venv-mlflow", "bin", "mlflow")
    assert os.path.exists(mlflow), f"{mlflow} is missing: run make install"
    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--artifacts-destination", str(folder / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield url
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()
