"""A sweep's Ray Tune state, sealed so that resuming runs no code from the results store.

Ray Tune keeps a sweep's driver state in its experiment folder (``sweeps/<sweep>/tune/``)
as pickles (``tuner.pkl``, a trial's ``error.pkl``) and as JSON with pickles inside
(``experiment_state-*.json``, the search algorithm's state), and ``Tuner.restore`` loads
them. Anyone who can write to the results store (a shared bucket) could plant one and run
code on the next driver that resumes the sweep.

The driver therefore hands Tune a filesystem (``sealed_filesystem``) that seals every such
file it writes: beside ``<name>`` it writes ``.raybm-seal-<name>``, an HMAC-SHA256 of the
file's path and bytes under a key only this user's drivers hold (``RAYBM_STATE_KEY``, else
``~/.config/raybm/state.key``, made on first use, mode 0600). The seal is written before
the file and keeps the previous digest too, so a driver killed between the two writes
leaves a state that still verifies. Every such file the driver reads back is checked
against its seal, byte for byte as handed to Ray, so nothing swapped in between is ever
unpickled. ``check_sealed`` checks the whole folder before ``Tuner.restore`` and names the
first file that fails.

Trial processes get the filesystem without the key (they write no driver state and read
none); the key never leaves the driver's machine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import posixpath
import secrets

import pyarrow as pa
import pyarrow.fs as pafs

from raybm.errors import RaybmError

STATE_KEY_ENV = "RAYBM_STATE_KEY"
SEAL_PREFIX = ".raybm-seal-"


def state_key() -> bytes:
    """The key that seals sweep state: ``$RAYBM_STATE_KEY``, else this user's key file
    (``~/.config/raybm/state.key``), made with 32 random bytes the first time."""
    given = os.environ.get(STATE_KEY_ENV)
    if given:
        return given.encode()
    folder = os.path.join(os.path.expanduser("~"), ".config", "raybm")
    path = os.path.join(folder, "state.key")
    try:
        if not os.path.exists(path):  # made whole, then linked into place: no reader sees half a key
            os.makedirs(folder, mode=0o700, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(32).encode())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another driver made it first: theirs is the key
            finally:
                os.remove(tmp)
        with open(path, "rb") as f:
            key = f.read()
    except OSError as e:
        raise RaybmError(
            f"cannot keep the key that seals sweep state in {path} ({e.strerror}); set {STATE_KEY_ENV} "
            f"to a secret of your own instead"
        ) from None
    if len(key) < 16:
        raise RaybmError(
            f"{path}: the key that seals sweep state is damaged (under 16 bytes); remove the file "
            f"(sweeps sealed with it can then not be resumed) or set {STATE_KEY_ENV}"
        )
    return key


def is_guarded(root: str, path: str) -> bool:
    """Whether Ray may unpickle the file at ``path`` of the experiment folder ``root``: a
    ``.pkl`` anywhere in it, or a ``.json`` at its top (experiment and search state)."""
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        return False
    rel = path[len(root) + 1 :]
    name = posixpath.basename(rel)
    if name.startswith(SEAL_PREFIX):
        return False
    return name.endswith(".pkl") or ("/" not in rel and name.endswith(".json"))


def _seal_path(path: str) -> str:
    return posixpath.join(posixpath.dirname(path), SEAL_PREFIX + posixpath.basename(path))


def _digest(key: bytes, root: str, path: str, data: bytes) -> str:
    rel = path[len(root.rstrip("/")) + 1 :]
    return hmac.new(key, rel.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _read_all(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _verify(fs: pafs.FileSystem, key: bytes, root: str, path: str, data: bytes) -> bool:
    sealed = _read_all(fs, _seal_path(path))
    try:
        digests = json.loads(sealed)["digests"] if sealed is not None else []
    except (ValueError, KeyError, TypeError):
        return False
    mine = _digest(key, root, path, data)
    return any(isinstance(d, str) and hmac.compare_digest(d, mine) for d in digests)


class _SealingStream:
    """An output stream that buffers a guarded file and, on close, writes its seal, then it."""

    def __init__(self, handler: SealedStateHandler, path: str, metadata: dict[str, str] | None) -> None:
        self.handler, self.path, self.metadata = handler, path, metadata
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        h = self.handler
        data = b"".join(self.chunks)
        previous = _read_all(h.fs, _seal_path(self.path))
        try:
            kept = json.loads(previous)["digests"][:1] if previous is not None else []
        except (ValueError, KeyError, TypeError):
            kept = []
        seal = json.dumps({"digests": [_digest(h.sealing_key(), h.root, self.path, data), *kept]}).encode()
        with h.fs.open_output_stream(_seal_path(self.path)) as out:
            out.write(seal)
        with h.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            out.write(data)


class SealedStateHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over ``fs`` that seals the guarded files it writes
    under the experiment folder ``root`` and verifies those it reads (``key`` None: a
    trial's copy, which passes everything through)."""

    def __init__(self, fs: pafs.FileSystem, root: str, key: bytes | None) -> None:
        self.fs, self.root, self.key = fs, root.rstrip("/"), key

    def __reduce__(self) -> tuple[type, tuple]:  # the key stays on the driver
        return SealedStateHandler, (self.fs, self.root, None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SealedStateHandler) and other.fs.equals(self.fs) and other.root == self.root

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def get_type_name(self) -> str:
        """The filesystem type name pyarrow shows."""
        return f"raybm-sealed+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        """Passed through."""
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        """Passed through."""
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        """Passed through."""
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        """Passed through."""
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        """Passed through."""
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        """Passed through."""
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        """Passed through."""
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        """Passed through."""
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        """A guarded file moves with its seal checked and a new one written."""
        if self.key is not None and (is_guarded(self.root, src) or is_guarded(self.root, dest)):
            data = self._checked(src)
            self._write(dest, data, None)
            self.fs.delete_file(src)
            return
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        """A guarded copy is checked and sealed anew."""
        if self.key is not None and is_guarded(self.root, dest):
            self._write(dest, self._checked(src), None)
            return
        self.fs.copy_file(src, dest)

    def _guarded(self, path: str) -> bool:
        return self.key is not None and is_guarded(self.root, path)

    def sealing_key(self) -> bytes:
        """The key guarded files are sealed and checked with (only the driver's handler has one)."""
        if self.key is None:
            raise OSError("raybm: this copy of Tune's state store has no key to seal or check files with")
        return self.key

    def _checked(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            data = f.read()
        if not _verify(self.fs, self.sealing_key(), self.root, path, data):
            raise OSError(
                f"raybm refused to hand Ray {path}: it does not match the seal raybm wrote with it "
                f"(changed or planted in the results store)"
            )
        return data

    def _write(self, path: str, data: bytes, metadata: dict[str, str] | None) -> None:
        stream = _SealingStream(self, path, metadata)
        stream.write(data)
        stream.close()

    def open_input_stream(self, path: str) -> pa.NativeFile:
        """A guarded file is read whole and handed on only when its seal verifies."""
        if self._guarded(path):
            return pa.BufferReader(self._checked(path))
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        """A guarded file is read whole and handed on only when its seal verifies."""
        if self._guarded(path):
            return pa.BufferReader(self._checked(path))
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        """A guarded file is buffered and sealed as it is closed."""
        if self._guarded(path):
            return pa.PythonFile(_SealingStream(self, path, metadata), mode="w")
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        """Appending to a guarded file is refused (its seal covers whole files)."""
        if self._guarded(path):
            raise OSError(f"raybm: appending to {path} is not supported (its seal covers whole files)")
        return self.fs.open_append_stream(path, metadata=metadata)


def sealed_filesystem(fs: pafs.FileSystem, experiment_path: str) -> pafs.FileSystem:
    """``fs`` as the driver hands it to Ray Tune for the experiment folder ``experiment_path``:
    what Tune writes there that it could unpickle later is sealed, and read back only when
    its seal verifies."""
    return pafs.PyFileSystem(SealedStateHandler(fs, experiment_path, state_key()))


def check_sealed(fs: pafs.FileSystem, experiment_path: str, what: str) -> None:
    """Refuse, before Ray reads anything, an experiment folder with a file Ray would
    unpickle that raybm did not seal (planted, changed, or from a raybm before seals)."""
    key = state_key()
    infos = fs.get_file_info(pafs.FileSelector(experiment_path, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type != pafs.FileType.File or not is_guarded(experiment_path, info.path):
            continue
        data = _read_all(fs, info.path) or b""
        if not _verify(fs, key, experiment_path, info.path, data):
            rel = info.path[len(experiment_path.rstrip("/")) + 1 :]
            raise RaybmError(
                f"{what}: refused to resume: {rel} in its Ray Tune state does not carry a valid raybm seal, so "
                f"it was written by someone else (or by a raybm before seals, or by a driver with another "
                f"{STATE_KEY_ENV}), and loading it could run their code. Nothing was loaded. Start the sweep "
                f"afresh: delete {experiment_path} (its finished trials are lost) or change the sweep's settings."
            )
