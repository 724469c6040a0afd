"""Fixtures of the multi-node tests: one 3-node cluster (head with no CPUs, two 1-CPU
worker nodes, each node with its own private disk) and moto's S3 server, shared by the
whole module; helpers to submit jobs to it as `ray job submit` does."""

import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.local_cluster import LocalCluster, free_port

ROOT = Path(__file__).resolve().parents[2]
NODE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head and two worker nodes; the nodes' AWS credentials come from their own
    environment (as from an instance profile), not from any job."""
    workdir = Path(f"/tmp/raybm-mn-{os.getpid()}")
    c = LocalCluster(workdir, worker_cpus=(1, 1), env=NODE_CREDENTIALS)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")  # this process's Ray clients; restored after the module
        env.setenv("RAY_AUTH_TOKEN", c.token)
        try:
            c.start()
            c.use_as_client()
            yield c
        finally:
            c.stop()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def bucket(s3_server):
    """An empty bucket on the S3 server; yields (boto3 client, bucket name)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="raybm-mn")
    return s3, "raybm-mn"


def s3_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    """Every key under ``prefix``."""
    return [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]


def write_job(folder: Path, cfg: dict) -> Path:
    """A job config file the driver (on the head) reads."""
    path = folder / f"job-{time.time_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def client(cluster: LocalCluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})


def start_job(
    cluster: LocalCluster, entrypoint: str, config: Path, *overrides: str, env_vars: dict | None = None
) -> str:
    """Submit ``python jobs/<entrypoint>.py --config ...`` with this checkout as working_dir."""
    return client(cluster).submit_job(
        entrypoint=shlex.join([sys.executable, f"jobs/{entrypoint}.py", "--config", str(config), *overrides]),
        runtime_env={
            "working_dir": str(ROOT),
            "excludes": [".git", ".venv", "results", "e2e-artifacts", ".pytest_cache", ".whl", ".gpu", "demo-results"],
            "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_vars or {})},
        },
    )


def wait_job(cluster: LocalCluster, job: str, timeout: float = 600) -> tuple[str, str]:
    """Wait for a job to end; (status, logs). A job still running at the deadline is stopped."""
    c = client(cluster)
    deadline = time.time() + timeout
    status = str(c.get_job_status(job))
    while status not in FINAL and time.time() < deadline:
        time.sleep(2)
        status = str(c.get_job_status(job))
    logs = c.get_job_logs(job)
    if status not in FINAL:
        c.stop_job(job)
    return status, logs


def run_job(
    cluster: LocalCluster,
    entrypoint: str,
    config: Path,
    *overrides: str,
    timeout: float = 600,
    env_vars: dict | None = None,
) -> tuple[str, str]:
    """Submit a job and wait for it; (status, logs)."""
    return wait_job(cluster, start_job(cluster, entrypoint, config, *overrides, env_vars=env_vars), timeout)


__all__ = ["free_port", "run_job", "start_job", "wait_job", "write_job", "s3_keys", "client"]
