"""Scoring a dataset as a cluster job: Ray Data reads the input in parallel (a local or
``s3://`` file, folder or glob of CSV, TSV, JSONL or Parquet files), a pool of model actors
sized from the cluster labels it, and the labelled rows stream back in order to the driver,
which writes them as Parquet files into the output folder (local or ``s3://``), a batch at a
time, with progress (rows/s, ETA) every few seconds. The folder, its ledger of scored input
files (an interrupted job's rerun scores only the rest) and its publication with
``_SUCCESS`` are ``raybm.inference.batch_output``'s.

Every input row comes out, in input order (files in name order, rows in file order), with
its columns unchanged plus the predicted label and its confidence (and every class's
probability on request); a row with no text keeps an empty label (``label_frame``)."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from raybm.config import StorageConfig
from raybm.errors import RaybmError
from raybm.inference.batch_output import OutputFolder
from raybm.inference.loading import read_label_map
from raybm.inference.predict import FORMATS, PROGRESS_EVERY_S, label_frame, output_columns
from raybm.placement import alive_nodes, place
from raybm.storage.fs import is_s3, resolve_uri

if TYPE_CHECKING:
    from ray.data import Dataset

GLOB_CHARS = "*?["
SCORE_BATCH_ROWS = 1024  # rows a model actor takes at a time (run shortest first inside)
ACTORS_START_S = 600  # how long a scoring job waits for its pool's fewest actors to start
WRITE_BATCH_ROWS = 4096  # rows handed to the writer at a time
PATH_COLUMN = "path"  # Ray Data's column naming each row's input file (include_paths)
SAMPLE_BYTES = 1 << 20  # read from the first input to learn its columns and rows per byte
SCORE_BLOCK_BYTES = 1 << 20  # Ray Data blocks of the job: labelled rows stream back a few thousand at a time
READ_CPUS = 0.25  # a read task's CPUs: light next to a model, and room beside fractional actors on every node


def is_folder_job(input_spec: str, output: str) -> bool:
    """Whether a ``raybm predict`` is a scoring job into a folder: its input is on S3, a
    folder or a glob, or its output is on S3 or has no file suffix (a folder)."""
    many = is_s3(input_spec) or any(c in input_spec for c in GLOB_CHARS) or os.path.isdir(input_spec)
    return many or is_s3(output) or os.path.splitext(output.rstrip("/"))[1].lower() not in FORMATS


@dataclass(frozen=True)
class Inputs:
    """The files to score: their filesystem, paths (in name order), sizes and common format."""

    fs: pafs.FileSystem
    paths: list[str]
    fmt: str
    sizes: tuple[int, ...] = ()


def find_inputs(spec: str, storage: StorageConfig) -> Inputs:
    """The files ``spec`` names: one file, every data file under a folder, or a glob
    (``data/*.csv``, ``s3://bucket/in/**/*.parquet``); all of one format. A clear error when
    none matches or the formats differ."""
    fs, path = resolve_uri(spec, storage)
    glob_at = min((i for i, c in enumerate(path) if c in GLOB_CHARS), default=None)
    if glob_at is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            found = [info]
        elif info.type == pafs.FileType.Directory:
            found = [
                f
                for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if f.type == pafs.FileType.File and _is_data_file(f.path)
            ]
        else:
            raise RaybmError(f"--input {spec!r}: no such file or folder")
    else:
        base = posixpath.dirname(path[:glob_at]) or "."
        pattern = path.replace("**/", "*")  # fnmatch's * already crosses folders
        found = [
            f
            for f in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            if f.type == pafs.FileType.File and fnmatch.fnmatch(f.path, pattern) and _is_data_file(f.path)
        ]
    if not found:
        raise RaybmError(f"--input {spec!r}: no .csv, .tsv, .jsonl or .parquet file there")
    kinds = [FORMATS.get(os.path.splitext(f.path)[1].lower()) for f in found]
    formats = {k for k in kinds if k is not None}
    if None in kinds or len(formats) > 1:
        raise RaybmError(
            f"--input {spec!r}: the files must all be one of .csv, .tsv, .jsonl, .parquet "
            f"(found {sorted(str(k) for k in set(kinds))}); score each kind apart"
        )
    found.sort(key=lambda f: f.path)
    return Inputs(fs, [f.path for f in found], formats.pop(), tuple(f.size or 0 for f in found))


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith((".", "_")) and os.path.splitext(name)[1].lower() in FORMATS


def input_columns(inputs: Inputs) -> list[str]:
    """The first input file's column names (from its footer or its first block, not the whole file)."""
    fs, first = inputs.fs, inputs.paths[0]
    if inputs.fmt == "parquet":
        return pq.read_schema(fs.open_input_file(first)).names
    if inputs.fmt == "jsonl":
        with fs.open_input_stream(first) as f:
            head = f.read(SAMPLE_BYTES)
        lines = head[: head.rfind(b"\n") + 1] or head
        return pajson.read_json(pa.BufferReader(lines)).column_names
    with fs.open_input_stream(first) as f:
        return pacsv.open_csv(f, parse_options=_csv_options(inputs.fmt)).schema.names


def _csv_options(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)


def read_inputs(inputs: Inputs, positions: list[int], columns: list[str], with_paths: bool) -> Dataset:
    """A Ray Dataset of the rows of the input files at ``positions``, in order (with the
    ``path`` column naming each row's file when ``with_paths``). CSV and TSV columns are
    read as text, as the in-process path reads them (an id ``007`` stays ``007``); Parquet
    keeps its types."""
    import ray.data

    paths = [inputs.paths[i] for i in positions]
    common = {"filesystem": inputs.fs, "include_paths": with_paths, "num_cpus": READ_CPUS}
    if inputs.fmt == "parquet":
        ctx = ray.data.DataContext.get_current()
        saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:  # Ray 2.60's new Parquet path lists files in a task of a whole CPU, which waits forever
            return ray.data.read_parquet(paths, **common)  # where the actors left each node less
        finally:
            ctx.use_datasource_v2 = saved
    if inputs.fmt == "jsonl":
        return ray.data.read_json(paths, **common)
    as_text = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=False)
    return ray.data.read_csv(paths, parse_options=_csv_options(inputs.fmt), convert_options=as_text, **common)


def estimate_rows(inputs: Inputs, positions: list[int]) -> tuple[int, bool]:
    """(rows, exact) in the input files at ``positions``: Parquet footers say it (up to 64
    files read; more are extrapolated by size); text formats are estimated from the rows
    per byte of the first file's first MiB."""
    sizes = [inputs.sizes[i] if inputs.sizes else 0 for i in positions]
    if inputs.fmt == "parquet":
        sample = positions[:64]
        counted = sum(pq.read_metadata(inputs.fs.open_input_file(inputs.paths[i])).num_rows for i in sample)
        if len(sample) == len(positions):
            return counted, True
        per_byte = counted / max(1, sum(sizes[: len(sample)]))
    else:
        with inputs.fs.open_input_stream(inputs.paths[positions[0]]) as f:
            head = f.read(SAMPLE_BYTES)
        per_byte = max(1, head.count(b"\n") - (inputs.fmt != "jsonl")) / max(1, len(head))
    return int(per_byte * sum(sizes)), False


@dataclass(frozen=True)
class ActorPool:
    """How many model actors a job runs (Ray Data scales between the two) and their torch threads."""

    fewest: int
    most: int
    threads: int


def actor_pool(
    cpus_per_actor: float, gpus_per_actor: float, concurrency: int | None, threads: int | None = None
) -> ActorPool:
    """The model actors for this cluster: exactly ``concurrency`` when set, else up to as many
    as its GPUs hold (``gpus_per_actor``), or its CPUs less one left to reading and writing. Threads,
    unless given: on CPU the cluster's cores shared among the actors (one actor on 2 cores
    runs 2 threads), at least ``cpus_per_actor``; on GPU ``cpus_per_actor`` (tokenizing)."""
    import ray

    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 1)
    if concurrency:
        most = concurrency
    elif gpus_per_actor > 0:
        most = max(1, int(resources.get("GPU", 0) / gpus_per_actor))
    else:
        most = max(1, int((cpus - 1) / cpus_per_actor))
    if threads is None:
        threads = max(1, int(cpus_per_actor), 0 if gpus_per_actor > 0 else int(cpus // most))
    return ActorPool(most if concurrency else 1, most, threads)


class _Progress:
    """A line every ``PROGRESS_EVERY_S``: rows done, of how many, rows/s and the time left."""

    def __init__(self, total: int, exact: bool, log: Callable[[str], None]) -> None:
        self.total, self.exact, self.log, self.rows = total, exact, log, 0
        self.started = self.last = time.monotonic()

    def add(self, rows: int) -> None:
        """Count ``rows`` more written, and say so if it is time."""
        self.rows += rows
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last, rate = now, self.rows / max(now - self.started, 1e-9)
        line = f"  {self.rows:,} rows labelled ({rate:,.0f} rows/s)"
        if self.total > self.rows:
            line += (
                f", {self.rows / self.total:.0%} of {'' if self.exact else '~'}{self.total:,}; "
                f"about {_duration((self.total - self.rows) / max(rate, 1e-9))} left"
            )
        self.log(line)


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {int(seconds % 60):02d} s"


@dataclass(frozen=True)
class Scored:
    """What a scoring job wrote."""

    rows: int
    files: int
    seconds: float


def _check_columns(columns: list[str], text_column: str, labels: list[str], probabilities: bool) -> None:
    if text_column not in columns:
        raise RaybmError(f"--input: no text column {text_column!r}; columns found: {columns}. Pass --text-column.")
    clash = [c for c in output_columns(labels, probabilities) if c in columns]
    if clash:
        raise RaybmError(f"the input already has the column(s) {clash} that labelling adds; rename or drop them first")


def score_to_folder(
    model_dir: str,
    inputs: Inputs,
    output: str,
    text_column: str,
    *,
    storage: StorageConfig,
    probabilities: bool = False,
    max_length: int | None = None,
    threads: int | None = None,
    batch_size: int = 64,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    concurrency: int | None = None,
    log: Callable[[str], None] = print,
    on_file_done: Callable[[str], None] | None = None,
) -> Scored:
    """Label every row of ``inputs`` into Parquet files in the folder ``output`` (new, or the
    unfinished one an interrupted run of the same job left); ``on_file_done(path)`` after each
    input file's rows are all written."""
    labels = read_label_map(model_dir, storage if is_s3(model_dir) else None)
    columns = input_columns(inputs)
    _check_columns(columns, text_column, labels, probabilities)
    tracked = PATH_COLUMN not in columns  # else Ray Data's path column would overwrite the input's
    fs, final = resolve_uri(output, storage)
    job = {
        "model": model_dir,
        "text_column": text_column,
        "probabilities": probabilities,
        "max_length": max_length,
        "inputs": inputs.paths,
    }
    folder = OutputFolder.open(output, fs, final, job, log)
    started = time.monotonic()
    todo = folder.remaining() if tracked else list(range(len(inputs.paths)))
    if not tracked:
        log(
            f"the input has a column named {PATH_COLUMN!r}: this job cannot tell its files apart, so an "
            f"interrupted run will start over"
        )
    if todo:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        saved = ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.wait_for_min_actors_s
        # Rows leave in input order, in blocks of about a MiB, not the 128 MiB Ray Data gathers
        # a task's output into by default: a whole file of tweets would come back at once, at
        # its end. (A dataset keeps the settings it was made with.) The pool's fewest actors all
        # start before the first file is read: otherwise the reads can take a node's CPUs
        # first, and a fixed pool runs short of the actors it announced (on a cluster, a node
        # that scores nothing). Bounded: a cluster that cannot hold them fails, said below.
        ctx.execution_options.preserve_order, ctx.target_max_block_size = True, SCORE_BLOCK_BYTES
        ctx.wait_for_min_actors_s = ACTORS_START_S
        try:
            pool = actor_pool(cpus_per_actor, gpus_per_actor, concurrency, threads)
            actor = {"CPU": cpus_per_actor, **({"GPU": gpus_per_actor} if gpus_per_actor else {})}
            if not place([dict(actor) for _ in range(pool.fewest)], alive_nodes()):
                raise RaybmError(
                    f"{pool.fewest} model actor(s) of {cpus_per_actor:g} CPU(s)"
                    + (f" and {gpus_per_actor:g} GPU(s)" if gpus_per_actor else "")
                    + " do not fit this Ray's nodes; lower predict.concurrency or predict.cpus_per_actor"
                )
            log(
                f"scoring {len(todo)} {inputs.fmt} file(s) with {pool.fewest}-{pool.most} model actor(s) of "
                f"{pool.threads} thread(s) -> {output}"
            )
            labelled = _labelled(
                read_inputs(inputs, todo, columns, tracked),
                model_dir,
                text_column,
                labels,
                pool,
                probabilities=probabilities,
                max_length=max_length,
                batch_size=batch_size,
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                storage=storage,
            )
            _write(
                labelled,
                folder,
                {p: i for i, p in enumerate(inputs.paths)} if tracked else None,
                _Progress(*estimate_rows(inputs, todo), log),
                on_file_done,
            )
        except BaseException as e:
            folder.abandon(log)
            if "Timed out while starting actors" in str(e):
                raise RaybmError(
                    f"the {pool.fewest} model actor(s) of {cpus_per_actor:g} CPU(s)"
                    + (f" and {gpus_per_actor:g} GPU(s)" if gpus_per_actor else "")
                    + f" did not all start within {ACTORS_START_S} s: this Ray cannot hold them now. Lower "
                    f"predict.concurrency or predict.cpus_per_actor, or free the cluster"
                ) from None
            raise
        finally:
            ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.wait_for_min_actors_s = saved
    rows, files = folder.publish()
    seconds = time.monotonic() - started
    log(
        f"labelled {rows:,} rows into {files} Parquet file(s) in {seconds:.0f} s "
        f"({rows / max(seconds, 1e-9):,.0f} rows/s) -> {output}"
    )
    return Scored(rows, files, seconds)


def _labelled(
    ds: Dataset,
    model_dir: str,
    text_column: str,
    labels: list[str],
    pool: ActorPool,
    *,
    probabilities: bool,
    max_length: int | None,
    batch_size: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    storage: StorageConfig,
) -> Dataset:
    """``ds`` labelled by a pool of model actors."""
    import ray.data

    from raybm.inference.evaluate import Classify

    class Label(Classify):
        def __call__(self, batch):
            return label_frame(batch, text_column, self.predict, labels, probabilities)

    return ds.map_batches(
        Label,
        batch_format="pandas",
        batch_size=SCORE_BATCH_ROWS,
        compute=ray.data.ActorPoolStrategy(min_size=pool.fewest, max_size=pool.most),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "max_length": max_length,
            "threads": pool.threads,
            "batch_size": batch_size,
            "device": "cuda" if gpus_per_actor > 0 else "cpu",
            "storage": dataclasses.asdict(storage),
        },
    )


def _write(
    labelled: Dataset,
    folder: OutputFolder,
    positions: dict[str, int] | None,
    progress: _Progress,
    on_file_done: Callable[[str], None] | None,
) -> None:
    """Stream the labelled rows to ``folder`` in row order. From the driver, a batch at a
    time: Ray Data's own ``write_parquet`` (2.60) loses the row order even when the dataset
    preserves it (its iteration keeps it)."""
    for batch in labelled.iter_batches(batch_format="pandas", batch_size=WRITE_BATCH_ROWS):
        if positions is None:
            where: np.ndarray = np.zeros(len(batch), dtype=np.int64)
        else:
            where = batch.pop(PATH_COLUMN).map(positions).to_numpy()
        folder.write(batch, where, on_file_done)
        progress.add(len(batch))
    folder.finish(on_file_done, covers_all=positions is None)
