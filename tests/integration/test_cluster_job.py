"""The cluster path for real: a Ray head started with `ray start --head` on loopback, the
pipeline job submitted to it through Ray's job submission API (what `ray job submit`
uses), with local storage and then with S3 storage on moto's S3 server.

A tiny random BERT on tiny data; the stages run for real: Ray Data, a Ray Tune sweep of
Ray Train runs, the winner on test, an ONNX export, the release gate and Ray Serve.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .test_data_pipeline import make_frame

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` on loopback; yields (job API address, GCS address); `ray stop` after."""
    gcs, dash = free_port(), free_port()
    # Its own temp dir (short: Ray's socket paths), so the teardown stops this head's
    # processes only, not another Ray on the machine as `ray stop` would.
    temp = f"/tmp/raybm-head-{os.getpid()}"
    # Ray 2.60 clusters require a token (`ray start` writes it to ~/.ray/auth_token); the job
    # client below sends it as a bearer header, as `ray job submit` does with RAY_AUTH_MODE=token.
    env = dict(os.environ, RAY_DEDUP_LOGS="1", RAY_AUTH_MODE="token")
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
                    "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
    finally:
        stop_processes_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


def stop_processes_under(temp: str) -> None:
    """Stop the head's processes (those naming its temp dir) and all their descendants
    (workers and agents, whose command lines do not name it)."""
    found = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
    pids, frontier = set(map(int, found)), list(map(int, found))
    while frontier:
        kids = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout.split()
        for kid in map(int, kids):
            if kid not in pids:
                pids.add(kid)
                frontier.append(kid)
    pids.discard(os.getpid())
    for sig in (15, 9):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster-data") / "reviews.csv"
    make_frame(60).to_csv(path, index=False)
    return path


def job_config(tmp_path, data_csv, root, **extra) -> Path:
    """A tiny pipeline job: a 2-trial sweep, an ONNX export, the gate, Serve."""
    cfg = {
        "storage": {"root": str(root)},
        "data": {"source": str(data_csv), "text_column": "body", "label_column": "sentiment", "max_length": 16},
        "model": {"name": "tiny-bert"},
        "train": {"epochs": 2, "batch_size": 16, "warmup_ratio": 0, "cpus_per_worker": 0.5,
                  "log_every_steps": 100},
        "tune": {"num_samples": 1, "max_concurrent_trials": 1,
                 "search_space": {"train.lr": "grid([3e-3, 1e-6])"}},
        "export": {"variants": ["onnx"], "latency_samples": 10},
        "serve": {"port": free_port(), "backend": "auto", "batch_wait_timeout_s": 0.0},
        "pipeline": {"min_test_f1": 0.0, "max_latency_ms": 60000, "latency_samples": 5,
                     "smoke_texts": ["a great product, works perfectly"]},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(address: str, config: Path, *overrides: str, env_vars: dict | None = None, timeout: float = 600):
    """Submit jobs/pipeline.py as `ray job submit` does; wait; return (status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/pipeline.py --config {config} {' '.join(overrides)}",
        runtime_env={"working_dir": str(ROOT),
                     "excludes": [".git", ".venv", "results", "e2e-artifacts", ".pytest_cache", ".whl", ".gpu"],
                     "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}})
    deadline = time.time() + timeout
    status = client.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    if status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        client.stop_job(job)
    return status, logs


def post(url: str, texts: list[str]) -> dict:
    req = urllib.request.Request(f"{url}/predict", data=json.dumps({"texts": texts}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def only(folder: Path) -> Path:
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    assert len(children) == 1, children
    return children[0]


def test_pipeline_job_runs_every_stage_then_skips_them_and_the_gate_keeps_the_deployment(head, tmp_path, data_csv):
    address, _ = head
    root = tmp_path / "results"
    config = job_config(tmp_path, data_csv, root)
    status, logs = submit(address, config)
    assert status == "SUCCEEDED", logs[-3000:]

    summary = json.loads((only(root / "pipelines") / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["ray"] != "local (embedded)"
    stages = summary["stages"]
    assert list(stages) == ["data", "tune", "export", "deploy"]
    assert all(s["status"] == "done" for s in stages.values()), stages
    assert stages["tune"]["trials"] == 2 and stages["tune"]["test"]["examples"] > 0
    assert stages["tune"]["cost"]["params"] > 0 and stages["tune"]["cost"]["latency_p50_ms"] > 0
    sweep = only(root / "sweeps")
    assert (sweep / "_SUCCESS").is_file() and (sweep / "model" / "model.safetensors").is_file()
    exported = only(root / "exports")
    assert (exported / "onnx" / "model.onnx").is_file() and (exported / "summary.json").is_file()
    deploy = stages["deploy"]
    assert deploy["backend"] == "onnx" and deploy["model"].endswith("/onnx")
    assert deploy["smoke_test"][0]["label"] in ("neg", "pos")
    # On a cluster the deployment outlives the job that made it.
    answer = post(deploy["url"], ["a great product, works perfectly", "broken on arrival"])
    assert [p["label"] in ("neg", "pos") for p in answer["predictions"]] == [True, True]

    # The same job again, with a release gate this model cannot pass: every stage finds its
    # output and is skipped, the gate holds the deploy, and the running deployment stays.
    status, logs = submit(address, config, "pipeline.min_test_f1=0.999")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "release gate: NOT deploying - test macro-F1" in logs
    again = json.loads((only(root / "pipelines") / "summary.json").read_text())
    assert [s["status"] for s in again["stages"].values()] == ["skipped", "skipped", "skipped", "held"], \
        again["stages"]
    assert "pipeline.min_test_f1 0.999" in again["stages"]["deploy"]["reasons"][0]
    assert post(deploy["url"], ["still serving?"])["predictions"][0]["label"] in ("neg", "pos")
    serve_shutdown(address)


def serve_shutdown(address: str) -> None:
    """`serve shutdown`: frees the replica's CPU on this 2-CPU head for the next job."""
    subprocess.run([str(Path(sys.executable).with_name("serve")), "shutdown", "-a", address, "-y"], check=True,
                   env=dict(os.environ, RAY_AUTH_MODE="token"), capture_output=True, timeout=120)


def test_pipeline_job_on_s3_keeps_everything_in_the_bucket(head, s3_server, tmp_path, data_csv):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="raybm-cluster")
    address, _ = head
    config = job_config(tmp_path, data_csv, "s3://raybm-cluster/team", storage__s3_endpoint_url=s3_server)
    creds = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    status, logs = submit(address, config, env_vars=creds)
    assert status == "SUCCEEDED", logs[-3000:]

    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="raybm-cluster")
            for o in page.get("Contents", [])]
    assert any(k.startswith("team/data/") and k.endswith("/_SUCCESS") for k in keys)
    assert any(k.startswith("team/sweeps/") and "/trials/" in k and "checkpoint" in k for k in keys), keys[:20]
    assert any(k.startswith("team/sweeps/") and k.endswith("/leaderboard.json") for k in keys)
    assert any(k.startswith("team/sweeps/") and k.endswith("/model/model.safetensors") for k in keys)
    assert any(k.startswith("team/exports/") and k.endswith("/onnx/model.onnx") for k in keys)
    assert any(k.startswith("team/exports/") and k.endswith("/_SUCCESS") for k in keys)
    summary_key = next(k for k in keys if k.startswith("team/pipelines/") and k.endswith("/summary.json"))
    summary = json.loads(s3.get_object(Bucket="raybm-cluster", Key=summary_key)["Body"].read())
    assert summary["status"] == "succeeded"
    # Deployed from the bucket: the replica fetched the ONNX export itself.
    deploy = summary["stages"]["deploy"]
    assert deploy["status"] == "done" and deploy["model"].startswith("s3://raybm-cluster/team/exports/")
    assert post(deploy["url"], ["broken on arrival"])["predictions"][0]["label"] in ("neg", "pos")
    serve_shutdown(address)
    # Every output the job reports is in the bucket, none in a local folder.
    assert summary["root"] == "s3://raybm-cluster/team"
    assert summary["stages"]["data"]["path"].startswith("s3://raybm-cluster/team/data/")
    assert summary["stages"]["tune"]["model"].startswith("s3://raybm-cluster/team/sweeps/")
    assert summary["stages"]["tune"]["cost"]["size_mb"] > 0  # measured from checkpoints in the bucket
    assert summary["stages"]["export"]["folder"].startswith("s3://raybm-cluster/team/exports/")

    # The dashboard reads the same URI.
    from raybm.config import StorageConfig
    from raybm.dashboard_data import DashboardData

    board = DashboardData("s3://raybm-cluster/team",
                          StorageConfig(root="s3://raybm-cluster/team", s3_endpoint_url=s3_server))
    assert len(board.names("sweeps")) == 1
    assert [p["status"] for p in board.pipelines()] == ["succeeded"]


def test_bad_cluster_settings_fail_fast_before_any_work(s3_server, tmp_path, data_csv, monkeypatch, capsys):
    from raybm.cli import main

    config = job_config(tmp_path, data_csv, tmp_path / "results")
    started = time.time()
    assert main(["pipeline", "--config", str(config), f"ray.address=127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:" in capsys.readouterr().err
    assert main(["pipeline", "--config", str(config), "storage.root=s3://no-such-bucket/x",
                 f"storage.s3_endpoint_url={s3_server}"]) == 2
    assert "S3 bucket 'no-such-bucket' not found" in capsys.readouterr().err
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["pipeline", "--config", str(config), "storage.root=s3://raybm-cluster/x",
                 f"storage.s3_endpoint_url={s3_server}"]) == 2
    assert "no AWS credentials for storage.root='s3://raybm-cluster/x'" in capsys.readouterr().err
    assert time.time() - started < 30
    assert not (tmp_path / "results").exists()
    import ray

    assert not ray.is_initialized()  # nothing started
    shutil.rmtree(tmp_path, ignore_errors=True)
