import os

import pytest

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.results import Results, resolve_uri


def test_layout_paths(tmp_path):
    r = Results(str(tmp_path), StorageConfig())
    assert r.dataset_dir("d") == os.path.join(tmp_path, "data", "d")
    assert r.dataset_split_dir("d", "validation").endswith(os.path.join("data", "d", "validation"))
    assert r.run_dir("x").endswith(os.path.join("runs", "x"))
    assert r.sweep_dir("x").endswith(os.path.join("sweeps", "x"))
    assert r.export_dir("m", "onnx").endswith(os.path.join("exports", "m", "onnx"))
    with pytest.raises(ValueError):
        r.dataset_split_dir("d", "dev")


def test_publish_and_completeness(tmp_path):
    r = Results(str(tmp_path), StorageConfig())
    build = r.build_dir("data", "d")
    assert os.path.basename(build).startswith(".staging-d-")
    r.write_json(r.join(build, "report.json"), {"ok": 1})
    assert r.list_datasets() == []  # staging folders are never listed
    r.mark_complete(build)
    r.publish(build, r.dataset_dir("d"))
    assert r.list_datasets() == ["d"]
    assert r.dataset_report("d") == {"ok": 1}
    assert not os.path.exists(build)
    # republishing replaces the old folder whole
    build2 = r.build_dir("data", "d")
    r.write_json(r.join(build2, "report.json"), {"ok": 2})
    r.mark_complete(build2)
    r.publish(build2, r.dataset_dir("d"))
    assert r.dataset_report("d") == {"ok": 2}
    assert sorted(os.listdir(tmp_path / "data")) == ["d"]


def test_incomplete_folders_are_not_datasets(tmp_path):
    r = Results(str(tmp_path), StorageConfig())
    r.write_json(r.dataset_file("half", "report.json"), {})
    assert r.list_datasets() == []


def test_write_text_leaves_no_temp_files(tmp_path):
    r = Results(str(tmp_path), StorageConfig())
    r.write_text(r.path("a", "b.txt"), "hello")
    assert os.listdir(tmp_path / "a") == ["b.txt"]


def test_uri_kinds():
    fs, path = resolve_uri("s3://bucket/pre/fix/", StorageConfig(s3_endpoint_url="http://127.0.0.1:9"))
    assert path == "bucket/pre/fix" and type(fs).__name__ == "S3FileSystem"
    with pytest.raises(RaybmError, match="only local paths and s3://"):
        resolve_uri("gs://bucket/x", StorageConfig())
