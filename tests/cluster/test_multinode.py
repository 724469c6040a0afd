"""raybm on a 3-node cluster whose nodes share no disk: the head (no CPUs for work) and two
1-CPU worker nodes, each in its own mount namespace, with moto's S3 server as the only
shared storage and token auth on. Every job goes in through Ray's job API, as
`ray job submit` sends it. See tests/cluster/local_cluster.py and docs/cluster.md.
"""

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import running_mlflow_server
from tests.integration.test_data_pipeline import make_frame

from .conftest import ROOT, free_port, run_job, s3_keys, wait_job, write_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_uri(bucket):
    """The tiny labelled CSV, in the bucket (a local file would be on one node only)."""
    s3, name = bucket
    s3.put_object(Bucket=name, Key="input/reviews.csv", Body=make_frame(60).to_csv(index=False).encode())
    return f"s3://{name}/input/reviews.csv"


@pytest.fixture(scope="module")
def mlflow_on_s3(bucket, s3_server, tmp_path_factory):
    """A real MLflow tracking server whose artifacts go to the test bucket (``mlflow/``):
    the jobs reach it over HTTP and need none of its S3 keys."""
    _, name = bucket
    with running_mlflow_server(
        tmp_path_factory.mktemp("mlflow"), f"s3://{name}/mlflow", {"MLFLOW_S3_ENDPOINT_URL": s3_server}
    ) as url:
        yield url


def base_config(s3_server, data_uri, root: str) -> dict:
    return {
        "storage": {"root": root, "s3_endpoint_url": s3_server},
        "data": {"source": data_uri, "text_column": "body", "label_column": "sentiment", "max_length": 16},
        "model": {"name": "tiny-bert"},
        "train": {"epochs": 2, "batch_size": 16, "warmup_ratio": 0, "cpus_per_worker": 1, "log_every_steps": 100},
    }


def post(url: str, texts: list[str], timeout: float = 30) -> dict:
    req = urllib.request.Request(
        f"{url}/predict", data=json.dumps({"texts": texts}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def check_mlflow(url: str, summary: dict, artifact_keys: list[str]) -> None:
    """What the pipeline job recorded in MLflow (see the test below)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url, registry_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("raybm.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.run_name == summary["stages"]["tune"]["sweep"], runs
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    assert len(children) == 2 and all(r.data.tags["raybm.kind"] == "trial" for r in children)
    registered = summary["registered"]
    assert registered["version"] == 1 and registered["uri"] == f"models:/{registered['name']}/1", registered
    version = client.get_model_version(registered["name"], "1")
    assert version.run_id == sweeps[0].info.run_id and version.tags["raybm.exports"] == "onnx"
    assert float(version.tags["test_f1_macro"]) == summary["stages"]["tune"]["test"]["f1_macro"]
    assert any(k.endswith("/artifacts/model/model.safetensors") for k in artifact_keys), artifact_keys
    assert any("/artifacts/exports/onnx/" in k for k in artifact_keys), artifact_keys


@pytest.fixture
def serve_freed(cluster):
    """Serve shut down after the test, passed or not: its replicas' CPUs go back for the next."""
    yield
    serve_shutdown(cluster)


def test_pipeline_sweeps_on_both_nodes_and_serves_two_replicas_from_s3(
    cluster, bucket, s3_server, data_uri, tmp_path, serve_freed, mlflow_on_s3
):
    s3, name = bucket
    cfg = base_config(s3_server, data_uri, f"s3://{name}/team")
    cfg.update(
        {
            "tune": {"num_samples": 1, "scheduler": "fifo", "search_space": {"train.lr": "grid([3e-3, 1e-6])"}},
            "export": {"variants": ["onnx"], "latency_samples": 10},
            "serve": {
                "port": free_port(),
                "backend": "auto",
                "num_replicas": 2,
                "cpus_per_replica": 0.25,
                "batch_wait_timeout_s": 0.0,
                "proxy_location": "HeadOnly",
            },
            "pipeline": {
                "min_test_f1": 0.0,
                "max_latency_ms": 60000,
                "latency_samples": 5,
                "smoke_texts": ["a great product, works perfectly"],
            },
            "tracking": {"mlflow_uri": mlflow_on_s3, "experiment": "cluster"},
        }
    )
    started = time.time()
    config = write_job(tmp_path, cfg)
    status, logs = run_job(cluster, "pipeline", config)
    assert status == "SUCCEEDED", logs[-4000:]
    print(f"pipeline job: {time.time() - started:.0f} s")
    keys = s3_keys(s3, name, "team/")
    summary_key = next(k for k in keys if k.startswith("team/pipelines/") and k.endswith("/summary.json"))
    summary = json.loads(s3.get_object(Bucket=name, Key=summary_key)["Body"].read())
    assert summary["status"] == "succeeded", summary
    stages = summary["stages"]
    assert [s["status"] for s in stages.values()] == ["done"] * 4, stages
    assert stages["tune"]["model"].startswith(f"s3://{name}/team/sweeps/")

    # The two trials ran at once, one on each worker node.
    board_key = next(k for k in keys if k.endswith("/leaderboard.json"))
    board = json.loads(s3.get_object(Bucket=name, Key=board_key)["Body"].read())
    assert len(board) == 2 and all(row["status"] == "completed" for row in board), board
    workers = {n["node_id"] for n in cluster_nodes(cluster) if n["cpus"]}
    (a,), (b,) = (row["worker_nodes"] for row in board)
    assert {a, b} == workers, (a, b, workers)
    # Overlapping in time: the later trial's trainable (its worker group, model load, data)
    # was already running when the earlier one finished. Its first epoch need not be: a
    # tiny epoch can end before the other node has loaded its model.
    first, second = sorted(board, key=lambda row: row["finished_at"])
    second_began = second["finished_at"] - second["seconds"] - 0.1  # "seconds" is rounded to 0.1
    assert second_began < first["finished_at"], board
    # Each trial trained in its own process (one worker: tune.trial_runner=auto), so Tune
    # kept its checkpoints, on S3, in its trial folder.
    assert any("/tune/" in k and "/checkpoint_" in k for k in keys)

    # Two replicas on two nodes, each with the model it fetched from the bucket; both answer.
    deploy = stages["deploy"]
    assert deploy["model"].startswith(f"s3://{name}/team/exports/") and deploy["backend"] == "onnx"
    replicas = serve_replicas(cluster)
    assert len(replicas) == 2 and len({r.node_id for r in replicas}) == 2, replicas
    answered = {get_json(f"{deploy['url']}/healthz")["replica"] for _ in range(40)}
    assert len(answered) == 2, answered
    answer = post(deploy["url"], ["a great product, works perfectly", "broken on arrival"])
    assert [p["label"] in ("neg", "pos") for p in answer["predictions"]] == [True, True]

    # MLflow: the sweep a parent run with a child per trial, the winner a registered version
    # with its export beside it, their files in the bucket (through the tracking server).
    check_mlflow(mlflow_on_s3, summary, s3_keys(s3, name, "mlflow/"))
    predicted = subprocess.run(
        [
            str(Path(sys.executable).with_name("raybm")),
            "predict",
            "--model",
            summary["registered"]["uri"],
            "--text",
            "a great product",
            f"storage.root=s3://{name}/team",
            f"storage.s3_endpoint_url={s3_server}",
            f"tracking.mlflow_uri={mlflow_on_s3}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0 and "a great product" in predicted.stdout, predicted.stdout + predicted.stderr
    assert any(
        k.startswith(f"team/registry/{summary['registered']['name']}-v1/model/") for k in s3_keys(s3, name, "team/")
    )

    # The results are readable from anywhere that reaches the bucket: `raybm list`, the dashboard.
    listed = subprocess.run(
        [
            str(Path(sys.executable).with_name("raybm")),
            "list",
            "--root",
            f"s3://{name}/team",
            f"storage.s3_endpoint_url={s3_server}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and stages["tune"]["sweep"] in listed.stdout, listed.stdout + listed.stderr
    from raybm.config import StorageConfig
    from raybm.dashboard.data import DashboardData

    board_view = DashboardData(f"s3://{name}/team", StorageConfig(root=f"s3://{name}/team", s3_endpoint_url=s3_server))
    assert [p.status for p in board_view.pipelines()] == ["succeeded"]

    # The same job again with a release gate this model cannot pass: every stage finds its
    # output in the bucket and is skipped, the gate holds the deploy, the deployment stays.
    # (A tiny model can score a perfect test macro-F1, which no score gate holds: then a
    # latency gate no model meets.)
    perfect = stages["tune"]["test"]["f1_macro"] >= 1.0
    gate = "pipeline.max_latency_ms=0.01" if perfect else "pipeline.min_test_f1=1.0"
    status, logs = run_job(cluster, "pipeline", config, gate, timeout=240)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "release gate: NOT deploying - " in logs, logs[-3000:]
    again = json.loads(s3.get_object(Bucket=name, Key=summary_key)["Body"].read())
    assert [s["status"] for s in again["stages"].values()] == ["skipped", "skipped", "skipped", "held"], again
    said = "pipeline.max_latency_ms 0.01" if perfect else "pipeline.min_test_f1 1.0"
    assert said in again["stages"]["deploy"]["reasons"][0], again["stages"]["deploy"]
    assert again["registered"] == summary["registered"] and "(already)" in logs  # no second version

    # A second job serves a model beside the first (its own application and route) instead
    # of replacing it; one that asks Serve for another port is refused before anything is.
    status, logs = run_job(
        cluster, "pipeline", config, "serve.app_name=second-job", "serve.num_replicas=1", timeout=300
    )
    assert status == "SUCCEEDED", logs[-3000:]
    second_url = deploy["url"].rsplit("/", 1)[0] + "/second-job"
    assert f"served at {second_url}/predict" in logs, logs[-3000:]
    for url in (deploy["url"], second_url):
        assert [p["label"] in ("neg", "pos") for p in post(url, ["fine"])["predictions"]] == [True], url
    status, logs = run_job(
        cluster, "pipeline", config, f"serve.port={free_port()}", "serve.app_name=third-job", timeout=300
    )
    assert status == "FAILED" and f"already listens on 127.0.0.1:{cfg['serve']['port']}" in logs, logs[-3000:]
    assert len(serve_replicas(cluster, "second-job")) == 1 and not serve_replicas(cluster, "third-job")
    status, logs = run_job(cluster, "serve", config, "--list", timeout=120)
    assert status == "SUCCEEDED" and f"{second_url}" in logs and deploy["url"] in logs, logs[-2000:]
    status, logs = run_job(cluster, "serve", config, "--stop", "second-job", timeout=120)
    assert status == "SUCCEEDED" and "Stopped 'second-job'" in logs, logs[-2000:]
    deadline = time.time() + 60
    while time.time() < deadline and serve_replicas(cluster, "second-job"):
        time.sleep(1)
    assert not serve_replicas(cluster, "second-job") and len(serve_replicas(cluster)) == 2

    # A worker node with a replica disappears while requests flow: the other replica keeps
    # answering, and Serve starts a second replica again.
    lost = next(w for w in cluster.workers if any(r.node_id == node_id_of(cluster, w) for r in replicas))
    outcomes = RequestLoop(deploy["url"]).start()
    time.sleep(3)
    killed_at = time.time()
    cluster.kill_worker(lost)
    time.sleep(15)
    window = outcomes.stop()
    failed = [o for o in window if not o[1] and o[0] >= killed_at]
    after = [o for o in window if o[0] >= killed_at + 10]
    print(f"node lost under load: {len(window)} requests, {len(failed)} failed after the kill")
    assert after and all(ok for _, ok in after), after  # the survivor answers everything
    assert len(failed) <= 10, failed
    deadline = time.time() + 90
    while time.time() < deadline and len(serve_replicas(cluster)) < 2:
        time.sleep(2)
    print(f"second replica back {time.time() - killed_at:.1f} s after the node was lost")
    assert len(serve_replicas(cluster)) == 2
    cluster.add_worker(1, name=lost.name)  # the node comes back for the next tests
    cluster.wait_for_nodes(3)


def node_id_of(cluster, worker) -> str:
    """The Ray node id of one of the fixture's worker nodes (by its custom resource)."""
    return next(n.node_id for n in cluster.alive_nodes() if f"node:{worker.name}" in n.resources_total)


class RequestLoop:
    """POST /predict back to back in a thread; records (time, succeeded) per request."""

    def __init__(self, url: str):
        import threading

        self.url, self.outcomes, self.done = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            at = time.time()
            try:
                ok = post(self.url, ["still there?"], timeout=10)["predictions"][0]["label"] in ("neg", "pos")
            except Exception:  # noqa: BLE001 - any failure counts
                ok = False
                time.sleep(0.2)
            self.outcomes.append((at, ok))

    def start(self) -> "RequestLoop":
        self.thread.start()
        return self

    def stop(self) -> list[tuple[float, bool]]:
        self.done.set()
        self.thread.join(30)
        return self.outcomes


def cluster_nodes(cluster) -> list[dict]:
    """Alive nodes: id and CPUs."""
    return [{"node_id": n.node_id, "cpus": n.resources_total.get("CPU", 0)} for n in cluster.alive_nodes()]


def serve_replicas(cluster, app: str | None = None) -> list:
    """The alive model replicas of every raybm application, or of ``app`` (state API over
    HTTP; the Stats replicas aside). Serve names them ServeReplica:<app>:ModelServer."""
    from ray.util.state import list_actors

    return [
        a
        for a in list_actors(
            address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False
        )
        if a.class_name.startswith("ServeReplica:")
        and a.class_name.endswith(":ModelServer")
        and (app is None or a.class_name == f"ServeReplica:{app}:ModelServer")
    ]


def serve_shutdown(cluster) -> None:
    """`serve shutdown`: frees the replicas' CPUs for the next test."""
    subprocess.run(
        [str(Path(sys.executable).with_name("serve")), "shutdown", "-a", cluster.address, "-y"],
        check=True,
        env=dict(os.environ, **cluster.client_env()),
        capture_output=True,
        timeout=120,
    )


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_local_paths_the_other_nodes_cannot_see_are_refused_before_any_work(cluster, s3_server, data_uri, tmp_path):
    local_data = tmp_path / "reviews.csv"
    make_frame(20).to_csv(local_data, index=False)
    cases = [
        ({"storage": {"root": str(tmp_path / "results")}}, "storage.root="),
        ({"data": {"source": str(local_data)}}, "data.source="),
    ]
    for change, setting in cases:
        cfg = base_config(s3_server, data_uri, "s3://raybm-mn/refused")
        for section, values in change.items():
            cfg[section].update(values)
        started = time.time()
        status, logs = run_job(cluster, "train", write_job(tmp_path, cfg), timeout=120)
        assert status == "FAILED", logs[-3000:]
        assert f"raybm train: error: {setting}" in logs and "this Ray cluster has 3 nodes" in logs, logs[-3000:]
        assert time.time() - started < 60
    assert not (tmp_path / "results").exists()


def test_predict_and_evaluate_refuse_a_model_only_the_driver_can_see(
    cluster, s3_server, data_uri, tmp_path, tiny_model_dir
):
    """Ray Data labels and scores on any node: a model folder (or an input file) on the
    driver's disk alone is refused before any work, naming the flag."""
    from tests.cluster.conftest import client

    config = write_job(tmp_path, base_config(s3_server, data_uri, "s3://raybm-mn/refused"))
    local_input = tmp_path / "to-label.csv"
    make_frame(10).to_csv(local_input, index=False)
    cli = [sys.executable, "-m", "raybm.cli"]
    cases = [
        (
            [*cli, "evaluate", "--checkpoint", tiny_model_dir, "--data", data_uri, "--config", str(config)],
            "raybm evaluate: error: --checkpoint=",
        ),
        (
            [
                *cli,
                "predict",
                "--model",
                tiny_model_dir,
                "--input",
                str(local_input),
                "--output",
                str(tmp_path / "out.csv"),
                "--text-column",
                "body",
                "--ray",
                "--config",
                str(config),
            ],
            "raybm predict: error: --model=",
        ),
    ]
    for entrypoint, said in cases:
        job = client(cluster).submit_job(
            entrypoint=shlex.join(entrypoint),
            runtime_env={
                "working_dir": str(ROOT),
                "excludes": [".git", ".venv", "results", ".pytest_cache"],
                "env_vars": {"HF_HUB_OFFLINE": "1"},
            },
        )
        status, logs = wait_job(cluster, job, timeout=120)
        assert status == "FAILED", logs[-3000:]
        assert said in logs and "this Ray cluster has 3 nodes" in logs, logs[-3000:]
    assert not (tmp_path / "out.csv").exists()


def test_workers_no_node_can_hold_fail_fast_naming_the_setting(cluster, s3_server, data_uri, tmp_path):
    cfg = base_config(s3_server, data_uri, "s3://raybm-mn/unplaceable")
    for overrides, expected in [
        (
            ["train.cpus_per_worker=2"],
            "needs 2 CPU per worker, but the largest node has 1 (nodes: 3 node(s) with 0, 1, 1 CPU)",
        ),
        (["train.num_workers=3"], "needs 3 x (1 CPU) placed at once, more than the nodes hold"),
    ]:
        started = time.time()
        status, logs = run_job(cluster, "train", write_job(tmp_path, cfg), *overrides, timeout=120)
        assert status == "FAILED" and expected in logs, logs[-3000:]
        assert "Lower train.cpus_per_worker" in logs and time.time() - started < 60
    # GPUs a cluster may add later (train.use_gpu=yes) are waited for, but only for
    # train.placement_timeout_s: then one clear error instead of retrying forever.
    started = time.time()
    status, logs = run_job(
        cluster, "train", write_job(tmp_path, cfg), "train.use_gpu=yes", "train.placement_timeout_s=10", timeout=240
    )
    assert status == "FAILED", logs[-3000:]
    assert "could not be placed within train.placement_timeout_s=10 s" in logs, logs[-3000:]
    assert time.time() - started < 120
    assert not placement_groups(cluster, "CREATED")  # nothing left holding the cluster


def placement_groups(cluster, state: str | None = None) -> list:
    from ray.util.state import list_placement_groups

    found = list_placement_groups(address=cluster.address, limit=1000, raise_on_missing_output=False)
    return [pg for pg in found if state is None or pg.state == state]


@pytest.mark.cluster_long
def test_a_stopped_sweep_frees_the_cluster_and_the_same_job_resumes_it(cluster, bucket, s3_server, data_uri, tmp_path):
    from tests.cluster.conftest import client, start_job

    s3, name = bucket
    cfg = base_config(s3_server, data_uri, f"s3://{name}/stopped")
    cfg["train"].update(epochs=8, batch_size=4)
    cfg["tune"] = {"num_samples": 1, "scheduler": "fifo", "search_space": {"train.lr": "grid([1e-3, 1e-4])"}}
    cfg["pipeline"] = {"stages": ["data", "tune"]}
    config = write_job(tmp_path, cfg)
    job = start_job(cluster, "pipeline", config)
    deadline = time.time() + 180
    # Each trial with an epoch in the results Tune's driver synced to S3: that sync also
    # carried its experiment state, with the epoch's checkpoint on record (a checkpoint on S3
    # that the record does not name yet is lost with the driver: Tune snapshots its state
    # every 10 s, and at every `keep_checkpoints`-th checkpoint of a trial).
    while time.time() < deadline and len(trials_with_synced_epochs(s3, name, "stopped/sweeps/")) < 2:
        time.sleep(1)
    assert len(placement_groups(cluster, "CREATED")) >= 2, client(cluster).get_job_logs(job)[
        -3000:
    ]  # trials and workers
    stopped_at = time.time()
    client(cluster).stop_job(job)  # mid-trial: the driver is killed
    while time.time() < stopped_at + 120 and (placement_groups(cluster, "CREATED") or busy_cpus(cluster)):
        time.sleep(1)
    print(f"stopped sweep: every CPU free {time.time() - stopped_at:.1f} s after the stop")
    assert not placement_groups(cluster, "CREATED") and not busy_cpus(cluster), [
        (pg.placement_group_id, pg.state) for pg in placement_groups(cluster)
    ]
    # The same submit line again: the next job gets the whole cluster (both trials at once,
    # one 1-CPU worker each) and the sweep resumes from its checkpoints on S3.
    status, logs = run_job(cluster, "pipeline", config, timeout=400)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "Resuming sweep" in logs
    board = json.loads(
        s3.get_object(
            Bucket=name, Key=next(k for k in s3_keys(s3, name, "stopped/sweeps/") if k.endswith("/leaderboard.json"))
        )["Body"].read()
    )
    assert [row["status"] for row in board] == ["completed", "completed"]
    # A trial that had finished before the stop keeps its record; every other one trained
    # on from a checkpoint, not from the start (on a fast machine the first trial can end
    # all its epochs while the second one writes its second checkpoint).
    for row in board:
        print(
            f"trial {row['trial']}: epochs ended at "
            f"{[round(h['finished_at'] - stopped_at, 1) for h in row['history']]} s from the stop, "
            f"resumed from {[h['resumed_from_epoch'] for h in row['history']]}"
        )
    unfinished = [row for row in board if row["history"][-1]["finished_at"] > stopped_at]
    assert unfinished, [(row["trial"], row["history"][-1]["finished_at"], stopped_at) for row in board]
    for row in board:
        assert [h["epoch"] for h in row["history"]] == list(range(1, 9))
    for row in unfinished:
        assert row["history"][-1]["resumed_from_epoch"] >= 1, row["history"]  # from a checkpoint


def busy_cpus(cluster) -> float:
    """CPUs held cluster-wide, as `ray status` reports them ("used/total CPU")."""
    out = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "status", f"--address={cluster.gcs_address}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, **cluster.client_env()),
        timeout=60,
    ).stdout
    import re

    for line in out.splitlines():
        found = re.match(r"\s*([\d.]+)/([\d.]+) CPU\b", line)
        if found:
            return float(found.group(1))
    raise AssertionError(f"no CPU line in `ray status`:\n{out}")


def test_a_joining_driver_trains_two_ddp_ranks_on_two_nodes_with_no_credentials_in_ray(
    cluster, bucket, s3_server, data_uri, tmp_path
):
    """A driver run by hand against the cluster (here: started on the head, as its own Ray
    job, with keys in its shell) trains 2 DDP workers, one on each worker node, with the
    nodes' own credentials: checkpoints and model land in the bucket, and Ray's job records,
    which its dashboard shows, hold no key."""
    from tests.cluster.conftest import client

    s3, name = bucket
    cfg = base_config(s3_server, data_uri, f"s3://{name}/ddp")
    cfg["train"].update(epochs=1, num_workers=2, cpus_per_worker=1)
    config = write_job(tmp_path, cfg)
    secret = "shell-secret-0d5e8a"
    script = tmp_path / "driver.sh"  # the user's shell: keys exported, then raybm
    script.write_text(
        f"unset RAY_JOB_CONFIG_JSON_ENV_VAR\nexport AWS_SECRET_ACCESS_KEY={secret} "
        f"AWS_ACCESS_KEY_ID=shell-key-id\n"
        f"exec {shlex.join([sys.executable, 'jobs/train.py', '--config', str(config)])}\n"
    )
    job = client(cluster).submit_job(
        entrypoint=f"sh {script}",
        runtime_env={"working_dir": str(ROOT), "excludes": [".git", ".venv", "results", ".pytest_cache"]},
    )
    status, logs = wait_job(cluster, job, timeout=300)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "raybm: running on the Ray cluster at" in logs
    jobs = client(cluster).list_jobs()
    assert len(jobs) >= 2  # the submitted job and the driver it started
    records = json.dumps([j.dict() if hasattr(j, "dict") else vars(j) for j in jobs], default=str)
    assert "TOKENIZERS_PARALLELISM" in records  # the driver's runtime env is in the records...
    assert secret not in records and "shell-key-id" not in records  # ...with no key in it

    keys = s3_keys(s3, name, "ddp/runs/")
    metrics = json.loads(
        s3.get_object(Bucket=name, Key=next(k for k in keys if k.endswith("/metrics.json")))["Body"].read()
    )
    workers = {n["node_id"] for n in cluster_nodes(cluster) if n["cpus"]}
    assert len(metrics["worker_nodes"]) == 2 and set(metrics["worker_nodes"]) == workers, metrics["worker_nodes"]
    assert any("/checkpoint_" in k for k in keys)
    assert any(k.endswith("/model/model.safetensors") for k in keys) and any(
        k.endswith("/model/_SUCCESS") for k in keys
    )
    assert metrics["test"]["examples"] > 0


@pytest.mark.cluster_long
def test_a_lost_worker_node_costs_a_checkpoint_not_the_sweep(cluster, bucket, s3_server, data_uri, tmp_path):
    from tests.cluster.conftest import start_job

    s3, name = bucket
    cfg = base_config(s3_server, data_uri, f"s3://{name}/node-loss")
    cfg["train"].update(epochs=8, batch_size=4, max_failures=3)
    cfg["tune"] = {
        "num_samples": 1,
        "scheduler": "fifo",
        "max_failures": 3,
        "search_space": {"train.lr": "grid([1e-3, 1e-4])"},
    }
    job = start_job(cluster, "tune", write_job(tmp_path, cfg))
    # Both trials running, each with a checkpoint that Tune has on record: then worker-b
    # disappears. A checkpoint folder is on S3 from its first uploaded file on, before the
    # epoch is reported, so the wait is for each trial's second checkpoint: its first one is
    # then complete and reported (a node killed while the first one was uploading restarts
    # that trial from scratch, and it never read as having run on the lost node).
    deadline = time.time() + 240
    while time.time() < deadline:
        trials = trials_with_checkpoints(s3_keys(s3, name, "node-loss/sweeps/"), at_least=2)
        if len(trials) == 2:
            break
        time.sleep(1)
    assert len(trials) == 2, s3_keys(s3, name, "node-loss/")[:30]
    lost = cluster.workers[-1]
    lost_id = node_id_of(cluster, lost)
    killed_at = time.time()
    cluster.kill_worker(lost)
    status, logs = wait_job(cluster, job, timeout=480)
    cluster.add_worker(1, name=lost.name)
    assert status == "SUCCEEDED", logs[-5000:]
    board = json.loads(
        s3.get_object(
            Bucket=name, Key=next(k for k in s3_keys(s3, name, "node-loss/sweeps/") if k.endswith("/leaderboard.json"))
        )["Body"].read()
    )
    assert len(board) == 2 and all(row["status"] == "completed" for row in board), board
    # The trial that ran on the lost node resumed from its last checkpoint on the other
    # node. The other trial's workers ran on the node that stayed, but its own actor (and
    # Ray Train's controller, which Ray places beside it) may have been on the lost one:
    # then it restarted too, from its last checkpoint, never from scratch.
    moved = [row for row in board if lost_id in row["history"][0]["worker_nodes"]]
    assert len(moved) == 1, (lost_id, board)  # one trial a node: each node has one CPU
    moved = moved[0]
    assert lost_id not in moved["history"][-1]["worker_nodes"], "the node was lost after its trial had finished"
    assert [h["epoch"] for h in moved["history"]] == list(range(1, 9)), moved["history"]
    resumed = next(h for h in moved["history"] if lost_id not in h["worker_nodes"])
    assert resumed["resumed_from_epoch"] >= 1, moved["history"]  # from a checkpoint, not from scratch
    finished_epochs = resumed["resumed_from_epoch"]
    print(
        f"trial {moved['trial']} resumed from epoch {finished_epochs} on the other node "
        f"{resumed['started_at'] - killed_at:.0f} s after its node was lost (the other trial held that node "
        f"until {other_finished(board, moved) - killed_at:.0f} s); sweep done {time.time() - killed_at:.0f} s after"
    )
    other = next(row for row in board if row is not moved)
    assert all(lost_id not in h["worker_nodes"] for h in other["history"]), other["history"]
    assert [h["epoch"] for h in other["history"]] == list(range(1, 9)), other["history"]
    restarts = [h["resumed_from_epoch"] for h in other["history"] if h["resumed_from_epoch"]]
    assert len(set(restarts)) <= 1, other["history"]  # one restart at most, from a checkpoint
    assert other["history"][0]["started_at"] < killed_at, other["history"]  # not from scratch
    print(f"the other trial {'restarted from epoch ' + str(restarts[0]) if restarts else 'ran on undisturbed'}")
    cluster.wait_for_nodes(3)


def trials_with_checkpoints(keys: list[str], at_least: int) -> set[str]:
    """The sweep trials with ``at_least`` checkpoint folders among the bucket ``keys``: in
    Tune's trial folders (a trial that trains in its own process) or in a trial's Ray Train
    run (``trials/``)."""
    folders: dict[str, set[str]] = {}
    for k in keys:
        holder = next((h for h in ("/tune/", "/trials/") if h in k), None)
        if holder and "/checkpoint_" in k:
            trial, rest = k.split(holder)[1].split("/", 1)
            folders.setdefault(trial, set()).add(("/" + rest).split("/checkpoint_")[1].split("/")[0])
    return {trial for trial, found in folders.items() if len(found) >= at_least}


def trials_with_synced_epochs(s3, bucket: str, prefix: str) -> set[str]:
    """The sweep trials whose ``result.json`` in Tune's folder under ``prefix`` on S3 holds an
    epoch: synced by Tune's driver with the experiment state that records the epoch."""
    return {
        k.split("/tune/")[1].split("/")[0]
        for k in s3_keys(s3, bucket, prefix)
        if "/tune/" in k and k.endswith("/result.json") and s3.get_object(Bucket=bucket, Key=k)["Body"].read().strip()
    }


def other_finished(board: list[dict], row: dict) -> float:
    """When the trial other than ``row`` finished."""
    return next(r for r in board if r is not row)["finished_at"]
