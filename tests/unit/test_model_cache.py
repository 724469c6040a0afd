"""Models fetched from S3 (a real S3 API: moto's server on loopback): one private cached
copy per model URI and version, refreshed when the model is republished; ``_SUCCESS``
removed first and written last whenever a folder is rewritten."""

from __future__ import annotations

import json
import os
import stat
import time

import pyarrow.fs as pafs
import pytest

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.inference.loading import model_info
from raybm.storage.fs import s3_filesystem
from raybm.storage.layout import SUCCESS_MARKER
from raybm.storage.model_cache import MODEL_CACHE_ENV, fetch_model
from raybm.storage.results import Results


@pytest.fixture
def store(s3_server, tmp_path, monkeypatch):
    import boto3

    bucket = f"cache-{time.time_ns()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    storage = StorageConfig(root=f"s3://{bucket}/results", s3_endpoint_url=s3_server)
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    return Results(storage.root, storage)


def publish(results: Results, local: str, name: str) -> str:
    folder = results.join(results.run_dir(name), "model")
    results.upload_dir(local, folder)
    results.write_json(results.join(results.run_dir(name), "metrics.json"), {"test": {"accuracy": 0.5}})
    return results.uri(folder)


def test_one_private_copy_per_version_refreshed_when_the_model_changes(store, tiny_model_dir, tmp_path):
    uri = publish(store, tiny_model_dir, "cached")
    first = fetch_model(uri, store.storage)
    assert first.startswith(str(tmp_path / "cache"))
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700  # private to this user
    assert os.path.isfile(os.path.join(first, "model.safetensors"))
    assert fetch_model(uri, store.storage) == first  # a restart or a second replica: the same copy
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first)]  # nothing left behind

    changed = tmp_path / "changed"
    import shutil

    shutil.copytree(tiny_model_dir, changed)
    (changed / "label_map.json").write_text(json.dumps({"labels": ["neg", "pos"], "label_to_id": {"neg": 0, "pos": 1}}))
    publish(store, str(changed), "cached")  # republished under the same name
    second = fetch_model(uri, store.storage)
    assert second != first and not os.path.exists(first)  # the old version is gone
    assert json.loads(open(os.path.join(second, "label_map.json")).read())["labels"] == ["neg", "pos"]

    card = model_info(second, source=uri, storage=store.storage)  # what a replica reports
    assert card["name"] == "cached" and card["model"] == "runs/cached/model" and card["source_kind"] == "run"
    assert card["test_metrics"] == {"accuracy": 0.5}
    assert str(tmp_path) not in json.dumps(card)


def test_an_unpublished_folder_is_refused_and_a_rewrite_unmarks_it_first(store, tiny_model_dir):
    uri = publish(store, tiny_model_dir, "rewritten")
    folder = uri[len("s3://") :]
    fs = s3_filesystem(store.storage)
    seen = []
    real_delete = fs.delete_dir

    class Watching:  # records whether _SUCCESS still existed when the old files were deleted
        def __getattr__(self, name):
            return getattr(fs, name)

        def delete_dir(self, path):
            seen.append(fs.get_file_info(f"{path}/{SUCCESS_MARKER}").type)
            real_delete(path)
            store.fs = fs  # the copy that follows needs the real filesystem

    store.fs = Watching()
    store.upload_dir(tiny_model_dir, folder)
    assert seen == [pafs.FileType.NotFound]  # unmarked before any file was deleted
    assert store.is_complete(folder)
    store.unmark_complete(folder)
    with pytest.raises(RaybmError, match="no _SUCCESS in the model folder"):
        fetch_model(uri, store.storage)


def test_a_model_card_keeps_success_last(tmp_path, tiny_model_dir):
    import shutil

    from raybm.models.card import write_model_card
    from raybm.storage.layout import MODEL_CARD_FILE

    results = Results(str(tmp_path), StorageConfig(root=str(tmp_path)))
    model = results.join(results.run_dir("carded"), "model")
    shutil.copytree(tiny_model_dir, model)
    results.mark_complete(model)
    before = os.stat(os.path.join(model, SUCCESS_MARKER)).st_mtime_ns
    time.sleep(0.01)
    write_model_card(
        results,
        model,
        name="carded",
        kind="run",
        dataset="d",
        test={"accuracy": 1.0, "f1_macro": 1.0, "precision_macro": 1.0, "recall_macro": 1.0},
    )
    assert (
        os.stat(os.path.join(model, SUCCESS_MARKER)).st_mtime_ns
        >= os.stat(os.path.join(model, MODEL_CARD_FILE)).st_mtime_ns
    )
    assert os.stat(os.path.join(model, SUCCESS_MARKER)).st_mtime_ns > before


def upload_folder(s3, bucket: str, prefix: str, local: str, skip: tuple[str, ...] = ()) -> str:
    for name in sorted(os.listdir(local)):
        if name not in skip:
            s3.upload_file(os.path.join(local, name), bucket, f"{prefix}/{name}")
    return f"s3://{bucket}/{prefix}"


def test_a_base_model_on_s3_is_fetched_once_per_node_and_content_and_checked_complete(store, tmp_path, monkeypatch):
    import boto3

    from raybm.config import build_config
    from raybm.models.build import build_classifier, load_tokenizer, local_model
    from raybm.storage.model_cache import fetch_base_model

    base = tmp_path / "base"  # a Hugging Face folder as a user uploads it: no _SUCCESS
    build_classifier(build_config(overrides=["model.name=tiny-gpt2"]).model, ["a", "b"]).save_pretrained(base)
    load_tokenizer("tiny-gpt2").save_pretrained(base)
    s3 = boto3.client("s3", endpoint_url=store.storage.s3_endpoint_url)
    bucket = store.root[len("s3://") :].split("/")[0]
    uri = upload_folder(s3, bucket, "base-models/gpt2", str(base))
    storage = store.storage

    first = fetch_base_model(uri, storage)
    assert sorted(os.listdir(first)) == sorted([*os.listdir(base), ".complete"])
    assert os.stat(os.path.dirname(first)).st_mode & 0o777 == 0o700
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    again = fetch_base_model(uri, storage)  # the same content: the same copy, not fetched again
    assert again == first and os.stat(os.path.join(again, "model.safetensors")).st_mtime_ns == stamp
    cfg = build_config(
        overrides=[
            f"model.name={uri}",
            f"storage.root={store.root}",
            f"storage.s3_endpoint_url={storage.s3_endpoint_url}",
        ]
    )
    assert local_model(cfg.model, cfg.storage).name == first
    assert (
        type(build_classifier(local_model(cfg.model, cfg.storage), ["a", "b"])).__name__
        == "GPT2ForSequenceClassification"
    )

    s3.put_object(
        Bucket=bucket,
        Key="base-models/gpt2/config.json",  # new content, same size: a new version
        Body=(base / "config.json").read_bytes().replace(b'"a"', b'"x"'),
    )
    changed = fetch_base_model(uri, storage)
    assert changed != first and not os.path.exists(first)  # the older copy goes

    for skip, lacks in (
        (("model.safetensors",), "model.safetensors (raybm loads safetensors weights only"),
        (("config.json",), "config.json"),
        (("tokenizer.json", "tokenizer_config.json"), "the tokenizer"),
    ):
        partial = upload_folder(s3, bucket, f"partial-{skip[0]}", str(base), skip=skip)
        with pytest.raises(RaybmError, match="the folder is incomplete, it lacks " + lacks.replace("(", r"\(")):
            fetch_base_model(partial, storage)
    with pytest.raises(RaybmError, match="no files there"):
        fetch_base_model(f"s3://{bucket}/nothing-here", storage)


@pytest.mark.parametrize(
    "bad",
    [
        "../../../../ESCAPED.txt",
        "sub/../../ESCAPED.txt",
        "/abs/ESCAPED.txt",
        "sub//ESCAPED.txt",
        "sub\\..\\ESCAPED.txt",
        "./ESCAPED.txt",
    ],
)
def test_a_store_entry_whose_name_leaves_its_folder_is_refused_and_nothing_is_written(
    store, tiny_model_dir, tmp_path, bad
):
    """A bucket writer must not be able to write files anywhere on a node that fetches a
    model: every key is checked before anything is fetched."""
    import boto3

    from raybm.storage.fs import copy_tree_to_local
    from raybm.storage.model_cache import fetch_base_model

    s3 = boto3.client("s3", endpoint_url=store.storage.s3_endpoint_url)
    bucket = store.root[len("s3://") :].split("/")[0]
    uri = upload_folder(s3, bucket, "base", tiny_model_dir)
    s3.put_object(Bucket=bucket, Key=f"base/{bad}", Body=b"planted")
    with pytest.raises(
        RaybmError,
        match=r"model.name=s3://.*/base: refused the entry .*ESCAPED.txt.* nothing was "
        r"written for it",
    ):
        fetch_base_model(uri, store.storage)
    published = publish(store, tiny_model_dir, "escaping")
    s3.put_object(Bucket=bucket, Key=f"results/runs/escaping/model/{bad}", Body=b"planted")
    with pytest.raises(RaybmError, match=r"refused the entry"):
        fetch_model(published, store.storage)
    with pytest.raises(RaybmError, match=r"refused the entry"):
        copy_tree_to_local(store.fs, published[len("s3://") :], str(tmp_path / "copy" / "model"))
    assert not list(tmp_path.rglob("ESCAPED.txt")) and not (tmp_path / "copy").exists()
    assert not os.path.exists("/abs/ESCAPED.txt")


def test_a_local_model_folder_with_a_link_out_is_refused(tmp_path, tiny_model_dir):
    import shutil

    from raybm.storage.fs import copy_to_local

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not to be copied")
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(RaybmError, match=r"refused 'notes.txt', a link that leads outside the folder"):
        copy_to_local(str(folder), StorageConfig(), str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()
    (folder / "notes.txt").unlink()
    (folder / "notes.txt").symlink_to(folder / "config.json")  # a link inside the folder is fine
    assert os.path.isfile(
        os.path.join(copy_to_local(str(folder), StorageConfig(), str(tmp_path / "copy")), "notes.txt")
    )


def test_a_model_cache_another_user_owns_is_refused(tmp_path, monkeypatch):
    from raybm.storage.model_cache import model_cache_dir

    if os.getuid() != 0:
        pytest.skip("making a folder another user owns needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)  # the tests run as root; another user's folder
    monkeypatch.setenv(MODEL_CACHE_ENV, str(theirs))
    with pytest.raises(RaybmError, match=r"belongs to another user \(uid 4242\).*RAYBM_MODEL_CACHE"):
        model_cache_dir()
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "mine"))
    assert model_cache_dir() == str(tmp_path / "mine")
