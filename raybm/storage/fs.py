"""Local and S3 files under one interface: a URI resolved to a pyarrow filesystem, the S3
endpoint and region looked up in one place, bucket and credential checks that fail fast
with what to do, and copies of remote folders into local ones (every name confined)."""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.local_paths import check_no_links_out, confined_path
from raybm.storage.layout import SUCCESS_MARKER


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return uri.startswith("s3://")


def s3_endpoint(storage: StorageConfig) -> str | None:
    """The S3 endpoint: ``storage.s3_endpoint_url``, else ``AWS_ENDPOINT_URL``, else AWS's own."""
    return storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region(storage: StorageConfig) -> str:
    """The S3 region: ``storage.s3_region``, else ``AWS_DEFAULT_REGION``, else us-east-1."""
    return storage.s3_region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """An S3 filesystem honouring the configured (or ``AWS_ENDPOINT_URL``) endpoint.

    pyarrow does not read ``AWS_ENDPOINT_URL`` itself, so it is passed explicitly.
    """
    endpoint = s3_endpoint(storage)
    kwargs: dict[str, Any] = {"region": s3_region(storage)}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def check_credentials(uri: str, role: str) -> None:
    """Raise a clear error when no AWS credentials can be found at all (the usual chain:
    environment, profile files, the node's instance profile)."""
    import boto3

    try:
        found = boto3.Session().get_credentials()
    except Exception as e:  # noqa: BLE001 - a broken profile file, say
        raise RaybmError(f"cannot read AWS credentials for {role}={uri!r}: {e}") from None
    if found is None:
        raise RaybmError(
            f"no AWS credentials for {role}={uri!r}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run on a node whose instance profile "
            f"can reach the bucket (cluster.yaml)."
        )


def check_bucket(fs: pafs.FileSystem, path: str, uri: str, role: str) -> None:
    """Raise a clear error when there are no credentials, or the bucket under an S3 path is
    unreachable or missing.

    ``role`` names what the URI is for in messages (e.g. "data.source", "storage.root").
    """
    check_credentials(uri, role)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise RaybmError(
            f"cannot reach S3 for {role}={uri!r}: {str(e).splitlines()[0]}. Check "
            f"storage.s3_endpoint_url and the AWS_* credentials."
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise RaybmError(
            f"S3 bucket {bucket!r} not found ({role}={uri!r}). Check the name, the endpoint "
            f"(storage.s3_endpoint_url) and your credentials, or create the bucket."
        )


def copy_tree_to_local(fs: pafs.FileSystem, path: str, local: str, listing: list[pafs.FileInfo] | None = None) -> str:
    """Copy the folder ``path`` on ``fs`` (S3) into the local folder ``local``, subfolders
    included (pyarrow creates the files, not their folders): the entries of ``listing`` when
    given (one listing decides both what a copy is and what it holds), else of a fresh one.
    Every name is checked before anything is written (``confined_path``)."""
    prefix = path.rstrip("/") + "/"
    entries = []
    for info in listing if listing is not None else fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if not info.path.startswith(prefix):
            raise RaybmError(f"s3://{path}: refused the entry {info.path!r}, which is not inside the folder")
        entries.append((info, confined_path(local, info.path[len(prefix) :], f"s3://{path}")))
    os.makedirs(local, exist_ok=True)
    for info, target in entries:
        if info.type == pafs.FileType.Directory:
            os.makedirs(target, exist_ok=True)
        elif info.type == pafs.FileType.File:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            pafs.copy_files(info.path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def copy_to_local(uri: str, storage: StorageConfig, dest: str) -> str:
    """Copy the folder at ``uri`` (a local path or ``s3://``) into the new local folder
    ``dest``; returns ``dest``."""
    fs, path = resolve_uri(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        check_no_links_out(path, uri)
        shutil.copytree(path, dest)
        return dest
    return copy_tree_to_local(fs, path, dest)


def is_published(fs: pafs.FileSystem, folder: str) -> bool:
    """Whether a model folder is complete: its own ``_SUCCESS``, or (an export's variant
    folder) the ``_SUCCESS`` of the export it belongs to, which is written after every file."""
    return any(
        fs.get_file_info(posixpath.join(f, SUCCESS_MARKER)).type != pafs.FileType.NotFound
        for f in (folder, posixpath.dirname(folder.rstrip("/")))
    )


def s3_client(storage: StorageConfig) -> Any:
    """A boto3 S3 client for the configured (or ``AWS_ENDPOINT_URL``) endpoint and region."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint(storage), region_name=s3_region(storage))


def resolve_uri(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Split a local path or ``s3://`` URI into (filesystem, path on that filesystem)."""
    if is_s3(uri):
        return s3_filesystem(storage), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise RaybmError(f"{uri!r}: only local paths and s3:// URIs are supported")
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():  # a numpy scalar
        return finite_json(obj.item())
    return obj


def write_json_file(path: str, obj: Any) -> None:
    """Write ``obj`` to the local file ``path`` as indented, standard JSON (NaN and infinite
    numbers as null), through a temporary file and a rename: never half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(finite_json(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
