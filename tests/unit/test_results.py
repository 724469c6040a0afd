import inspect
import os
import re

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


def layout_names() -> dict[str, str]:
    """Every name of the results layout that results.py owns, by constant."""
    import raybm.results as results

    start = inspect.getsource(results).index(
        "# ---------------------------------------------------------------------------- the layout"
    )
    block = inspect.getsource(results)[start:].split("\n\n\n")[0]
    names = {m.group(1): getattr(results, m.group(1)) for m in re.finditer(r"^([A-Z_]+) = ", block, flags=re.M)}
    return {k: v for k, v in names.items() if isinstance(v, str)}


def test_no_module_but_results_spells_a_results_file_or_folder_name():
    import raybm

    names = layout_names()
    assert {"METRICS_FILE", "WINNER_FILE", "MODEL_DIR", "RUNS", "SUCCESS_MARKER", "SUMMARY_FILE"} <= set(names)
    files = {v for v in names.values() if "." in v or v.startswith("_")}
    folders = {v for v in names.values() if v not in files}
    # A file name is a file name wherever it appears; a folder name only where a path is
    # built (its words are also config sections and dict keys).
    file_literal = re.compile(r'(?<![\w{])"(' + "|".join(re.escape(f) for f in files) + r')"')
    folder_in_path = re.compile(
        r'\b(join|path|build_dir|staging_dir|hold_lease|_folders|_named|names)\([^()\n]*"('
        + "|".join(folders)
        + r')"|"('
        + "|".join(folders)
        + r")/"
    )
    package = os.path.dirname(raybm.__file__)
    found = []
    for folder, _, filenames in os.walk(package):
        for filename in filenames:
            path = os.path.join(folder, filename)
            rel = os.path.relpath(path, package)
            # results.py owns the names; the mobile bundle's predict.py runs without raybm.
            if not filename.endswith(".py") or rel in ("results.py", os.path.join("export", "mobile_predict.py")):
                continue
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if file_literal.search(line) or folder_in_path.search(line):
                        found.append(f"raybm/{rel}:{n}: {line.strip()}")
    assert not found, "use the raybm.results constants:\n" + "\n".join(found)


def test_scratch_folders_are_this_users_own(tmp_path, monkeypatch):
    import os
    import stat
    import tempfile

    from raybm.errors import RaybmError
    from raybm.local_paths import private_temp_dir
    from raybm.train.checkpoints import checkpoint_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = checkpoint_scratch()
    assert mine.startswith(str(tmp_path / f"raybm-{os.getuid()}" / "checkpoints"))
    assert stat.S_IMODE(os.stat(tmp_path / f"raybm-{os.getuid()}").st_mode) == 0o700
    if os.getuid() == 0:  # a folder another user made first under the shared name is refused
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "other"))
        (tmp_path / "other" / "raybm-0").mkdir(parents=True)
        os.chown(tmp_path / "other" / "raybm-0", 4242, 4242)
        import pytest

        with pytest.raises(RaybmError, match="belongs to another user"):
            private_temp_dir("logs")


def test_json_records_are_standard_json(tmp_path):
    import json

    import numpy as np

    from raybm.config import StorageConfig
    from raybm.results import Results

    results = Results(str(tmp_path), StorageConfig(root=str(tmp_path)))
    results.write_json(
        str(tmp_path / "leaderboard.json"),
        [{"val_loss": float("nan"), "x": [float("inf"), 1.5], "n": np.float32(0.5), "k": np.int64(3)}],
    )
    text = (tmp_path / "leaderboard.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == [{"val_loss": None, "x": [None, 1.5], "n": 0.5, "k": 3}]
