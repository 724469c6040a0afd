"""Scoring a dataset as a cluster job: Ray Data reads the input in parallel (a local or
``s3://`` file, folder or glob of CSV, TSV, JSONL or Parquet files), a pool of model actors
sized from the cluster labels it, and the labelled rows stream back in order and are
written as Parquet files into the output folder (local or ``s3://``), a batch at a time,
with progress (rows/s) every few seconds. The folder is
published complete, with ``_SUCCESS``, only once every file is in it; locally it is built
beside the final name and renamed into place, so a reader never sees half of it.

Every input row comes out, in input order (files in name order, rows in file order), with
its columns unchanged plus the predicted label and its confidence (and every class's
probability on request); a row with no text keeps an empty label (``label_frame``)."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.inference.loading import read_label_map
from raybm.inference.predict import FORMATS, PROGRESS_EVERY_S, label_frame, output_columns
from raybm.results import SUCCESS_MARKER, is_s3, resolve_uri

GLOB_CHARS = "*?["
SCORE_BATCH_ROWS = 256  # rows a model actor labels at a time
WRITE_BATCH_ROWS = 4096  # rows handed to the writer at a time
ROWS_PER_FILE = 1_000_000  # rows in each output file


def is_folder_job(input_spec: str, output: str) -> bool:
    """Whether a ``raybm predict`` is a scoring job into a folder: its input is on S3, a
    folder or a glob, or its output is on S3 or has no file suffix (a folder)."""
    many = is_s3(input_spec) or any(c in input_spec for c in GLOB_CHARS) or os.path.isdir(input_spec)
    return many or is_s3(output) or os.path.splitext(output.rstrip("/"))[1].lower() not in FORMATS


@dataclass(frozen=True)
class Inputs:
    """The files to score: their filesystem, paths (in name order) and common format."""
    fs: pafs.FileSystem
    paths: list[str]
    fmt: str


def find_inputs(spec: str, storage: StorageConfig) -> Inputs:
    """The files ``spec`` names: one file, every data file under a folder, or a glob
    (``data/*.csv``, ``s3://bucket/in/**/*.parquet``); all of one format. A clear error when
    none matches or the formats differ."""
    fs, path = resolve_uri(spec, storage)
    glob_at = min((i for i, c in enumerate(path) if c in GLOB_CHARS), default=None)
    if glob_at is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            found = [path]
        elif info.type == pafs.FileType.Directory:
            found = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if f.type == pafs.FileType.File and _is_data_file(f.path)]
        else:
            raise RaybmError(f"--input {spec!r}: no such file or folder")
    else:
        base = posixpath.dirname(path[:glob_at]) or "."
        pattern = path.replace("**/", "*")  # fnmatch's * already crosses folders
        found = [f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                 if f.type == pafs.FileType.File and fnmatch.fnmatch(f.path, pattern) and _is_data_file(f.path)]
    if not found:
        raise RaybmError(f"--input {spec!r}: no .csv, .tsv, .jsonl or .parquet file there")
    formats = {FORMATS.get(os.path.splitext(p)[1].lower()) for p in found}
    if None in formats or len(formats) > 1:
        raise RaybmError(f"--input {spec!r}: the files must all be one of .csv, .tsv, .jsonl, .parquet "
                         f"(found {sorted(str(f) for f in formats)}); score each kind apart")
    return Inputs(fs, sorted(found), formats.pop())


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith((".", "_")) and os.path.splitext(name)[1].lower() in FORMATS


def read_inputs(inputs: Inputs):
    """A Ray Dataset of the input rows in order. CSV and TSV columns are read as text, as
    the in-process path reads them (an id ``007`` stays ``007``); Parquet keeps its types."""
    import ray.data

    if inputs.fmt == "parquet":
        return ray.data.read_parquet(inputs.paths, filesystem=inputs.fs)
    if inputs.fmt == "jsonl":
        return ray.data.read_json(inputs.paths, filesystem=inputs.fs)
    sep = "\t" if inputs.fmt == "tsv" else ","
    with inputs.fs.open_input_stream(inputs.paths[0]) as f:
        columns = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=sep),
                                 read_options=pacsv.ReadOptions(block_size=1 << 20)).column_names
    as_text = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=False)
    return ray.data.read_csv(inputs.paths, filesystem=inputs.fs, parse_options=pacsv.ParseOptions(delimiter=sep),
                             convert_options=as_text)


def actor_pool(cpus_per_actor: float, gpus_per_actor: float, concurrency: int | None) -> tuple[int, int]:
    """(fewest, most) model actors: ``concurrency`` when set, else as many as the cluster's
    GPUs hold (``gpus_per_actor``), or its CPUs less one left to reading and writing."""
    import ray

    if concurrency:
        return 1, concurrency
    resources = ray.cluster_resources()
    if gpus_per_actor > 0:
        return 1, max(1, int(resources.get("GPU", 0) / gpus_per_actor))
    return 1, max(1, int((resources.get("CPU", 1) - 1) / cpus_per_actor))


def check_output(output: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of an output folder that does not exist yet (nothing is overwritten)."""
    fs, path = resolve_uri(output, storage)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        raise RaybmError(f"--output {output!r} already exists; give a new folder (or delete that one first)")
    return fs, path


def _write_in_order(ds, fs: pafs.FileSystem, folder: str, log: Callable[[str], None]) -> None:
    """Stream ``ds`` into ``folder`` as ``part-<n>.parquet`` files of at most
    ``ROWS_PER_FILE`` rows, in row order, with every batch cast to the first one's types.
    From the driver, a batch at a time: Ray Data's own ``write_parquet`` (2.60) loses the row
    order even when the dataset preserves it (its iteration keeps it)."""
    fs.create_dir(folder, recursive=True)
    writer, sink, schema, in_file, files, rows = None, None, None, 0, 0, 0
    started = last = time.monotonic()
    try:
        for batch in ds.iter_batches(batch_format="pandas", batch_size=WRITE_BATCH_ROWS):
            table = pa.Table.from_pandas(batch, schema=schema, preserve_index=False)
            if writer is None or in_file >= ROWS_PER_FILE:
                _close(writer, sink)
                schema = schema or table.schema
                sink = fs.open_output_stream(posixpath.join(folder, f"part-{files:05d}.parquet"))
                writer = pq.ParquetWriter(sink, schema)
                files, in_file = files + 1, 0
            writer.write_table(table)
            in_file, rows = in_file + len(table), rows + len(table)
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                log(f"  {rows:,} rows labelled ({rows / (last - started):,.0f} rows/s)")
    finally:
        _close(writer, sink)


def _close(writer, sink) -> None:
    if writer is not None:
        writer.close()
    if sink is not None:
        sink.close()  # on S3: the upload completes here


@dataclass(frozen=True)
class Scored:
    """What a scoring job wrote."""
    rows: int
    files: int
    seconds: float


def score_to_folder(model_dir: str, inputs: Inputs, output: str, text_column: str, *, storage: StorageConfig,
                    probabilities: bool = False, max_length: int | None = None, threads: int = 1,
                    cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, concurrency: int | None = None,
                    log: Callable[[str], None] = print) -> Scored:
    """Label every row of ``inputs`` into Parquet files in the new folder ``output``."""
    import ray.data

    from raybm.inference.evaluate import Classify

    fs, final = check_output(output, storage)
    labels = read_label_map(model_dir, storage if is_s3(model_dir) else None)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # rows leave in input order (a dataset keeps the setting it was made with)
    build = final if is_s3(output) else f"{final}.staging-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        ds = read_inputs(inputs)
        columns = ds.schema().names
        if text_column not in columns:
            raise RaybmError(f"--input: no text column {text_column!r}; columns found: {columns}. "
                             f"Pass --text-column.")
        clash = [c for c in output_columns(labels, probabilities) if c in columns]
        if clash:
            raise RaybmError(f"the input already has the column(s) {clash} that labelling adds; rename or drop "
                             f"them first")

        class Label(Classify):
            def __call__(self, batch):
                return label_frame(batch, text_column, self.predict, labels, probabilities)

        fewest, most = actor_pool(cpus_per_actor, gpus_per_actor, concurrency)
        log(f"scoring {len(inputs.paths)} {inputs.fmt} file(s) with {fewest}-{most} model actor(s) -> {output}")
        labelled = ds.map_batches(Label, batch_format="pandas", batch_size=SCORE_BATCH_ROWS, compute=ray.data.
                                  ActorPoolStrategy(min_size=fewest, max_size=most), num_cpus=cpus_per_actor,
                                  num_gpus=gpus_per_actor or None,
                                  fn_constructor_kwargs={"model_dir": model_dir, "max_length": max_length,
                                                         "threads": threads, "batch_size": SCORE_BATCH_ROWS,
                                                         "device": "cuda" if gpus_per_actor > 0 else "cpu",
                                                         "storage": dataclasses.asdict(storage)})
        _write_in_order(labelled, fs, build, log)
    except BaseException:
        if not is_s3(output) and fs.get_file_info(build).type != pafs.FileType.NotFound:
            fs.delete_dir(build)
        raise
    finally:
        ctx.execution_options.preserve_order = saved
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(build)) if f.path.endswith(".parquet")]
    rows = sum(pq.read_metadata(fs.open_input_file(p)).num_rows for p in files)  # footers only
    with fs.open_output_stream(posixpath.join(build, SUCCESS_MARKER)):
        pass
    if build != final:
        os.replace(build, final)
    seconds = time.monotonic() - started
    log(f"labelled {rows:,} rows into {len(files)} Parquet file(s) in {seconds:.0f} s "
        f"({rows / max(seconds, 1e-9):,.0f} rows/s) -> {output}")
    return Scored(rows, len(files), seconds)
