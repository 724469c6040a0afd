"""The checks of tracking.mlflow_uri before Ray starts (no server needed: nothing answers)."""

import socket

import pytest

from raybm.config import build_config
from raybm.errors import RaybmError
from raybm.tracking import check_tracking, flat_params, log_run, run_metrics


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens


def test_a_tracking_server_that_does_not_answer_fails_fast_unless_not_required(capsys):
    url = dead_url()
    with pytest.raises(RaybmError, match="does not answer .*tracking.required=false"):
        check_tracking(build_config(overrides=[f"tracking.mlflow_uri={url}"]).tracking)
    cfg = build_config(overrides=[f"tracking.mlflow_uri={url}", "tracking.required=false"])
    check_tracking(cfg.tracking)  # says so once, and the job goes on without MLflow
    assert "going on without MLflow" in capsys.readouterr().err
    assert log_run(cfg, "r", "run", [], None, {}) is None
    with pytest.raises(RaybmError, match="give an http"):
        check_tracking(build_config(overrides=["tracking.mlflow_uri=ftp://x"]).tracking)
    with pytest.raises(RaybmError, match="not a folder this job can write"):
        check_tracking(build_config(overrides=["tracking.mlflow_uri=file:///no/such/folder/mlruns"]).tracking)


def test_params_are_the_resolved_config_and_metrics_carry_their_steps():
    params = flat_params(build_config(overrides=["train.lr=0.003", "model.name=tiny-bert"]))
    assert params["train.lr"] == "0.003" and params["model.name"] == "tiny-bert" and "tracking.mlflow_uri" in params
    history = [
        {
            "epoch": 1,
            "train_loss": 0.6,
            "val_f1_macro": 0.5,
            "steps": [[10, 0.7, 1e-3], [20, 0.5, 9e-4]],
            "finished_at": 100.0,
        },
        {"epoch": 2, "train_loss": 0.4, "val_f1_macro": 0.8, "steps": [[30, 0.4, 5e-4]], "finished_at": 200.0},
    ]
    got = {(k, step): v for k, v, _, step in run_metrics(history, {"accuracy": 0.9, "per_class": {}})}
    assert got[("val_f1_macro", 2)] == 0.8 and got[("step_loss", 20)] == 0.5 and got[("step_lr", 30)] == 5e-4
    assert got[("test_accuracy", 0)] == 0.9 and not any(k == "test_per_class" for k, _ in got)


def test_a_file_store_records_runs(tmp_path, monkeypatch):
    # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked;
    # tracking.mlflow_uri=file:... asks.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = build_config(overrides=[f"tracking.mlflow_uri=file://{tmp_path}/mlruns", "model.name=tiny-bert"])
    check_tracking(cfg.tracking)
    run_id = log_run(
        cfg,
        "r1",
        "run",
        [{"epoch": 1, "val_f1_macro": 0.5}],
        {"accuracy": 0.9},
        {"notes.txt": "hi"},
        tags={"raybm.results": "/x/runs/r1"},
    )
    assert run_id is not None
    from raybm.tracking import mlflow_client

    run = mlflow_client(cfg.tracking).get_run(run_id)
    assert run.data.params["model.name"] == "tiny-bert" and run.data.metrics["test_accuracy"] == 0.9
    assert run.data.tags["raybm.results"] == "/x/runs/r1" and run.info.status == "FINISHED"
