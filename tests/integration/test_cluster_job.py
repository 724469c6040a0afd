"""Wrong cluster settings fail in seconds, before Ray starts or any work: an unreachable
cluster, a missing bucket, no AWS credentials.

The cluster path itself (the pipeline job submitted through Ray's job API to a multi-node
cluster, S3 storage, the release gate holding a deploy, nodes lost) is tested in
tests/cluster/test_multinode.py.
"""

import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.local_cluster import free_port
from tests.helpers import make_frame

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster-data") / "reviews.csv"
    make_frame(60).to_csv(path, index=False)
    return path


def job_config(tmp_path, data_csv, root) -> Path:
    """A tiny pipeline job: a 2-trial sweep, an ONNX export, the gate, Serve."""
    cfg = {
        "storage": {"root": str(root)},
        "data": {"source": str(data_csv), "text_column": "body", "label_column": "sentiment", "max_length": 16},
        "model": {"name": "tiny-bert"},
        "train": {"epochs": 2, "batch_size": 16, "warmup_ratio": 0, "cpus_per_worker": 0.5, "log_every_steps": 100},
        "tune": {"num_samples": 1, "max_concurrent_trials": 1, "search_space": {"train.lr": "grid([3e-3, 1e-6])"}},
        "export": {"variants": ["onnx"], "latency_samples": 10},
        "serve": {"port": free_port(), "backend": "auto", "batch_wait_timeout_s": 0.0},
        "pipeline": {
            "min_test_f1": 0.0,
            "max_latency_ms": 60000,
            "latency_samples": 5,
            "smoke_texts": ["a great product, works perfectly"],
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_cluster_settings_fail_fast_before_any_work(s3_server, tmp_path, data_csv, monkeypatch, capsys):
    from raybm.cli import main

    config = job_config(tmp_path, data_csv, tmp_path / "results")
    started = time.time()
    assert main(["pipeline", "--config", str(config), f"ray.address=127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:" in capsys.readouterr().err
    assert (
        main(
            [
                "pipeline",
                "--config",
                str(config),
                "storage.root=s3://no-such-bucket/x",
                f"storage.s3_endpoint_url={s3_server}",
            ]
        )
        == 2
    )
    assert "S3 bucket 'no-such-bucket' not found" in capsys.readouterr().err
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert (
        main(
            [
                "pipeline",
                "--config",
                str(config),
                "storage.root=s3://raybm-cluster/x",
                f"storage.s3_endpoint_url={s3_server}",
            ]
        )
        == 2
    )
    assert "no AWS credentials for storage.root='s3://raybm-cluster/x'" in capsys.readouterr().err
    assert time.time() - started < 30
    assert not (tmp_path / "results").exists()
    import ray

    assert not ray.is_initialized()  # nothing started
    shutil.rmtree(tmp_path, ignore_errors=True)
