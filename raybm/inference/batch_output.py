"""The output folder of a scoring job (``raybm.inference.batch``): Parquet files written in
row order from the driver, a ledger of the input files already scored, and publication.

Each input file's rows go to their own files, ``part-<input>-<chunk>.parquet`` (at most
``ROWS_PER_FILE`` rows each). Once an input file's rows are all written its name is added to
the ledger, ``_job.json``, beside the job's settings. An interrupted job leaves its folder
unpublished (no ``_SUCCESS``; locally under ``<output>.partial``): the same command run again
finds the ledger, deletes any file of an input it had not finished, and scores only the
inputs not in the ledger. The folder is published with ``_SUCCESS`` once every input is in;
locally it is then renamed into place, so a reader never sees half of it."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybm.errors import RaybmError
from raybm.storage.fs import is_s3
from raybm.storage.layout import SUCCESS_MARKER

LEDGER_FILE = "_job.json"
ROWS_PER_FILE = 1_000_000  # rows in each output file
PARTIAL_SUFFIX = ".partial"  # a local output folder while it is built


class OutputFolder:
    """A scoring job's output folder while it is built, new or resumed (``open``)."""

    def __init__(self, fs: pafs.FileSystem, final: str, build: str, output: str, ledger: dict) -> None:
        self.fs, self.final, self.build, self.output, self.ledger = fs, final, build, output, ledger
        self._writer: _LazyWriter | None = None
        self._sink: Any = None
        self._schema: pa.Schema | None = None
        self._input = self._chunk = self._in_file = 0
        self._files: list[str] = []

    @classmethod
    def open(cls, output: str, fs: pafs.FileSystem, final: str, job: dict, log: Callable[[str], None]) -> OutputFolder:
        """The folder for ``output``: a new one, or the unfinished one an interrupted run of the
        same ``job`` (its settings and input files) left. A complete folder, anything else
        at that path, or an unfinished job of other settings is refused."""
        if fs.get_file_info(final).type != pafs.FileType.NotFound:
            if fs.get_file_info(posixpath.join(final, SUCCESS_MARKER)).type == pafs.FileType.File or not is_s3(output):
                raise RaybmError(f"--output {output!r} already exists; give a new folder (or delete that one first)")
        build = final if is_s3(output) else final + PARTIAL_SUFFIX
        ledger = _read_ledger(fs, build)
        if ledger is None:
            if fs.get_file_info(build).type != pafs.FileType.NotFound:
                raise RaybmError(
                    f"--output {output!r}: {build} exists and is no raybm scoring job; give a new "
                    f"folder (or delete that one first)"
                )
            fs.create_dir(build, recursive=True)
            folder = cls(fs, final, build, output, {**job, "done": {}})
            folder._save()
            return folder
        if {k: ledger.get(k) for k in job} != job:
            changed = sorted(k for k in job if ledger.get(k) != job[k])
            raise RaybmError(
                f"--output {output!r}: an unfinished job is there that scored with other settings "
                f"({', '.join(changed)}); rerun it as it was to finish it, or delete {build} to "
                f"start over"
            )
        folder = cls(fs, final, build, output, ledger)
        folder._drop_unfinished()
        log(
            f"resuming the unfinished job in {build}: {len(ledger['done'])} of {len(job['inputs'])} input "
            f"file(s) already scored"
        )
        return folder

    def remaining(self) -> list[int]:
        """Positions (in ``job['inputs']``) of the input files still to score."""
        return [i for i, p in enumerate(self.ledger["inputs"]) if p not in self.ledger["done"]]

    def write(self, batch: pd.DataFrame, inputs: np.ndarray, on_file_done: Callable[[str], None] | None) -> None:
        """Write labelled rows; ``inputs[i]`` is the position of row ``i``'s input file (rows
        arrive in order, so a change of position means the file before is complete)."""
        cuts = [0, *(np.flatnonzero(inputs[1:] != inputs[:-1]) + 1).tolist(), len(batch)]
        for start, end in zip(cuts, cuts[1:]):
            if start == end:
                continue
            position = int(inputs[start])
            if self._writer is not None and position != self._input:
                self._finish_input(on_file_done)
            self._input = position
            self._write_rows(batch.iloc[start:end])

    def finish(self, on_file_done: Callable[[str], None] | None = None, covers_all: bool = False) -> None:
        """The last input's files are complete (with ``covers_all``: the files written hold
        every input's rows, the inputs not told apart)."""
        if self._writer is not None:
            self._finish_input(on_file_done)
        if covers_all:
            self.ledger["done"].update({p: [] for p in self.ledger["inputs"] if p not in self.ledger["done"]})
            self._save()

    def publish(self) -> tuple[int, int]:
        """Write ``_SUCCESS`` (and rename a local folder into place); (rows, files) in it."""
        files = [f.path for f in self.fs.get_file_info(pafs.FileSelector(self.build)) if f.path.endswith(".parquet")]
        rows = sum(pq.read_metadata(self.fs.open_input_file(p)).num_rows for p in files)  # footers only
        with self.fs.open_output_stream(posixpath.join(self.build, SUCCESS_MARKER)):
            pass
        if self.build != self.final:
            os.replace(self.build, self.final)
        return rows, len(files)

    def abandon(self, log: Callable[[str], None]) -> None:
        """After a failure: keep what is complete for a rerun to go on from, or remove the
        folder when nothing is."""
        self._close()
        if self.ledger["done"]:
            log(
                f"the output of {len(self.ledger['done'])} of {len(self.ledger['inputs'])} input file(s) is kept in "
                f"{self.build}: run the same command again to score the rest"
            )
        else:
            self.fs.delete_dir(self.build)

    def _write_rows(self, rows: pd.DataFrame) -> None:
        while len(rows):
            writer = self._writer
            if writer is None or self._in_file >= ROWS_PER_FILE:
                writer = self._open_file()
            take = rows.iloc[: ROWS_PER_FILE - self._in_file]
            rows = rows.iloc[len(take) :]
            table = pa.Table.from_pandas(take, schema=self._schema, preserve_index=False)
            self._schema = self._schema or table.schema  # every file has the first batch's types
            writer.write_table(table)
            self._in_file += len(take)

    def _open_file(self) -> _LazyWriter:
        if self._writer is not None:  # a full file of a long input: its next chunk
            self._close()
            self._chunk += 1
        else:
            self._chunk, self._files = 0, []
        name = f"part-{self._input:05d}-{self._chunk:04d}.parquet"
        self._sink = self.fs.open_output_stream(posixpath.join(self.build, name))
        self._writer, self._in_file = _LazyWriter(self._sink, self._schema), 0
        self._files.append(name)
        return self._writer

    def _finish_input(self, on_file_done: Callable[[str], None] | None) -> None:
        self._close()
        path = self.ledger["inputs"][self._input]
        self.ledger["done"][path] = self._files
        self._save()
        if on_file_done is not None:
            on_file_done(path)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._sink is not None:
            self._sink.close()  # on S3: the upload completes here
        self._writer = self._sink = None

    def _save(self) -> None:
        with self.fs.open_output_stream(posixpath.join(self.build, LEDGER_FILE)) as f:  # one PUT on S3
            f.write(json.dumps(self.ledger, indent=1).encode())

    def _drop_unfinished(self) -> None:
        """Delete the files of inputs an interrupted run had not finished."""
        kept = {name for names in self.ledger["done"].values() for name in names}
        for f in self.fs.get_file_info(pafs.FileSelector(self.build)):
            name = posixpath.basename(f.path)
            if name.endswith(".parquet") and name not in kept:
                self.fs.delete_file(f.path)


class _LazyWriter:
    """A Parquet writer that takes its schema from the first table written (a file's first
    rows may give the schema when the job's first batch had not fixed it yet)."""

    def __init__(self, sink: pa.NativeFile, schema: pa.Schema | None) -> None:
        self._sink, self._schema = sink, schema
        self._writer: Any = None  # pq.ParquetWriter once written to

    def write_table(self, table: pa.Table) -> None:
        """Write ``table``, opening the file's writer with its schema on first use."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._sink, self._schema or table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        """Write the footer (an empty file still gets one)."""
        if self._writer is not None:
            self._writer.close()


def _read_ledger(fs: pafs.FileSystem, build: str) -> dict | None:
    path = posixpath.join(build, LEDGER_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
