"""Work that scales out over the 3-node cluster (tests/cluster/conftest.py), each submitted
as `ray job submit` does: a batch-scoring job whose model actors run on both worker nodes
(each fetching the model from S3 itself) and write every row, in order, to S3; and a data
stage whose token-counting tasks run on both worker nodes."""

import io
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.helpers import make_frame

from .conftest import run_job, s3_keys, write_job

pytestmark = pytest.mark.integration

ROWS, FILES = 1200, 6


def test_a_scoring_job_runs_model_actors_on_both_worker_nodes_and_writes_every_row_in_order(
    cluster, bucket, s3_server, tmp_path, tiny_model_dir
):
    from ray.util.state import list_actors

    s3, name = bucket
    for f in os.listdir(tiny_model_dir):  # a published model: its files, then _SUCCESS
        s3.upload_file(os.path.join(tiny_model_dir, f), name, f"models/m1/{f}")
    s3.put_object(Bucket=name, Key="models/m1/_SUCCESS", Body=b"")
    frame = pd.DataFrame(
        {"id": range(ROWS), "body": [f"review {i} {'great' if i % 3 else 'awful'}" for i in range(ROWS)]}
    )
    per = ROWS // FILES
    for k in range(FILES):
        buf = io.BytesIO()
        frame.iloc[k * per : (k + 1) * per].to_parquet(buf, index=False)
        s3.put_object(Bucket=name, Key=f"incoming/day-{k}.parquet", Body=buf.getvalue())
    config = write_job(
        tmp_path,
        {"storage": {"root": f"s3://{name}/team", "s3_endpoint_url": s3_server}, "model": {"name": "tiny-bert"}},
    )
    status, logs = run_job(
        cluster,
        "predict",
        config,
        "--model",
        f"s3://{name}/models/m1",
        "--input",
        f"s3://{name}/incoming/*.parquet",
        "--output",
        f"s3://{name}/scored/b1",
        "--text-column",
        "body",
        "--max-length",
        "16",
        "predict.concurrency=2",
        "predict.cpus_per_actor=0.5",
        timeout=300,
    )
    assert status == "SUCCEEDED", logs[-3000:]
    assert "with 2-2 model actor(s)" in logs, logs[-3000:]

    keys = s3_keys(s3, name, "scored/b1/")
    assert "scored/b1/_SUCCESS" in keys and "scored/b1/_job.json" in keys
    parts = sorted(k for k in keys if k.endswith(".parquet"))
    assert len(parts) == FILES  # one file per input file
    got = pd.concat(
        [pq.read_table(io.BytesIO(s3.get_object(Bucket=name, Key=k)["Body"].read())).to_pandas() for k in parts],
        ignore_index=True,
    )
    assert got["id"].tolist() == list(range(ROWS))  # every row, in input order, its id kept
    assert set(got["predicted_label"]) <= {"negative", "positive"} and got["confidence"].between(0, 1).all()

    # The model actors ran on both worker nodes.
    actors = [
        a
        for a in list_actors(address=cluster.address, limit=10000, raise_on_missing_output=False)
        if "MapBatches(Label)" in a.class_name
    ]
    workers = {n.node_id for n in cluster.alive_nodes() if n.resources_total.get("CPU", 0) > 0}
    assert len(actors) == 2 and {a.node_id for a in actors} == workers, [(a.class_name, a.node_id) for a in actors]


def test_the_data_stage_counts_tokens_on_both_worker_nodes(cluster, bucket, s3_server, tmp_path):
    from ray.util.state import list_tasks

    s3, name = bucket
    rows = make_frame(50_000)  # 100k rows: five token-counting blocks of 20k rows
    s3.put_object(Bucket=name, Key="input/many.csv", Body=rows.to_csv(index=False).encode())
    config = write_job(
        tmp_path,
        {
            "storage": {"root": f"s3://{name}/scale", "s3_endpoint_url": s3_server},
            "data": {
                "source": f"s3://{name}/input/many.csv",
                "text_column": "body",
                "label_column": "sentiment",
                "max_length": 16,
            },
            "model": {"name": "tiny-bert"},
        },
    )
    status, logs = run_job(cluster, "data", config, timeout=300)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "rows kept" in logs and "100000" in logs, logs[-3000:]
    counting = [
        t
        for t in list_tasks(address=cluster.address, limit=10000, raise_on_missing_output=False)
        if t.name == "MapBatches(_apply)" and t.state == "FINISHED"
    ]
    workers = {n.node_id for n in cluster.alive_nodes() if n.resources_total.get("CPU", 0) > 0}
    assert len(counting) >= 5 and {t.node_id for t in counting} == workers, [(t.name, t.node_id) for t in counting]
