"""Reading data from and writing results to s3:// on a real S3 HTTP API (moto's server
on loopback, started by the fixture; no in-process mock)."""

import io
import time

import boto3
import pytest

from raybm.config import build_config
from raybm.data import load_split, run_data_stage
from raybm.errors import RaybmError
from raybm.storage.results import Results
from tests.helpers import make_frame

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def buckets(s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for b in ("raybm-data", "raybm-results"):
        s3.create_bucket(Bucket=b)
    df = make_frame()
    s3.put_object(Bucket="raybm-data", Key="csv/reviews.csv", Body=df.to_csv(index=False).encode())
    for i, part in enumerate((df.iloc[:35], df.iloc[35:])):
        buf = io.BytesIO()
        part.to_parquet(buf)
        s3.put_object(Bucket="raybm-data", Key=f"parquet/part-{i}.parquet", Body=buf.getvalue())
    return s3


def s3_config(endpoint, source, *extra):
    return build_config(
        overrides=[
            "storage.root=s3://raybm-results/experiments",
            f"storage.s3_endpoint_url={endpoint}",
            f"data.source={source}",
            "data.text_column=body",
            "data.label_column=sentiment",
            *extra,
        ]
    )


def read_all(results, name):
    out = {}
    for split in ("train", "validation", "test"):
        ds = load_split(results, name, split)
        for row in ds.iter_rows():
            out[row["text"]] = split
    return out


# s3_server comes first so the AWS_* variables exist before Ray starts its workers.
def test_csv_and_parquet_from_s3_into_s3_results(s3_server, buckets, ray_local):
    csv_cfg = s3_config(s3_server, "s3://raybm-data/csv/reviews.csv", "data.name=from-csv")
    csv = run_data_stage(csv_cfg, log=lambda _: None)
    pq_cfg = s3_config(s3_server, "s3://raybm-data/parquet/", "data.name=from-parquet")
    pq = run_data_stage(pq_cfg, log=lambda _: None)
    assert csv.path == "s3://raybm-results/experiments/data/from-csv"
    assert csv.report.rows_kept == pq.report.rows_kept == 80
    assert pq.report.files == ["s3://raybm-data/parquet/part-0.parquet", "s3://raybm-data/parquet/part-1.parquet"]

    keys = {
        o["Key"]
        for o in buckets.list_objects_v2(Bucket="raybm-results", Prefix="experiments/data/from-csv/")["Contents"]
    }
    for name in ("_SUCCESS", "report.json", "label_map.json", "config.yaml"):
        assert f"experiments/data/from-csv/{name}" in keys
    assert any(k.startswith("experiments/data/from-csv/train/") and k.endswith(".parquet") for k in keys)

    results = Results.from_config(csv_cfg.storage)
    assert results.list_datasets() == ["from-csv", "from-parquet"]
    assert results.dataset_report("from-csv").rows_read == 80
    assert read_all(results, "from-csv") == read_all(results, "from-parquet")


def test_missing_buckets_fail_fast(s3_server, buckets, ray_local):
    with pytest.raises(RaybmError, match="S3 bucket 'no-such-bucket' not found"):
        run_data_stage(s3_config(s3_server, "s3://no-such-bucket/x.csv"), log=lambda _: None)
    cfg = s3_config(s3_server, "s3://raybm-data/csv/reviews.csv", "storage.root=s3://missing-results/x")
    with pytest.raises(RaybmError, match=r"S3 bucket 'missing-results' not found \(storage.root="):
        run_data_stage(cfg, log=lambda _: None)


def test_a_soup_of_two_models_in_s3_is_written_to_s3(s3_server, buckets, ray_local, tmp_path):
    # `raybm soup` on an S3 root: the models are fetched, averaged and scored here, and the
    # new run (model, metrics, predictions) lands in the bucket, complete.
    import json

    import torch
    from safetensors.torch import load_file

    from raybm.models.build import build_classifier, load_tokenizer
    from raybm.tune.soup import run_soup

    cfg = s3_config(
        s3_server,
        "s3://raybm-data/csv/reviews.csv",
        "data.name=soup-data",
        "model.name=tiny-bert",
        "data.max_length=16",
    )
    run_data_stage(cfg, log=lambda _: None)
    results = Results.from_config(cfg.storage)
    labels = results.dataset_label_map("soup-data")["labels"]
    states = []
    for i, name in enumerate(("a", "b")):
        folder = tmp_path / name
        build_classifier(cfg.model, labels, seed=i).save_pretrained(folder, safe_serialization=True)
        load_tokenizer("tiny-bert").save_pretrained(folder)
        (folder / "label_map.json").write_text(json.dumps({"labels": labels}))
        results.upload_dir(str(folder), results.path("runs", name, "model"))
        states.append(load_file(str(folder / "model.safetensors")))

    out = run_soup(
        cfg, ["a", "s3://raybm-results/experiments/runs/b"], "soup-data", "ab", "uniform", log=lambda _: None
    )
    assert out["run_dir"] == "s3://raybm-results/experiments/runs/ab" and out["test"]["examples"] == 8
    keys = {
        o["Key"] for o in buckets.list_objects_v2(Bucket="raybm-results", Prefix="experiments/runs/ab/")["Contents"]
    }
    for name in (
        "_SUCCESS",
        "metrics.json",
        "test_predictions.parquet",
        "model/model.safetensors",
        "model/soup.json",
        "model/_SUCCESS",
        "model/README.md",
    ):
        assert f"experiments/runs/ab/{name}" in keys, name
    got = tmp_path / "got.safetensors"
    buckets.download_file("raybm-results", "experiments/runs/ab/model/model.safetensors", str(got))
    mean = load_file(str(got))
    for key, value in mean.items():
        assert torch.allclose(value.float(), (states[0][key].float() + states[1][key].float()) / 2, atol=1e-6), key


def test_a_model_folder_without_success_is_refused_by_every_loader(s3_server, buckets, tiny_model_dir, tmp_path):
    """Replicas, scoring tasks, export and the release gate fetch s3:// models through
    ``fetch_model``: half-written folders (no _SUCCESS of their own or of their export) are
    refused, complete ones load."""
    from pathlib import Path

    from raybm.config import StorageConfig
    from raybm.storage.model_cache import fetch_model

    storage = StorageConfig(root="s3://raybm-results/x", s3_endpoint_url=s3_server)
    files = sorted(p for p in Path(tiny_model_dir).iterdir() if p.is_file())
    for prefix in ("half/model", "exports/e1/onnx", "runs/r1/model"):
        for f in files:
            buckets.put_object(Bucket="raybm-results", Key=f"{prefix}/{f.name}", Body=f.read_bytes())
    buckets.put_object(Bucket="raybm-results", Key="exports/e1/_SUCCESS", Body=b"")  # the export is complete
    buckets.put_object(Bucket="raybm-results", Key="runs/r1/model/_SUCCESS", Body=b"")
    with pytest.raises(
        RaybmError,
        match=r"s3://raybm-results/half/model: no _SUCCESS in the model folder - it is "
        r"incomplete",
    ):
        fetch_model("s3://raybm-results/half/model", storage)
    for uri in ("s3://raybm-results/exports/e1/onnx", "s3://raybm-results/runs/r1/model"):
        local = fetch_model(uri, storage, str(tmp_path / uri.rsplit("/", 2)[-2]))
        assert sorted(p.name for p in Path(local).iterdir() if p.name != "_SUCCESS") == [f.name for f in files]


def test_one_writer_per_artifact_on_s3_with_conditional_writes(s3_server, buckets):
    """The lease on S3: created with If-None-Match, renewed and taken over with If-Match."""
    import json
    import subprocess
    import sys

    from raybm.config import StorageConfig
    from raybm.storage.lease import hold_lease

    root = "s3://raybm-results/leases-test"
    storage = StorageConfig(root=root, s3_endpoint_url=s3_server, lease_ttl_s=6)
    results = Results(root, storage)
    script = (
        "import sys, time\nfrom raybm.config import StorageConfig\nfrom raybm.storage.lease import hold_lease\n"
        "from raybm.storage.results import Results\n"
        f"s = StorageConfig(root={root!r}, s3_endpoint_url={s3_server!r}, lease_ttl_s=6)\n"
        "with hold_lease(Results(s.root, s), 'exports', 'e1', \"export 'e1'\", log=lambda m: None):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        time.sleep(4)  # past a renewal
        with pytest.raises(
            RaybmError, match=rf"export 'e1' is being written by another job \(host .*, pid {proc.pid};"
        ):
            with hold_lease(results, "exports", "e1", "export 'e1'"):
                pass
    finally:
        proc.kill()
        proc.wait()
    said = []
    with hold_lease(results, "exports", "e1", "export 'e1'", log=said.append):
        body = buckets.get_object(Bucket="raybm-results", Key="leases-test/.leases/exports-e1")["Body"].read()
        assert json.loads(body)["pid"] != proc.pid
    assert "Took over the stale lease of export 'e1'" in said[0]
    keys = buckets.list_objects_v2(Bucket="raybm-results", Prefix="leases-test/.leases/").get("Contents", [])
    assert keys == []  # released


def test_training_from_a_base_model_on_s3(s3_server, buckets, ray_local, tmp_path):
    # model.name=s3://...: the driver checks the folder and fetches it; the data stage's tasks
    # and the training worker fetch it on their own node, with the job's endpoint (set in the
    # config only, not in the environment).
    from raybm.models.build import build_classifier, load_tokenizer
    from raybm.preflight import preflight
    from raybm.train.driver import run_training

    base = tmp_path / "base"
    build_classifier(build_config(overrides=["model.name=tiny-distilbert"]).model, ["a", "b"]).save_pretrained(base)
    load_tokenizer("tiny-distilbert").save_pretrained(base)
    for f in base.iterdir():
        buckets.upload_file(str(f), "raybm-data", f"base-models/distilbert/{f.name}")
    cfg = s3_config(
        s3_server,
        "s3://raybm-data/csv/reviews.csv",
        "data.name=from-s3-base",
        "model.name=s3://raybm-data/base-models/distilbert",
        "data.max_length=16",
        "train.epochs=1",
        "train.batch_size=16",
        "train.warmup_ratio=0",
        "train.strategy=partial",
        "train.freeze_layers=1",
    )
    preflight(cfg, ["data", "train"])
    result = run_training(cfg, log=lambda _: None)
    assert result.history and result.model_dir.startswith("s3://raybm-results/experiments/runs/")
    card = buckets.get_object(Bucket="raybm-results", Key=result.model_dir[len("s3://raybm-results/") :] + "/README.md")
    assert "s3://raybm-data/base-models/distilbert" in card["Body"].read().decode()


def test_scoring_files_on_s3_into_a_folder_on_s3(s3_server, buckets, ray_local, tiny_model_dir, capsys):
    import pyarrow.parquet as pq

    from raybm.cli import main
    from raybm.config import StorageConfig
    from raybm.storage.fs import s3_filesystem
    from raybm.storage.layout import SUCCESS_MARKER

    out = "s3://raybm-results/scored/reviews"
    assert (
        main(
            [
                "predict",
                "--model",
                tiny_model_dir,
                "--input",
                "s3://raybm-data/parquet/",
                "--output",
                out,
                "--text-column",
                "body",
                f"storage.s3_endpoint_url={s3_server}",
                "predict.concurrency=1",
            ]
        )
        == 0
    )
    keys = [o["Key"] for o in buckets.list_objects_v2(Bucket="raybm-results", Prefix="scored/reviews/")["Contents"]]
    assert f"scored/reviews/{SUCCESS_MARKER}" in keys
    fs = s3_filesystem(StorageConfig(s3_endpoint_url=s3_server))
    parts = sorted(k for k in keys if k.endswith(".parquet"))
    got = pq.read_table([f"raybm-results/{k}" for k in parts], filesystem=fs).to_pandas()
    want = make_frame()
    assert got["body"].tolist() == want["body"].tolist()  # every row, in the files' order
    assert set(got["predicted_label"]) <= {"negative", "positive"} and got["confidence"].between(0, 1).all()
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--model",
                tiny_model_dir,
                "--input",
                "s3://raybm-data/parquet/*.parquet",
                "--output",
                out,
                "--text-column",
                "body",
                f"storage.s3_endpoint_url={s3_server}",
            ]
        )
        != 0
    )
    assert f"--output {out!r} already exists" in capsys.readouterr().err  # a finished output is never overwritten
