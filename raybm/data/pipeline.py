"""The data stage on the driver: source -> clean -> de-duplicate -> split -> report.

``run_data_stage`` builds a Ray Data pipeline, writes the prepared splits as Parquet
into the results folder with the label map, the resolved config and a data report, and
publishes the folder only when every file is written. ``load_split`` is how later stages
read a prepared split back as a lazy Dataset.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybm.config import CleanConfig, JobConfig, config_hash, safe_name
from raybm.data import cleaning, splitting
from raybm.data.report import build_report
from raybm.data.sources import Source, find_undecodable, read_source, resolve_source
from raybm.data.tokenizing import CountTokens
from raybm.data.udf import map_batches_cached
from raybm.errors import DataError, RaybmError
from raybm.storage.layout import CONFIG_FILE, DATASETS, LABEL_MAP_FILE, REPORT_FILE, SPLITS
from raybm.storage.lease import hold_lease
from raybm.storage.records import DataReport
from raybm.storage.results import Results

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    from ray.data import Dataset

TASK_ROWS = 20_000  # rows a cleaning or token-counting task takes: few tasks to start, even ones
BLOCK_BYTES = 16 << 20  # Ray Data blocks of the stage: one large file read is cleaned and counted on every CPU


@dataclass
class PreparedData:
    """What the data stage hands on: where the prepared dataset is, and its report."""

    name: str
    path: str  # URI of the dataset folder
    report: DataReport
    reused: bool = False


def dataset_name(cfg: JobConfig, src: Source) -> str:
    """The prepared dataset's name: ``data.name``, else the source's name and a hash of the data config."""
    if cfg.data.name:
        return cfg.data.name
    return safe_name(f"{src.name}-{data_config_hash(cfg)}")


def data_config_hash(cfg: JobConfig) -> str:
    """A hash of everything that changes the prepared data or its report."""

    @dataclasses.dataclass
    class _Key:  # everything that changes the prepared data or its report
        data: Any
        model: str

    return config_hash(_Key(data=cfg.data, model=cfg.model.name))


# --------------------------------------------------------------------------- labels


def _resolve_labels(cfg: JobConfig, src: Source, raw_ds: Dataset) -> cleaning.LabelMapper:
    d = cfg.data
    if src.all_labels is not None:  # built-in corpus: its label set is known
        labels = d.labels or src.default_labels or src.all_labels
        unknown = [lab for lab in labels if lab not in src.all_labels and lab not in d.label_values.values()]
        if unknown:
            raise DataError(f"data.labels {unknown} are not labels of {d.source}; it has: {src.all_labels}")
        exclude = sorted(set(src.all_labels) - set(labels) | set(d.exclude_labels))
        return cleaning.LabelMapper(labels, d.label_values, exclude)
    if d.labels:
        return cleaning.LabelMapper(list(d.labels), d.label_values, list(d.exclude_labels))
    # Infer: every distinct raw value (after label_values), minus the excluded, sorted.
    raws = {cleaning.normalize_raw_label(v) for v in count_values(raw_ds, "label_raw")}
    names = {d.label_values.get(r, r) for r in raws if r is not None}
    labels = sorted(n for n in names if n not in set(d.exclude_labels))
    if len(labels) < 2:
        raise DataError(
            f"found {len(labels)} label value(s) {labels} in {d.label_column!r}; a classifier "
            f"needs at least 2. Check data.label_column and data.exclude_labels."
        )
    return cleaning.LabelMapper(labels, d.label_values, list(d.exclude_labels))


# ----------------------------------------------------------------------------- errors


def _translate_read_error(exc: BaseException, src: Source) -> RaybmError | None:
    """Turn a failure inside Ray Data's readers into a message that says what to do."""
    if isinstance(exc, RaybmError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, RaybmError):
            return cause
        text += f"\n{type(cause).__name__}: {cause}"
        cause = cause.__cause__
    if src.format != "parquet" and any(
        s in text for s in ("UnicodeDecodeError", "invalid UTF8", "can't decode", "codec", "Failed to read")
    ):
        bad = find_undecodable(src)
        if bad:
            return DataError(
                f"{bad[0]} (byte {bad[1]}): not valid {src.encoding} text; set data.encoding "
                f"to the file's encoding (for example latin-1 or cp1252)"
            )
    for marker in (
        "CSV parse error",
        "JSON parse error",
        "ArrowInvalid",
        "straddling object",
        "Invalid: ",
        "Parquet magic bytes",
        "Failed to read",
    ):
        if marker in text:
            line = next((ln for ln in text.splitlines() if marker in ln), text.splitlines()[0])
            return DataError(
                f"cannot read {src.format} data from {', '.join(src.display_files[:3])}: "
                f"{line.strip()[:300]}. Check the files or set data.format / data.encoding."
            )
    return None


# --------------------------------------------------------------------------- the stage


def run_data_stage(
    cfg: JobConfig, *, force: bool = False, source: Source | None = None, log: Callable[[str], None] = print
) -> PreparedData:
    """Prepare ``cfg.data`` into the results folder and return where it is.

    ``source`` is what ``resolve_source`` returned, when the caller checked the input
    before starting Ray (as the CLI does).
    """
    import ray.data
    from ray.data.context import ShuffleStrategy

    # The one shuffle (de-duplication) runs far faster as Ray Data's pull-based sort
    # shuffle than as its default hash shuffle at these sizes (0.3 s vs 1.3-2.5 s for
    # 20k rows here), and the hash shuffle failed on empty blocks in Ray 2.60.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return _prepare(cfg, force, source, log)
    finally:
        ctx.shuffle_strategy = saved


def _prepare(cfg: JobConfig, force: bool, source: Source | None, log: Callable[[str], None]) -> PreparedData:
    """The data stage's steps: resolve, read and clean, de-duplicate, split, write."""
    started = time.time()
    d = cfg.data
    # 1. Resolve the source and the destination (no Ray work yet).
    src = source or resolve_source(d, cfg.storage)
    if d.clean.stop_words and src.language != "en":
        raise DataError(
            f"data.clean.stop_words removes English stop words; {d.source} is {src.language} "
            f"text: set data.clean.stop_words=false"
        )
    results = Results.from_config(cfg.storage)
    results.check_reachable()
    name = dataset_name(cfg, src)
    final = results.dataset_dir(name)
    digest = data_config_hash(cfg)
    if results.is_complete(final) and not force:
        report = results.dataset_report(name)
        if report.config_hash != digest:
            raise DataError(
                f"dataset {name!r} already exists in {results.root} with a different data "
                f"config; rerun with --force to rebuild it, or set another data.name"
            )
        log(f"Dataset {name!r} is already prepared at {results.uri(final)} (use --force to rebuild).")
        return PreparedData(name, results.uri(final), report, reused=True)
    log(f"Preparing {d.source} -> {results.uri(final)}")
    log("  1/4 reading and cleaning")
    marked, mapper, rows_read, dropped = _read_and_clean(cfg, src)
    n_clean = rows_read - sum(dropped.values())
    log(f"  2/4 removing duplicates among {n_clean} cleaned rows")
    shared, copies, keys, conflicts = _deduplicate(cfg, marked, mapper, rows_read, n_clean, dropped)
    log(f"  3/4 splitting {d.split} (seed {d.seed}) and counting tokens")
    split_ds, lengths = _split_and_count(cfg, marked, shared, copies, keys, mapper, dropped)
    report = build_report(cfg, src, name, digest, mapper, rows_read, dropped, conflicts, lengths, started)
    log("  4/4 writing")
    _write_dataset(cfg, results, name, split_ds, mapper, report, log)
    return PreparedData(name, results.uri(final), report)


def _read_and_clean(cfg: JobConfig, src: Source) -> tuple[Dataset, cleaning.LabelMapper, int, dict[str, int]]:
    """(every row read, cleaned, with its label mapped and a drop reason where it is dropped
    (marked, never silently dropped); the label mapper; rows read; dropped rows by reason).
    Unknown label values are an error naming them."""
    import ray.data

    d = cfg.data
    ctx = ray.data.DataContext.get_current()
    saved, ctx.target_max_block_size = ctx.target_max_block_size, BLOCK_BYTES
    try:  # the dataset and all made from it keep these blocks
        raw = read_source(src)
    finally:
        ctx.target_max_block_size = saved
    try:
        if src.all_labels is None and not d.labels:  # the labels are counted first: read and parse
            raw = raw.materialize()  # the source once, cleaned from Ray's object store
        mapper = _resolve_labels(cfg, src, raw)
        # A task pool of its own size, not fused into the read: the blocks of one file are
        # cleaned on every CPU.
        marked = raw.map_batches(
            _clean_and_key,
            batch_format="pandas",
            batch_size=TASK_ROWS,
            concurrency=row_tasks(),
            fn_kwargs=dict(cfg=d.clean, mapper=mapper, twitter_repair=src.kind == "twitter-sentiment", seed=d.seed),
        ).materialize()
        rows_read = marked.count()
    except Exception as e:
        err = _translate_read_error(e, src)
        if err is None:
            raise
        raise err from None
    if rows_read == 0:
        raise DataError(f"{d.source}: no rows found")
    dropped = {k: v for k, v in count_values(marked, "drop_reason").items() if k}
    if dropped.get(cleaning.UNKNOWN_LABEL):
        unknown = count_values(marked, "label_raw", where=("drop_reason", cleaning.UNKNOWN_LABEL))
        shown = ", ".join(f"{v!r} ({n} rows)" for v, n in sorted(unknown.items(), key=lambda x: -x[1])[:10])
        raise DataError(
            f"unknown label value(s) in {d.label_column!r}: {shown}. Known classes: "
            f"{mapper.labels}. Add them to data.labels, map them with data.label_values, "
            f"or drop them with data.exclude_labels."
        )
    return marked, mapper, rows_read, dropped


def _clean_and_key(
    batch: pd.DataFrame, cfg: CleanConfig, mapper: cleaning.LabelMapper, twitter_repair: bool, seed: int
) -> pd.DataFrame:
    return splitting.with_keys(cleaning.clean_batch(batch, cfg, mapper, twitter_repair=twitter_repair), seed=seed)


def _deduplicate(
    cfg: JobConfig, marked: Dataset, mapper: cleaning.LabelMapper, rows_read: int, n_clean: int, dropped: dict[str, int]
) -> tuple[np.ndarray, Dataset | None, pd.DataFrame, int]:
    """(the text keys more than one kept row holds; those rows de-duplicated by their text (a
    materialized dataset, None when there are none); the integer keys of every row left,
    which alone come to the driver and decide sample and split; how many texts had
    conflicting labels). ``dropped`` gains the duplicates.

    Only rows whose text key another row shares are shuffled (to compare their texts); the
    others are unique where they are and stay there."""
    keys = marked.map_batches(splitting.kept_keys, batch_format="pandas").to_pandas()
    if keys.empty:  # no row kept: Ray hands back a frame without columns
        keys = splitting.KEYS.empty_table().to_pandas()
    shared = splitting.shared_keys(keys["text_key"].to_numpy())
    maybe_copies = splitting.holds_shared_key(keys["text_key"].to_numpy(), shared)
    keys = keys.loc[~maybe_copies, ["label", "sample_key", "split_key"]].assign(conflict=False)
    copies = None
    if len(shared):
        buckets = splitting.dedup_buckets(int(maybe_copies.sum()))
        copies = (
            marked.map_batches(
                splitting.keep_and_bucket, batch_format="pandas", fn_kwargs={"buckets": buckets, "shared": shared}
            )
            .groupby("bucket", num_partitions=_partitions(buckets))
            .map_groups(splitting.deduplicate, batch_format="pandas", fn_kwargs={"seed": cfg.data.seed})
            .materialize()
        )
        keys = pd.concat([keys, copies.select_columns(list(keys.columns)).to_pandas()], ignore_index=True)
    n_unique = len(keys)
    if n_unique == 0:
        raise DataError(
            f"no rows left after cleaning {rows_read} rows (dropped: {dropped}). Check the "
            f"text column and the cleaning options under data.clean."
        )
    if n_clean - n_unique:
        dropped[cleaning.DUPLICATE] = n_clean - n_unique
    class_counts = {int(k): int(v) for k, v in keys["label"].value_counts().items()}
    empty = [lab for i, lab in enumerate(mapper.labels) if class_counts.get(i, 0) == 0]
    if empty:
        raise DataError(
            f"class(es) {empty} have no rows after cleaning and de-duplication; remove them "
            f"from data.labels or add data"
        )
    return shared, copies, keys, int(keys["conflict"].sum())


def _split_and_count(
    cfg: JobConfig,
    marked: Dataset,
    shared: np.ndarray,
    copies: Dataset | None,
    keys: pd.DataFrame,
    mapper: cleaning.LabelMapper,
    dropped: dict[str, int],
) -> tuple[Dataset, pd.DataFrame]:
    """(the rows with their split, seeded and stratified (of a stratified sample under
    ``data.max_rows``) and their token counts with the model's tokenizer, loaded once per
    worker process; the lengths by split and label, no texts). ``dropped`` gains the rows
    sampled out."""
    d = cfg.data
    class_counts = {int(k): int(v) for k, v in keys["label"].value_counts().items()}
    quotas = splitting.sample_quotas(class_counts, d.max_rows)
    if sum(quotas.values()) < len(keys):
        dropped[cleaning.SAMPLED_OUT] = len(keys) - sum(quotas.values())
    splitting.check_split_sizes(quotas, d.split, mapper.labels)
    split = {"thresholds": splitting.split_thresholds(keys, quotas, list(d.split))}
    rows = marked.map_batches(splitting.unique_rows, batch_format="pandas", fn_kwargs={"shared": shared, **split})
    if copies is not None:
        rows = rows.union(copies.map_batches(splitting.apply_split, batch_format="pandas", fn_kwargs=split))
    # Token counting in blocks of even size (small ones merged): a task each, few enough
    # that starting them costs little, and no large block leaves the other CPUs idle at the end.
    rows = rows.repartition(target_num_rows_per_block=TASK_ROWS, strict=True)
    split_ds = map_batches_cached(
        rows,
        CountTokens,
        dict(
            model=cfg.model.name,
            max_length=d.max_length,
            trust_remote_code=cfg.model.trust_remote_code,
            storage=dataclasses.asdict(cfg.storage),
        ),
        concurrency=row_tasks(),
        batch_format="pandas",
        batch_size=2048,
    ).materialize()
    return split_ds, split_ds.select_columns(["split", "label", "n_tokens"]).to_pandas()


def _write_dataset(
    cfg: JobConfig,
    results: Results,
    name: str,
    split_ds: Dataset,
    mapper: cleaning.LabelMapper,
    report: DataReport,
    log: Callable[[str], None],
) -> None:
    """Write the splits, label map, config and report into a staging folder, then publish it
    in one step (one writer per dataset: a lease)."""

    def build(folder: str) -> None:
        for split in SPLITS:
            part = split_ds.map_batches(_rows_of_split, batch_format="pyarrow", fn_kwargs={"split": split})
            part.write_parquet(results.join(folder, split), filesystem=results.fs)
        results.write_json(results.join(folder, LABEL_MAP_FILE), mapper.to_json())
        results.write_text(results.join(folder, CONFIG_FILE), cfg.to_yaml())
        results.write_json(results.join(folder, REPORT_FILE), report.to_json())

    with hold_lease(results, DATASETS, name, f"dataset {name!r}", log=log) as lease:
        # fencing: nothing is published by a job that lost its lease
        results.publish(results.dataset_dir(name), build, before_publish=lease.check)


def _partitions(groups: int) -> int:
    # Ray Data's default of 200 shuffle partitions is far too many for a few groups; a big
    # cluster gets two a CPU.
    return max(1, min(groups, max(16, 2 * row_tasks())))


def row_tasks() -> int:
    """How many tasks run a per-row step (cleaning, token counting) at once: one per CPU
    of the cluster, so more nodes make it faster."""
    import ray

    # Ray Data warns when a small dataset gives such a step fewer blocks than its cap: expected.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _rows_of_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch["split"], split)).select(list(SPLIT_COLUMNS))


def _value_counts(batch: pd.DataFrame, column: str, where: tuple[str, Any] | None) -> pd.DataFrame:
    if where is not None:
        batch = batch[batch[where[0]] == where[1]]
    counts = batch[column].value_counts()
    return pd.DataFrame({"value": counts.index.astype(str), "n": counts.to_numpy(dtype="int64")})


def count_values(ds: Dataset, column: str, where: tuple[str, Any] | None = None) -> dict[Any, int]:
    """Count a column's values with one small pandas frame per block (no shuffle)."""
    partial = ds.map_batches(
        _value_counts, batch_format="pandas", fn_kwargs={"column": column, "where": where}
    ).to_pandas()
    if partial.empty:
        return {}
    totals = partial.groupby("value")["n"].sum()
    out: dict[Any, int] = {}
    for value, n in totals.items():
        key: Any = value
        if value in ("True", "False"):
            key = value == "True"
        out[key] = int(n)
    return out


# The columns of a prepared split: the cleaned text, the label's index, and the text's
# token ids as training reads them (CountTokens).
SPLIT_COLUMNS = ("text", "label", "input_ids")

# A split up to this size is read by the driver and handed to Ray whole: a Ray Data read
# of a small split costs seconds of task start-up (its file listing also waits for a whole
# free CPU); a larger one is read by Ray Data tasks, spread over the cluster.
DRIVER_READ_MAX_BYTES = 256 * 2**20


def split_files(results: Results, name: str, split: str) -> list[pafs.FileInfo]:
    """The Parquet files of a prepared split (pyarrow ``FileInfo``s, sorted by path);
    refuses a dataset that is not completely prepared."""
    folder = results.dataset_dir(name)
    if not results.is_complete(folder):
        raise DataError(
            f"dataset {name!r} is not prepared in {results.root} (no {results.uri(folder)}/_SUCCESS); "
            f"run raybm data first"
        )
    path = results.dataset_split_dir(name, split)
    return sorted(
        (
            f
            for f in results.fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
        ),
        key=lambda f: f.path,
    )


def read_split_table(
    results: Results, name: str, split: str, columns: tuple[str, ...], files: list[pafs.FileInfo] | None = None
) -> pa.Table:
    """A prepared split's ``columns`` read whole in this process, as an Arrow table."""
    files = split_files(results, name, split) if files is None else files
    return pq.ParquetDataset([f.path for f in files], filesystem=results.fs).read(columns=list(columns))


def load_split(
    results: Results, name: str, split: str, num_cpus: float = 0.25, columns: tuple[str, ...] = ("text", "label")
) -> Dataset:
    """A prepared split as a Ray Dataset with ``columns`` (text and label by default).

    Up to ``DRIVER_READ_MAX_BYTES`` on disk the driver reads it and puts it in Ray's object
    store; larger splits are read by Ray Data tasks, which ask for a fraction of a CPU
    (during training the workers hold most CPUs, and the reads must still be scheduled).
    """
    import ray.data

    files = split_files(results, name, split)
    if sum(f.size or 0 for f in files) <= DRIVER_READ_MAX_BYTES:
        return ray.data.from_arrow(read_split_table(results, name, split, columns, files))
    return ray.data.read_parquet(
        results.dataset_split_dir(name, split), filesystem=results.fs, columns=list(columns), num_cpus=num_cpus
    )
