import inspect
import os
import re
import textwrap

import pytest

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.storage.fs import resolve_uri
from raybm.storage.results import Results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_layout_paths(tmp_path):
    r = Results(str(tmp_path), StorageConfig())
    assert r.dataset_dir("d") == os.path.join(tmp_path, "data", "d")
    assert r.dataset_split_dir("d", "validation").endswith(os.path.join("data", "d", "validation"))
    assert r.run_dir("x").endswith(os.path.join("runs", "x"))
    assert r.sweep_dir("x").endswith(os.path.join("sweeps", "x"))
    assert r.export_dir("m", "onnx").endswith(os.path.join("exports", "m", "onnx"))
    with pytest.raises(ValueError):
        r.dataset_split_dir("d", "dev")


def _report_builder(results: Results, value: int, fail: bool = False):
    def build(folder: str) -> str:
        results.write_json(results.join(folder, "report.json"), {"dataset": "d", "rows_kept": value})
        assert results.list_datasets() in ([], ["d"])  # a folder being built is never listed
        if fail:
            raise RuntimeError("the build broke")
        return folder

    return build


@pytest.fixture(params=["local", "s3"])
def results_root(request, tmp_path):
    if request.param == "local":
        return Results(str(tmp_path / "root"), StorageConfig())
    import boto3

    endpoint = request.getfixturevalue("s3_server")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="pub")
    return Results("s3://pub/root", StorageConfig(s3_endpoint_url=endpoint))


def test_publish_builds_then_publishes_in_one_step_and_a_failed_build_leaves_nothing(results_root):
    r = results_root
    final = r.dataset_dir("d")
    built_in = r.publish(final, _report_builder(r, 1))
    assert r.list_datasets() == ["d"] and r.dataset_report("d").rows_kept == 1 and r.is_complete(final)
    assert (built_in == final) == r.remote  # S3 has no rename: built in place, marked last
    # republishing replaces the old folder whole, and leaves no staging folder behind
    r.publish(final, _report_builder(r, 2))
    assert r.dataset_report("d").rows_kept == 2
    if not r.remote:
        assert sorted(os.listdir(os.path.dirname(final))) == ["d"]
    # a failed build, or a fencing check that refuses, publishes nothing
    with pytest.raises(RuntimeError, match="the build broke"):
        r.publish(final, _report_builder(r, 3, fail=True))

    def lost_lease() -> None:
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        r.publish(final, _report_builder(r, 4), before_publish=lost_lease)
    if r.remote:  # the old artifact was emptied first: nothing half-built reads as complete
        assert r.list_datasets() == [] and not r.exists(final)
    else:  # the old artifact stays as it was, and no staging folder is left
        assert r.dataset_report("d").rows_kept == 2 and sorted(os.listdir(os.path.dirname(final))) == ["d"]


def test_a_local_build_is_published_on_any_root(results_root):
    r = results_root
    final = r.run_dir("run1")

    def build(folder: str) -> int:
        os.makedirs(folder)
        with open(os.path.join(folder, "weights.bin"), "wb") as f:
            f.write(b"x" * 10)
        return 10

    assert r.publish(final, build, local_build=True) == 10
    assert r.is_complete(final) and r.read_text(r.join(final, "weights.bin")) == "x" * 10


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
    """Every name of the results layout that raybm.storage.layout owns, by constant."""
    import raybm.storage.layout as layout

    start = inspect.getsource(layout).index(
        "# ---------------------------------------------------------------------------- the layout"
    )
    block = inspect.getsource(layout)[start:].split("\n\n\n")[0]
    names = {m.group(1): getattr(layout, m.group(1)) for m in re.finditer(r"^([A-Z_]+) = ", block, flags=re.M)}
    return {k: v for k, v in names.items() if isinstance(v, str)}


def test_the_docs_show_the_layout_modules_tree_and_it_names_every_file_and_folder():
    import raybm.storage.layout as layout

    doc = inspect.getdoc(layout) or ""
    tree = textwrap.dedent(doc[doc.index("    <root>/") :]).strip()
    with open(os.path.join(REPO, "docs", "results.md"), encoding="utf-8") as f:
        shown = re.search(r"```\n(<root>/\n.*?)```\n", f.read(), re.S)
    assert shown and shown.group(1).strip() == tree, (
        "docs/results.md's tree differs from raybm/storage/layout.py's docstring: copy the docstring's"
    )
    unnamed = {k: v for k, v in layout_names().items() if v not in tree}
    assert not unnamed, f"names of the layout missing from its tree: {unnamed}"


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
            # storage/layout.py owns the names; the mobile bundle's predict.py runs without raybm.
            if not filename.endswith(".py") or rel in (
                os.path.join("storage", "layout.py"),
                os.path.join("export", "mobile_predict.py"),
            ):
                continue
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if file_literal.search(line) or folder_in_path.search(line):
                        found.append(f"raybm/{rel}:{n}: {line.strip()}")
    assert not found, "use the raybm.storage.layout constants:\n" + "\n".join(found)


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
    from raybm.storage.results import Results

    results = Results(str(tmp_path), StorageConfig(root=str(tmp_path)))
    results.write_json(
        str(tmp_path / "leaderboard.json"),
        [{"val_loss": float("nan"), "x": [float("inf"), 1.5], "n": np.float32(0.5), "k": np.int64(3)}],
    )
    text = (tmp_path / "leaderboard.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == [{"val_loss": None, "x": [None, 1.5], "n": 0.5, "k": 3}]
