"""The results folder: the one place that knows where every artifact lives.

Every stage and the dashboard read and write through ``Results``; no other module builds
a results path by hand. The root is a local path or ``s3://bucket/prefix``; both go
through a pyarrow filesystem, so the same code serves a laptop and a cluster.
The layout is documented in docs/results.md:
    <root>/
      data/<dataset>/                 one prepared dataset (data stage)
        train/ validation/ test/      Parquet parts: text (string), label (int64)
        label_map.json                {"labels": [...], "label_to_id": {...}}
        report.json                   data report (rows read, dropped by reason ...)
        config.yaml                   the resolved job config that produced it
        _SUCCESS                      written last: the dataset is complete
      runs/<run>/                     training runs: config.yaml, checkpoint_*/ (Ray Train),
                                      model/ (best), history.json, metrics.json, _SUCCESS
      sweeps/<sweep>/                 hyperparameter sweeps
      exports/<name>/<variant>/       exported and compressed models

A folder without ``_SUCCESS`` is incomplete and is never read as data.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybm.config import StorageConfig, check_name
from raybm.errors import RaybmError
from raybm.local_paths import check_no_links_out, confined_path

# ---------------------------------------------------------------------------- the layout
# Every folder and file name raybm writes under the results root, and nowhere else
# (tests/unit/test_results.py greps the package for these literals).
# The folders under the root, one per kind of artifact (also the kinds of leases and staging).
DATASETS = "data"
RUNS = "runs"
SWEEPS = "sweeps"
EXPORTS = "exports"
PIPELINES = "pipelines"
REGISTRY = "registry"  # models fetched from MLflow's Model Registry: registry/<name>-v<version>/model
SPLITS = ("train", "validation", "test")
# In every artifact folder.
SUCCESS_MARKER = "_SUCCESS"  # written last: the folder is complete
CONFIG_FILE = "config.yaml"  # the resolved job config that produced it
# A prepared dataset.
LABEL_MAP_FILE = "label_map.json"  # also in every model folder
CALIBRATION_FILE = "calibration.json"  # a model folder's temperature, fitted on validation
DRIFT_REFERENCE_FILE = "drift_reference.json"  # a model folder's training label mix and token-length bins
REPORT_FILE = "report.json"
# A training run or a sweep.
MODEL_DIR = "model"  # the published model
METRICS_FILE = "metrics.json"  # a run's test metrics
HISTORY_FILE = "history.json"  # a run's epochs
TENSORBOARD_DIR = "tensorboard"  # a run's (a trial's) TensorBoard event files: loss, lr, metrics
PREDICTIONS_FILE = "test_predictions.parquet"  # every test example: text, label, pred, confidence, prob_<i>
TUNE_DIR = "tune"  # a sweep's Ray Tune experiment
TRIALS_DIR = "trials"  # a sweep's trial runs
LEADERBOARD = "leaderboard"  # a sweep's leaderboard: .json and .csv
WINNER_FILE = "winner.json"
SOUP_FILE = "soup.json"
# A model folder (besides the tokenizer's and transformers' own files).
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = f"{WEIGHTS_FILE}.index.json"  # weights too large for one file: which file holds each tensor
MODEL_CONFIG_FILE = "raybm_config.yaml"  # the job config the model was trained with
MODEL_CARD_FILE = "README.md"
# A training checkpoint (a model folder plus these).
TRAIN_STATE_FILE = "train_state.pt"  # optimizer, scheduler, RNG: what resuming needs
EPOCH_METRICS_FILE = "epoch_metrics.json"
SHARDS_DIR = "shards"  # an FSDP checkpoint's model and optimizer state: one safetensors file per rank
SHARDS_INDEX_FILE = "shards.json"  # how many ranks wrote SHARDS_DIR, and whether it holds the model
# An export: one folder per variant, and a mobile bundle.
ONNX_FILE = "model.onnx"
VARIANT_FILE = "manifest.json"  # in each variant folder
MOBILE_DIR = "mobile"
# A pipeline.
CONSOLE_LOG_FILE = "console.log"  # a quiet pipeline's whole output (raybm pipeline --quiet)
SUMMARY_FILE = "summary.json"


def weight_files(folder: str) -> list[str] | None:
    """A local model folder's safetensors weight files: ``model.safetensors``, or the files
    its ``model.safetensors.index.json`` names (weights too large for one file); None if neither."""
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, WEIGHTS_INDEX_FILE)
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]


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


def job_for_workers(cfg) -> dict[str, Any]:
    """The job config as a dict for processes that run elsewhere (Ray Train workers, Tune
    trials): a local results root made absolute, since those processes start in folders of
    their own (a Tune trial runs in its trial folder), where a relative root means nothing."""
    job = cfg.to_dict()
    if not is_s3(job["storage"]["root"]):
        job["storage"]["root"] = os.path.abspath(os.path.expanduser(job["storage"]["root"]))
    return job


def soup_used(soup: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Whether a soup record (``soup`` of ``winner.json`` and ``metrics.json``) describes the
    model that was handed on: a uniform soup always, a greedy one when it kept more than
    one model."""
    return soup is not None and (len(soup.get("ingredients", [])) > 1 or soup.get("method") == "uniform")


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return uri.startswith("s3://")


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """An S3 filesystem honouring the configured (or ``AWS_ENDPOINT_URL``) endpoint.

    pyarrow does not read ``AWS_ENDPOINT_URL`` itself, so it is passed explicitly.
    """
    endpoint = storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    region = storage.s3_region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {"region": region}
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


def s3_client(storage: StorageConfig):
    """A boto3 S3 client for the configured (or ``AWS_ENDPOINT_URL``) endpoint and region."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=storage.s3_region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def resolve_uri(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """Split a local path or ``s3://`` URI into (filesystem, path on that filesystem)."""
    if is_s3(uri):
        return s3_filesystem(storage), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise RaybmError(f"{uri!r}: only local paths and s3:// URIs are supported")
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


@dataclass
class Results:
    """A results root and the paths of everything under it."""

    root: str
    storage: StorageConfig

    def __post_init__(self) -> None:
        self.fs, self.base = resolve_uri(self.root, self.storage)
        self.remote = is_s3(self.root)

    @classmethod
    def from_config(cls, storage: StorageConfig) -> Results:
        """The results root of a job's storage settings."""
        return cls(storage.root, storage)

    # -- paths (on self.fs) ------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path under the root, on ``self.fs``."""
        return posixpath.join(self.base, *parts) if self.remote else os.path.join(self.base, *parts)

    def uri(self, path: str) -> str:
        """A path on self.fs as the user would write it (for messages and reports)."""
        return f"s3://{path}" if self.remote else path

    def dataset_dir(self, name: str) -> str:
        """The folder of a prepared dataset."""
        check_name(name, "dataset name")
        return self.path(DATASETS, name)

    def dataset_split_dir(self, name: str, split: str) -> str:
        """The Parquet folder of one split of a prepared dataset."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        return self.path(DATASETS, name, split)

    def dataset_file(self, name: str, filename: str) -> str:
        """A file of a prepared dataset."""
        return self.path(DATASETS, name, filename)

    def run_dir(self, name: str) -> str:
        """The folder of a training run."""
        check_name(name, "run name")
        return self.path(RUNS, name)

    def sweep_dir(self, name: str) -> str:
        """The folder of a sweep."""
        check_name(name, "sweep name")
        return self.path(SWEEPS, name)

    def pipeline_dir(self, name: str) -> str:
        """The folder of a pipeline's summary."""
        check_name(name, "pipeline name")
        return self.path(PIPELINES, name)

    def export_dir(self, name: str, variant: str | None = None) -> str:
        """The folder of an export, or of one of its variants."""
        check_name(name, "export name")
        return self.path(EXPORTS, name, variant) if variant else self.path(EXPORTS, name)

    def lease_path(self, kind: str, name: str) -> str:
        """The lease file of ``<kind>/<name>`` (raybm.lease): beside the artifacts, not in
        the artifact's folder, which a rebuild may delete."""
        check_name(name, f"{kind} name")
        return self.path(".leases", f"{kind}-{name}")

    def staging_dir(self, kind: str, name: str) -> str:
        """A fresh hidden sibling folder to build an artifact in before publishing it."""
        return self.path(kind, f".staging-{name}-{uuid.uuid4().hex[:8]}")

    def check_reachable(self) -> None:
        """Fail fast, before any work, when the results root cannot be used."""
        if self.remote:
            check_bucket(self.fs, self.base, self.root, "storage.root")

    # -- file operations ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        """Whether a path exists."""
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_complete(self, folder: str) -> bool:
        """Whether a folder is marked complete (``_SUCCESS``)."""
        return self.exists(
            posixpath.join(folder, SUCCESS_MARKER) if self.remote else os.path.join(folder, SUCCESS_MARKER)
        )

    def join(self, folder: str, *parts: str) -> str:
        """A path inside ``folder``."""
        return posixpath.join(folder, *parts) if self.remote else os.path.join(folder, *parts)

    def write_text(self, path: str, text: str) -> None:
        """Write a whole file. Local writes go through a temp file and a rename, and an S3
        PUT is atomic, so a reader never sees half a file."""
        parent = posixpath.dirname(path) if self.remote else os.path.dirname(path)
        self.fs.create_dir(parent, recursive=True)
        tmp = path if self.remote else f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode("utf-8"))
        if not self.remote:
            os.replace(tmp, path)

    def write_json(self, path: str, obj: Any) -> None:
        """Write ``obj`` as indented, standard JSON: a NaN or infinite number (a loss that
        diverged, a metric never measured) is written as null, which every reader takes."""
        self.write_text(path, json.dumps(finite_json(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    def write_parquet(self, path: str, frame) -> None:
        """A whole Parquet file from a pandas frame, atomically as ``write_text``."""
        table = pa.Table.from_pandas(frame, preserve_index=False)
        self.fs.create_dir(posixpath.dirname(path) if self.remote else os.path.dirname(path), recursive=True)
        if self.remote:
            pq.write_table(table, path, filesystem=self.fs)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def read_text(self, path: str) -> str:
        """A file's text."""
        with self.fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")

    def read_json(self, path: str) -> Any:
        """A JSON file's content."""
        return json.loads(self.read_text(path))

    def mark_complete(self, folder: str) -> None:
        """Write ``_SUCCESS`` into ``folder``: last, once everything else in it is written."""
        self.write_text(self.join(folder, SUCCESS_MARKER), "")

    def unmark_complete(self, folder: str) -> None:
        """Remove ``folder``'s ``_SUCCESS``: first, before anything in it is rewritten."""
        marker = self.join(folder, SUCCESS_MARKER)
        if self.exists(marker):
            self.fs.delete_file(marker)

    def delete_tree(self, folder: str) -> None:
        """Delete a folder and everything in it (nothing when it is absent)."""
        if self.exists(folder):
            self.fs.delete_dir(folder)

    def publish(self, staging: str, final: str) -> None:
        """Make a finished staging folder the artifact at ``final``.

        Local: an atomic rename (an old artifact is moved aside first, then removed).
        S3 has no rename: the artifact is written in place and ``_SUCCESS`` marks it
        complete, so callers build directly at ``final`` there (see ``build_dir``).
        """
        if self.remote:
            return
        old = None
        if os.path.exists(final):
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(staging, final)
        if old:
            self.fs.delete_dir(old)

    def upload_dir(self, local: str, path: str) -> None:
        """Replace the folder ``path`` (on self.fs) with a copy of the local folder ``local``,
        marked complete only once every file is there."""
        self.unmark_complete(path)  # before any file goes: a half-deleted folder never reads as complete
        if self.exists(path):
            self.fs.delete_dir(path)
        self.fs.create_dir(path, recursive=True)  # a local destination's folder is not made by copy_files
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        self.mark_complete(path)

    def build_dir(self, kind: str, name: str) -> str:
        """Where to build an artifact: a staging folder locally, the final folder on S3."""
        return self.path(kind, name) if self.remote else self.staging_dir(kind, name)

    # -- readers for later stages and the dashboard --------------------------------------
    def list_datasets(self) -> list[str]:
        """Names of complete prepared datasets."""
        folder = self.path("data")
        if not self.exists(folder):
            return []
        names = []
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            name = info.base_name
            if info.type == pafs.FileType.Directory and not name.startswith("."):
                if self.is_complete(info.path):
                    names.append(name)
        return sorted(names)

    def dataset_report(self, name: str) -> dict[str, Any]:
        """The data report of a prepared dataset."""
        return self.read_json(self.dataset_file(name, REPORT_FILE))

    def dataset_label_map(self, name: str) -> dict[str, Any]:
        """The label map of a prepared dataset."""
        return self.read_json(self.dataset_file(name, LABEL_MAP_FILE))
