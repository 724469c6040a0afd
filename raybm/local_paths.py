"""Local paths that stay where they belong: a name taken from a store confined to the
folder it is copied into, a local folder with no link leading out of it, and scratch
folders private to this user. Whoever can write to a shared bucket, or to a shared
machine's temp folder, must not be able to make raybm write, read or load files elsewhere."""

from __future__ import annotations

import os
import tempfile

from raybm.errors import RaybmError


def confined_path(local: str, rel: str, source: str) -> str:
    """The local path of the store's entry ``rel`` (a ``/``-separated name relative to a
    folder, e.g. an S3 key below a prefix) inside the local folder ``local``. A name that
    would leave the folder (``..`` or ``.`` segments, an absolute name, backslashes, empty
    segments, NUL) is refused with a RaybmError naming it and ``source``: whoever can write
    to the store must not be able to write files anywhere else on a node."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise RaybmError(
            f"{source}: refused the entry {rel!r}: its name would leave the folder it is copied "
            f"into (only plain names separated by '/' are allowed). Remove it from the store; "
            f"nothing was written for it."
        )
    return os.path.join(local, *parts)


def check_no_links_out(folder: str, source: str) -> None:
    """Refuse a local folder holding a symbolic link that leads outside it: copying the
    folder would copy whatever the link points at (another user's files, a key)."""
    real = os.path.realpath(folder)
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = os.path.join(here, name)
            if os.path.islink(entry):
                target = os.path.realpath(entry)
                if os.path.commonpath([real, target]) != real:
                    raise RaybmError(
                        f"{source}: refused {os.path.relpath(entry, folder)!r}, a link that leads "
                        f"outside the folder (to {target}); replace it with the file itself"
                    )


def private_temp_dir(kind: str) -> str:
    """``<temp>/raybm-<uid>/<kind>``: this user's own folder under the node's temp folder
    (mode 0700), never a shared predictable one another user could create first and fill. A
    folder of that name another user owns is refused."""
    base = os.path.join(tempfile.gettempdir(), f"raybm-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    info = os.lstat(base)
    if info.st_uid != os.getuid() or os.path.islink(base):
        raise RaybmError(
            f"{base} belongs to another user (or is a link): remove it, or set TMPDIR to a folder of your own"
        )
    os.chmod(base, 0o700)
    folder = os.path.join(base, kind)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder
