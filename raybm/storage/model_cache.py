"""Models fetched to a node: one private cache folder per user and node, where every
process (Serve replicas, the dashboard, scoring tasks, training workers, the data stage's
tasks) shares one copy of a model per URI and version: a published raybm model from the
results (``fetch_model``), or a base model on S3 (``fetch_base_model``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.local_paths import confined_path
from raybm.storage.fs import copy_to_local, copy_tree_to_local, is_published, resolve_uri, s3_client
from raybm.storage.layout import SUCCESS_MARKER, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

MODEL_CACHE_ENV = "RAYBM_MODEL_CACHE"


def model_cache_dir() -> str:
    """This user's private folder of models fetched from S3 (mode 0700):
    ``$RAYBM_MODEL_CACHE``, else ``~/.cache/raybm/models``. A folder another user owns is
    refused: whoever owns it could swap the models every process here loads."""
    root = os.environ.get(MODEL_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "raybm", "models")
    os.makedirs(root, mode=0o700, exist_ok=True)
    owner = os.stat(root).st_uid
    if owner != os.getuid():
        raise RaybmError(
            f"the model cache {root} belongs to another user (uid {owner}), who could replace the "
            f"models loaded from it; point {MODEL_CACHE_ENV} at a folder of your own"
        )
    os.chmod(root, 0o700)
    return root


def fetch_model(uri: str, storage: StorageConfig, dest: str | None = None) -> str:
    """A local copy of the model folder at an ``s3://`` URI: in ``dest``, or in the model
    cache, where every process on a node (Serve replicas, the dashboard, scoring tasks)
    shares one copy per URI and version (the folder's file names, sizes and times): a
    restart or a new replica reuses it, a republished model is fetched anew and the older
    copy removed. Refuses a folder without ``_SUCCESS``: it is being written, or its
    writer died."""
    fs, path = resolve_uri(uri, storage)
    if not is_published(fs, path):
        raise RaybmError(
            f"{uri}: no {SUCCESS_MARKER} in the model folder - it is incomplete (still being written, "
            f"or its writer stopped). Wait for the job that writes it, or publish it again."
        )
    if dest is not None:
        return copy_to_local(uri, storage, dest)
    listing = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    files = sorted((i.path, i.size, i.mtime_ns) for i in listing)
    # The files of this one listing are the version and what is copied: a republish between
    # two listings cannot mix versions in one copy.
    return _cached_copy(uri, files, lambda tmp: copy_tree_to_local(fs, path, tmp, listing))


def _cached_copy(uri: str, version_of: Any, fill: Callable[[str], Any]) -> str:
    """The model cache's folder for ``uri`` at the version ``version_of`` names (any JSON
    value), filled by ``fill(folder)`` the first time on this node; a folder another process
    on the node is filling is not used until it is complete; older versions go."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    version = hashlib.sha256(json.dumps(version_of).encode()).hexdigest()[:16]
    root = model_cache_dir()
    final = os.path.join(root, f"{key}-{version}")
    if not os.path.isfile(os.path.join(final, ".complete")):
        tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
        try:
            fill(tmp)
            open(os.path.join(tmp, ".complete"), "w").close()
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, ".complete")):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # another process on the node finished first
    for old in os.listdir(root):  # older versions of the same model
        if old.startswith(f"{key}-") and old != os.path.basename(final):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


# What a base model folder on S3 must hold (a Hugging Face folder): its config, its weights
# as safetensors (one file, or shards and their index), and its tokenizer.
BASE_MODEL_WEIGHTS = (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)
BASE_MODEL_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def fetch_base_model(uri: str, storage: StorageConfig) -> str:
    """A base model folder on S3 (``model.name=s3://bucket/folder``) on this node: fetched
    once per node into the model cache, keyed by the files' ETags (their content), so every
    process on the node (data tasks, training workers, Serve replicas) shares one copy and a
    changed model is fetched anew. The folder is checked complete before anything is fetched
    and every file's size after."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri[len("s3://") :].rstrip("/").partition("/")
    client = s3_client(storage)
    try:
        listing = [
            (o["Key"][len(prefix) + 1 :], o["Size"], o["ETag"])
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for o in page.get("Contents", [])
        ]
    except (BotoCoreError, ClientError) as e:
        raise RaybmError(
            f"model.name={uri}: cannot list the folder ({e}); check the bucket, "
            f"storage.s3_endpoint_url and the AWS_* credentials"
        ) from None
    for name, _, _ in listing:  # every key confined to the folder before anything is fetched
        confined_path(model_cache_dir(), name, f"model.name={uri}")
    _check_base_model(uri, {name: size for name, size, _ in listing}, client, bucket, prefix)

    def fill(tmp: str) -> None:
        for name, size, _ in listing:
            target = confined_path(tmp, name, f"model.name={uri}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            client.download_file(bucket, f"{prefix}/{name}", target)
            if os.path.getsize(target) != size:
                raise RaybmError(
                    f"model.name={uri}: {name} came down as {os.path.getsize(target)} bytes, "
                    f"listed as {size}; it changed while it was fetched, try again"
                )

    return _cached_copy(uri, sorted(listing), fill)


def _check_base_model(uri: str, files: dict[str, int], client: Any, bucket: str, prefix: str) -> None:
    """A RaybmError naming what a base model folder on S3 lacks."""
    if not files:
        raise RaybmError(
            f"model.name={uri}: no files there; upload a Hugging Face model folder "
            f"(config.json, model.safetensors, the tokenizer's files)"
        )
    missing = [] if "config.json" in files else ["config.json"]
    if not any(w in files for w in BASE_MODEL_WEIGHTS):
        missing.append(
            f"{WEIGHTS_FILE} (raybm loads safetensors weights only: convert a pytorch_model.bin "
            "with transformers' save_pretrained(safe_serialization=True))"
        )
    if not any(t in files for t in BASE_MODEL_TOKENIZER):
        missing.append("the tokenizer (tokenizer.json or tokenizer_config.json)")
    if WEIGHTS_INDEX_FILE in files and WEIGHTS_FILE not in files:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{WEIGHTS_INDEX_FILE}")["Body"].read()
        missing += sorted(set(json.loads(body).get("weight_map", {}).values()) - set(files))
    if missing:
        raise RaybmError(f"model.name={uri}: the folder is incomplete, it lacks {'; '.join(missing)}")
