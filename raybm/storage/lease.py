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

A lease's age is read on the store's own clock (the file's modification time against the
local clock of the folder's machine; on S3 the object's ``Last-Modified`` against the
server's ``Date``), never on the writer's: a job whose clock runs ahead cannot find a live
lease stale. An empty or unreadable lease file (its writer died between creating and
writing it) is stale once that age passes the time-to-live. Each takeover raises the
lease's generation; a holder checks its token and generation before it publishes
(``Lease.check``, fencing) and stops with an error when another job took the lease.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any

from raybm.errors import RaybmError
from raybm.storage.fs import s3_client
from raybm.storage.results import Results


def owner_record(ttl_s: float) -> dict[str, Any]:
    """Who holds a lease: a fresh token, this host and process, the Ray job (if any)."""
    record: dict[str, Any] = {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ttl_s": ttl_s,
    }
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
        from raybm.ray_patches import ray_job_ended

        return bool(ray_job_ended(job))
    except Exception:  # noqa: BLE001 - cannot tell: the time-to-live decides
        return False
    return False


class _Store:
    """Create / replace / delete one small file with compare-and-swap semantics. A version
    tag is the S3 ETag, or locally a digest of the file's bytes."""

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
        return _tag(body)

    def read(self) -> tuple[dict[str, Any], str, float] | None:
        """(record, version tag, age in seconds on the store's clock), or None when there is
        no file. An empty or unreadable file reads as the record ``{}``."""
        if self.results.remote:
            from botocore.exceptions import ClientError

            try:
                got = self.s3.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                    return None
                raise
            body = got["Body"].read()
            now = _server_time(got) or time.time()
            return _parse(body), got["ETag"], max(0.0, now - got["LastModified"].timestamp())
        try:
            with open(self.path, "rb") as f:
                body = f.read()
                written = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _parse(body), _tag(body), max(0.0, self._folder_now() - written)

    def _folder_now(self) -> float:
        """The time on the clock that stamps the lease folder's files (a shared folder's
        server, not this machine): the modification time of a file written just now."""
        probe = f"{self.path}.clock-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb"):
                pass
            return os.stat(probe).st_mtime
        except OSError:
            return time.time()
        finally:
            try:
                os.remove(probe)
            except OSError:
                pass

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
            return _tag(body)
        aside = f"{self.path}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        with open(aside, "rb") as f:
            seen = _tag(f.read())
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


def _tag(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]


def _parse(body: bytes) -> dict[str, Any]:
    """A lease record; ``{}`` for an empty or damaged file (a writer that died mid-write)."""
    try:
        record = json.loads(body)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _server_time(response: dict[str, Any]) -> float | None:
    """The S3 server's clock from a response's ``Date`` header."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        return parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None


class Lease:
    """A held lease: ``check()`` before publishing (fencing)."""

    def __init__(self, store: _Store, record: dict[str, Any], what: str) -> None:
        self.store, self.record, self.what = store, record, what
        self.lost = threading.Event()

    def check(self) -> None:
        """Raise a RaybmError when another job holds the lease now (it found this job's
        lease stale and took it over): this job must not publish over that job's work."""
        current = self.store.read()
        held = current[0] if current else {}
        if (
            self.lost.is_set()
            or held.get("token") != self.record["token"]
            or held.get("generation") != self.record["generation"]
        ):
            self.lost.set()
            who = f"host {held.get('host')}, pid {held.get('pid')}" if held else "nobody now"
            raise RaybmError(
                f"{self.what}: this job lost its lease (held by {who}) while it worked, so it publishes "
                f"nothing: the other job's writes win. Its lease was not renewed within "
                f"storage.lease_ttl_s (a stalled process or a slow store?); raise it and run again."
            )


@contextmanager
def hold_lease(
    results: Results, kind: str, name: str, what: str, log: Callable[[str], object] = print
) -> Iterator[Lease]:
    """Hold the lease of ``<root>/<kind>/<name>`` while the block runs: a second writer of
    the same artifact is refused with an error naming the holder; a stale lease is taken
    over. ``what`` names the artifact in messages. Yields the ``Lease``, whose ``check()``
    the block calls before it publishes."""
    ttl_s = results.storage.lease_ttl_s
    store = _Store(results, results.lease_path(kind, name))
    record = owner_record(ttl_s)
    record["generation"] = 1
    tag = None
    for _ in range(5):
        record["renewed_at"] = time.time()
        tag = store.create(json.dumps(record).encode())
        if tag is not None:
            break
        current = store.read()
        if current is None:
            continue  # released meanwhile: try again
        held, held_tag, age = current
        held_ttl = _ttl_of(held, ttl_s)
        if age <= held_ttl and not (held and owner_gone(held)):
            who = (
                (
                    f"host {held.get('host')}, pid {held.get('pid')}"
                    + (f", Ray job {held['ray_job']}" if held.get("ray_job") else "")
                )
                if held
                else "a job whose lease file is still being written"
            )
            raise RaybmError(
                f"{what} is being written by another job ({who}; lease renewed {age:.0f} s ago): "
                f"{results.uri(store.path)}. Wait for that job to finish or stop it, or use another "
                f"name. A lease its job stops renewing expires after {held_ttl:g} s "
                f"(storage.lease_ttl_s)."
            )
        record["generation"] = int(held.get("generation") or 0) + 1 if isinstance(held.get("generation"), int) else 2
        tag = store.replace(json.dumps(record).encode(), held_tag, take_over=True)
        if tag is not None:
            log(f"Took over the stale lease of {what} (its job ended, or stopped renewing {age:.0f} s ago)")
            break
    if tag is None:
        raise RaybmError(
            f"{what}: could not take the lease {results.uri(store.path)}; another job keeps taking it. "
            f"Run one job per name."
        )
    lease = Lease(store, record, what)
    stop = threading.Event()
    state = {"tag": tag}

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            record["renewed_at"] = time.time()
            new = store.replace(json.dumps(record).encode(), state["tag"])
            if new is None:
                lease.lost.set()
                log(f"WARNING: the lease of {what} was taken by another job; this job will publish nothing")
                return
            state["tag"] = new

    thread = threading.Thread(target=renew, name="raybm-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=10)
        store.delete(state["tag"])


def _ttl_of(held: dict[str, Any], default: float) -> float:
    try:
        return float(held.get("ttl_s", default))
    except (TypeError, ValueError):
        return default
