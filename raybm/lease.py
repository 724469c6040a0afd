"""One writer per results folder: a lease file that a second job cannot take while the
first one lives.

Two jobs that write the same run, sweep, dataset or export would mix their files. The job
that starts writing one creates its lease file (``<root>/.leases/<kind>-<name>``, outside
the folder, which a rebuild may delete) atomically (``O_EXCL`` locally;
on S3 a PUT with ``If-None-Match: *``, a conditional write) and renews it in the
background every ``ttl / 3`` seconds. Another job finds the lease and is refused with a
clear error, unless the lease is stale: not renewed for ``storage.lease_ttl_s`` seconds (its
job died), or its owner is known to be gone (a process of this host that no longer runs,
a Ray job of this cluster that has ended). A stale lease is taken over atomically (a
rename locally; on S3 a PUT with ``If-Match`` on the stale lease's ETag), so of two jobs
taking over at once only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raybm.errors import RaybmError
from raybm.results import Results, s3_client


def owner_record(ttl_s: float) -> dict[str, Any]:
    """Who holds a lease: a fresh token, this host and process, the Ray job (if any)."""
    record: dict[str, Any] = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                              "ttl_s": ttl_s}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            record.update(ray_job=ctx.get_job_id(), ray_gcs=ctx.gcs_address)
    except Exception:  # noqa: BLE001 - a lease needs no Ray
        pass
    return record


def owner_gone(record: dict[str, Any]) -> bool:
    """Whether the lease's owner is known to have ended: a process of this host that no
    longer runs, or a Ray job of the cluster this process is on that has ended."""
    if record.get("host") == socket.gethostname() and record.get("pid"):
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    job = record.get("ray_job")
    if not job:
        return False
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().gcs_address != record.get("ray_gcs"):
            return False
        from ray._private.state import jobs  # the GCS job table: no dashboard needed

        for info in jobs():
            if info.get("JobID") == job:
                return bool(info.get("IsDead"))
    except Exception:  # noqa: BLE001 - cannot tell: the time-to-live decides
        return False
    return False


class _Store:
    """Create / replace / delete one small file with compare-and-swap semantics."""

    def __init__(self, results: Results, path: str):
        self.results, self.path = results, path
        if results.remote:
            self.s3 = s3_client(results.storage)
            self.bucket, self.key = path.split("/", 1)

    def create(self, body: bytes) -> str | None:
        """Create the file if absent; its version tag, or None when it exists."""
        if self.results.remote:
            from botocore.exceptions import ClientError

            try:
                return self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"]
            except ClientError as e:
                if e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return None
                raise
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return json.loads(body)["token"]

    def read(self) -> tuple[dict[str, Any], str] | None:
        """(record, version tag), or None when there is no file."""
        if self.results.remote:
            from botocore.exceptions import ClientError

            try:
                got = self.s3.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                    return None
                raise
            return json.loads(got["Body"].read()), got["ETag"]
        try:
            with open(self.path, encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:  # being written this instant
            time.sleep(0.1)
            return self.read()
        return record, record.get("token", "")

    def replace(self, body: bytes, tag: str, *, take_over: bool = False) -> str | None:
        """Overwrite the file only if it is still at version ``tag``; the new tag, or None.
        ``take_over``: the current holder is gone (locally the file is moved aside first, so
        of two jobs taking over at once only one wins)."""
        if self.results.remote:
            from botocore.exceptions import ClientError

            try:
                return self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=tag)["ETag"]
            except ClientError as e:
                if e.response["Error"]["Code"] in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict"):
                    return None
                raise
        if not take_over:  # a renewal by the holder: rewritten in place, never absent
            current = self.read()
            if current is None or current[1] != tag:
                return None
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(body)
            os.replace(tmp, self.path)
            return json.loads(body)["token"]
        aside = f"{self.path}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        with open(aside, encoding="utf-8") as f:
            seen = json.load(f).get("token")
        if seen != tag:
            os.rename(aside, self.path)  # renewed meanwhile: not ours to take
            return None
        os.remove(aside)
        return self.create(body)

    def delete(self, tag: str) -> None:
        """Remove the file if it is still at version ``tag``."""
        current = self.read()
        if current is None or current[1] != tag:
            return
        if self.results.remote:
            from botocore.exceptions import ClientError

            try:
                self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=tag)
            except ClientError:
                pass
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


@contextmanager
def hold_lease(results: Results, kind: str, name: str, what: str, log=print) -> Iterator[None]:
    """Hold the lease of ``<root>/<kind>/<name>`` while the block runs: a second writer of
    the same artifact is refused with an error naming the holder; a stale lease is taken
    over. ``what`` names the artifact in messages."""
    ttl_s = results.storage.lease_ttl_s
    store = _Store(results, results.lease_path(kind, name))
    record = owner_record(ttl_s)
    tag = None
    for _ in range(5):
        record["renewed_at"] = time.time()
        tag = store.create(json.dumps(record).encode())
        if tag is not None:
            break
        current = store.read()
        if current is None:
            continue  # released meanwhile: try again
        held, held_tag = current
        age = time.time() - float(held.get("renewed_at", 0))
        if age <= float(held.get("ttl_s", ttl_s)) and not owner_gone(held):
            who = f"host {held.get('host')}, pid {held.get('pid')}" + \
                  (f", Ray job {held['ray_job']}" if held.get("ray_job") else "")
            raise RaybmError(f"{what} is being written by another job ({who}; lease renewed {age:.0f} s ago): "
                             f"{results.uri(store.path)}. Wait for that job to finish or stop it, or use another "
                             f"name. A lease its job stops renewing expires after {held.get('ttl_s', ttl_s):g} s "
                             f"(storage.lease_ttl_s).")
        tag = store.replace(json.dumps(record).encode(), held_tag, take_over=True)
        if tag is not None:
            log(f"Took over the stale lease of {what} (its job ended, or stopped renewing {age:.0f} s ago)")
            break
    if tag is None:
        raise RaybmError(f"{what}: could not take the lease {results.uri(store.path)}; another job keeps taking it. "
                         f"Run one job per name.")
    stop = threading.Event()
    state = {"tag": tag}

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            record["renewed_at"] = time.time()
            new = store.replace(json.dumps(record).encode(), state["tag"])
            if new is None:
                log(f"WARNING: the lease of {what} was taken by another job; this job's writes may mix with its")
                return
            state["tag"] = new

    thread = threading.Thread(target=renew, name="raybm-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        store.delete(state["tag"])
