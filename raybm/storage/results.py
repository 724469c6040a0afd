"""The results root: ``Results`` knows where every artifact lives under it and reads and
writes there (local or S3), publishing a folder only when it is complete.

Every stage and the dashboard read and write through ``Results``; no other module builds
a results path by hand. The names are raybm.storage.layout's."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybm.config import StorageConfig, check_name
from raybm.storage.fs import check_bucket, finite_json, is_s3, resolve_uri
from raybm.storage.layout import (
    DATASETS,
    EXPORTS,
    LABEL_MAP_FILE,
    LEASES,
    PIPELINES,
    REGISTRY,
    REPORT_FILE,
    RUNS,
    SPLITS,
    SUCCESS_MARKER,
    SWEEPS,
)
from raybm.storage.records import DataReport

if TYPE_CHECKING:
    import pandas as pd

    from raybm.config import JobConfig

T = TypeVar("T")


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

    def registry_dir(self, name: str, version: int | str) -> str:
        """The folder of a version of MLflow's Model Registry, fetched once (``registry/<name>-v<version>``)."""
        return self.path(REGISTRY, f"{name}-v{version}")

    def lease_path(self, kind: str, name: str) -> str:
        """The lease file of ``<kind>/<name>`` (raybm.storage.lease): beside the artifacts, not in
        the artifact's folder, which a rebuild may delete."""
        check_name(name, f"{kind} name")
        return self.path(LEASES, f"{kind}-{name}")

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

    def write_parquet(self, path: str, frame: pd.DataFrame) -> None:
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

    def publish(
        self,
        final: str,
        build: Callable[[str], T],
        *,
        local_build: bool = False,
        before_publish: Callable[[], None] = lambda: None,
    ) -> T:
        """Build an artifact and make it the folder ``final`` in one step, ``_SUCCESS`` last:
        the one way every stage publishes. ``build(folder)`` writes everything into
        ``folder`` (which does not exist yet) and returns what the caller wants back.

        ``folder`` is a hidden staging sibling of ``final`` renamed into place when done
        (local roots: an old artifact is moved aside first, then removed), or on S3, which
        has no rename, ``final`` itself, emptied and unmarked first and marked complete last.
        With ``local_build`` (a builder that writes plain local files) it is, on S3, a local
        temporary folder uploaded when done. ``before_publish`` runs between
        the build and the publishing (a lease's fencing check). A failed build leaves
        nothing behind: the old artifact, if any, as it was (on S3 it was emptied first)."""
        if local_build and self.remote:
            with tempfile.TemporaryDirectory(prefix="raybm-build-") as tmp:
                out = build(os.path.join(tmp, "out"))
                before_publish()
                self.upload_dir(os.path.join(tmp, "out"), final)
                return out
        folder = final if self.remote else self._staging_sibling(final)
        if self.remote:
            self.unmark_complete(final)  # first: a half-deleted folder never reads as complete
            self.delete_tree(final)
        try:
            out = build(folder)
            before_publish()
            self.mark_complete(folder)
            if not self.remote:
                self._swap_into_place(folder, final)
        except BaseException:
            self.delete_tree(folder)
            raise
        return out

    def _staging_sibling(self, final: str) -> str:
        """A fresh hidden sibling folder of ``final`` (local roots) to build it in."""
        parent, name = os.path.split(final.rstrip(os.sep))
        os.makedirs(parent, exist_ok=True)
        return os.path.join(parent, f".staging-{name}-{uuid.uuid4().hex[:8]}")

    @staticmethod
    def _swap_into_place(staging: str, final: str) -> None:
        """Rename a complete local ``staging`` folder to ``final``: an old artifact there is
        moved aside first (one rename), then removed."""
        old = None
        if os.path.exists(final):
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(staging, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def upload_dir(self, local: str, path: str) -> None:
        """Replace the folder ``path`` (on self.fs) with a copy of the local folder ``local``,
        marked complete only once every file is there."""
        self.unmark_complete(path)  # before any file goes: a half-deleted folder never reads as complete
        if self.exists(path):
            self.fs.delete_dir(path)
        self.fs.create_dir(path, recursive=True)  # a local destination's folder is not made by copy_files
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        self.mark_complete(path)

    # -- readers for later stages and the dashboard --------------------------------------
    def list_datasets(self) -> list[str]:
        """Names of complete prepared datasets."""
        folder = self.path(DATASETS)
        if not self.exists(folder):
            return []
        names = []
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            name = info.base_name
            if info.type == pafs.FileType.Directory and not name.startswith("."):
                if self.is_complete(info.path):
                    names.append(name)
        return sorted(names)

    def dataset_report(self, name: str) -> DataReport:
        """The data report of a prepared dataset."""
        path = self.dataset_file(name, REPORT_FILE)
        return DataReport.from_json(self.read_json(path), self.uri(path))

    def dataset_label_map(self, name: str) -> dict[str, Any]:
        """The label map of a prepared dataset."""
        return self.read_json(self.dataset_file(name, LABEL_MAP_FILE))


def job_for_workers(cfg: JobConfig) -> dict[str, Any]:
    """The job config as a dict for processes that run elsewhere (Ray Train workers, Tune
    trials): a local results root made absolute, since those processes start in folders of
    their own (a Tune trial runs in its trial folder), where a relative root means nothing."""
    job = cfg.to_dict()
    if not is_s3(job["storage"]["root"]):
        job["storage"]["root"] = os.path.abspath(os.path.expanduser(job["storage"]["root"]))
    return job
