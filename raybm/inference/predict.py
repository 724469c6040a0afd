"""Offline prediction for users without a server: one text, or a whole file.

Small files are labelled in this process; large ones stream through Ray Data (one model
per actor) and are written batch by batch in input order, so no file is ever held whole
in memory. The output is written to a temp file and renamed, never left half-written.
Rows whose text is empty or missing are kept, with an empty label and confidence: a
model's guess for no text would look like a prediction.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raybm.errors import RaybmError
from raybm.inference.explain import explain
from raybm.inference.loading import load_predictor, read_label_map

PREDICTED_LABEL = "predicted_label"
CONFIDENCE = "confidence"
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
IN_PROCESS_MAX_BYTES = 20 << 20  # larger inputs go through Ray Data
PROGRESS_EVERY_S = 5.0


def write_frame(df: pd.DataFrame, path: str) -> None:
    """Write a whole frame in the format its name asks for, through a temp file."""
    writer = _Writer(path, file_format(path, "--output"))
    try:
        writer.write(df)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def file_format(path: str, role: str) -> str:
    """The format a file name asks for; a clear error naming ``role`` (the flag) otherwise."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise RaybmError(f"{role} {path!r}: use a .csv, .tsv, .jsonl or .parquet file")
    return fmt


def predict_texts(model_dir: str, texts: list[str], max_length: int | None = None) -> list[tuple[str, float]]:
    """(label, confidence) for each text, in order."""
    from raybm.inference.evaluate import Classify

    clf = Classify(model_dir, max_length=max_length, threads=max(1, os.cpu_count() or 1))
    probs = clf.predict(texts)
    return [(clf.labels[int(p.argmax())], float(p.max())) for p in probs]


def explain_texts(model_dir: str, texts: list[str], max_length: int | None = None) -> list[str]:
    """One JSON line per text: its answer (as ``format_prediction``) with each word's weight
    toward it (``raybm.inference.explain``)."""
    predictor = load_predictor(model_dir, "auto", threads=max(1, os.cpu_count() or 1), max_length=max_length)
    lines = []
    for text in texts:
        found = explain(predictor, text)
        answer = json.loads(format_prediction(text, found["label"], found["confidence"]))
        lines.append(
            json.dumps(
                {
                    **answer,
                    "words": [{"word": w["word"], "weight": round(w["weight"], 4)} for w in found["words"]],
                    "method": found["method"],
                },
                ensure_ascii=False,
            )
        )
    return lines


class Labelled(NamedTuple):
    """How many rows a file had, how many were labelled, and where the output went."""

    rows: int
    """Rows written (every input row)."""
    unlabelled: int
    """Rows with no text (empty, blank or missing), written with an empty label."""


def output_columns(labels: list[str], probabilities: bool) -> list[str]:
    """The columns labelling adds: the label, its confidence, and with ``probabilities``
    one ``prob_<label>`` column per class."""
    return [PREDICTED_LABEL, CONFIDENCE, *([f"prob_{lab}" for lab in labels] if probabilities else [])]


def label_frame(
    df: pd.DataFrame,
    text_column: str,
    predict: Callable[[list[str]], np.ndarray],
    labels: list[str],
    probabilities: bool = False,
) -> pd.DataFrame:
    """``df`` with the predicted label and its confidence added (and every class's
    probability with ``probabilities``); rows without text get none of them (None / NaN)
    instead of a guess."""
    texts = df[text_column]
    has_text = texts.notna().to_numpy() & (texts.astype(str).str.strip() != "").to_numpy()
    pred: np.ndarray = np.full(len(df), None, dtype=object)
    conf: np.ndarray = np.full(len(df), np.nan, dtype=np.float32)
    probs: np.ndarray = np.full((len(df), len(labels)), np.nan, dtype=np.float32)
    if has_text.any():
        got = predict(texts[has_text].astype(str).tolist())
        probs[has_text], conf[has_text] = got, got.max(-1)
        pred[has_text] = [labels[i] for i in got.argmax(-1)]
    added = {PREDICTED_LABEL: pd.array(pred, dtype="string"), CONFIDENCE: conf}
    if probabilities:
        added.update({f"prob_{lab}": probs[:, i] for i, lab in enumerate(labels)})
    return df.assign(**added)


def check_output_folder(path: str, flag: str = "--output") -> None:
    """A file is about to be written at ``path``: its folder must exist (checked before any work)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RaybmError(f"{flag} {path!r}: the folder {folder} does not exist; create it first")


def _check_output(input_path: str, output_path: str) -> None:
    check_output_folder(output_path)
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise RaybmError(f"--output {output_path!r} is the input file; write the labelled rows to another file")


def _read_frames(path: str, fmt: str, chunk_rows: int = 10_000) -> Iterator[pd.DataFrame]:
    try:
        if fmt == "parquet":
            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
        elif fmt == "jsonl":
            yield from pd.read_json(path, lines=True, chunksize=chunk_rows, dtype=False)
        else:
            yield from pd.read_csv(
                path, sep="\t" if fmt == "tsv" else ",", chunksize=chunk_rows, dtype=str, keep_default_na=False
            )
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise RaybmError(f"cannot read {path} as {fmt}: {str(e).splitlines()[0]}") from None


class _Writer:
    """Appends frames to a temp file; ``commit`` renames it into place."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self.rows = 0
        self._parquet: Any = None  # pq.ParquetWriter once a frame is written

    def write(self, df: pd.DataFrame) -> None:
        if self.fmt == "parquet":
            if self._parquet is None:
                table = pa.Table.from_pandas(df, preserve_index=False)
                self._parquet = pq.ParquetWriter(self.tmp, table.schema)
            else:  # the first batch's types, also for a column that is all empty in this batch
                table = pa.Table.from_pandas(df, schema=self._parquet.schema, preserve_index=False)
            self._parquet.write_table(table)
        elif self.fmt == "jsonl":
            df.to_json(self.tmp, orient="records", lines=True, force_ascii=False, mode="a")
        else:
            df.to_csv(self.tmp, sep="\t" if self.fmt == "tsv" else ",", index=False, header=self.rows == 0, mode="a")
        self.rows += len(df)

    def commit(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self.rows == 0:
            raise RaybmError("the input file has no rows")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def predict_file(
    model_dir: str,
    input_path: str,
    output_path: str,
    text_column: str = "text",
    max_length: int | None = None,
    use_ray: bool | None = None,
    probabilities: bool = False,
    log: Callable[[str], None] | None = None,
) -> Labelled:
    """Label every row of ``input_path`` into ``output_path``; with ``probabilities`` also
    write each class's probability. ``log`` gets a progress line every few seconds."""
    from raybm.inference.evaluate import Classify

    if not os.path.isfile(input_path):
        raise RaybmError(f"--input {input_path!r}: no such file")
    in_fmt, out_fmt = file_format(input_path, "--input"), file_format(output_path, "--output")
    _check_output(input_path, output_path)
    labels = read_label_map(model_dir)
    first = next(_read_frames(input_path, in_fmt, chunk_rows=5), None)
    if first is None or text_column not in first.columns:
        found = [] if first is None else list(first.columns)
        raise RaybmError(f"{input_path}: no text column {text_column!r}; columns found: {found}. Pass --text-column.")
    clash = [c for c in output_columns(labels, probabilities) if c in first.columns]
    if clash:
        raise RaybmError(
            f"{input_path} already has the column(s) {clash} that labelling adds; rename or drop "
            f"them first, so no input column is overwritten"
        )
    if use_ray is None:
        use_ray = os.path.getsize(input_path) > IN_PROCESS_MAX_BYTES
    writer = _Writer(output_path, out_fmt)
    unlabelled = 0
    try:
        if use_ray:
            batches = _ray_batches(
                model_dir,
                input_path,
                in_fmt,
                text_column,
                max_length,
                labels,
                probabilities,
                columns=list(first.columns),
            )
        else:
            clf = Classify(model_dir, max_length=max_length, threads=max(1, os.cpu_count() or 1))

            batches = (
                label_frame(df, text_column, clf.predict, labels, probabilities)
                for df in _read_frames(input_path, in_fmt, chunk_rows=2048)
            )
        started = last = time.monotonic()
        for df in batches:
            writer.write(df)
            unlabelled += int(df[PREDICTED_LABEL].isna().sum())
            if log is not None and time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                log(f"  {writer.rows:,} rows labelled ({writer.rows / (last - started):,.0f} rows/s)")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return Labelled(writer.rows, unlabelled)


def _ray_batches(
    model_dir: str,
    input_path: str,
    fmt: str,
    text_column: str,
    max_length: int | None,
    labels: list[str],
    probabilities: bool = False,
    columns: list[str] | None = None,
) -> Iterator[pd.DataFrame]:
    """Predictions streamed from Ray Data in input order, input columns kept. A CSV's
    ``columns`` are read as text, as the in-process path reads them (no type guessing: an
    id ``007`` stays ``007``)."""
    import ray.data

    from raybm.inference.evaluate import Classify

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # output rows in input order
    if fmt == "parquet":
        ds = ray.data.read_parquet(input_path)
    elif fmt == "jsonl":
        ds = ray.data.read_json(input_path)
    else:
        as_text = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns or []}, strings_can_be_null=False)
        ds = ray.data.read_csv(
            input_path,
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
            convert_options=as_text,
        )

    class _Label(Classify):
        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            return label_frame(batch, text_column, self.predict, labels, probabilities)

    out = ds.map_batches(
        _Label,
        batch_format="pandas",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"model_dir": model_dir, "max_length": max_length},
    )
    try:
        yield from out.iter_batches(batch_format="pandas", batch_size=4096)
    finally:
        ctx.execution_options.preserve_order = saved


# How sure an answer is, in words, by its calibrated confidence (the first band it reaches).
CONFIDENCE_WORDS = ((0.95, "very likely"), (0.8, "likely"), (0.6, "probably"), (0.0, "unsure, leaning"))


def in_words(label: str, confidence: float, min_confidence: float = 0.0) -> str:
    """An answer for people: ``very likely negative (99.6%)``; ``uncertain (leaning
    negative, 54.1%)`` below the abstain band ``min_confidence``."""
    if confidence < min_confidence:
        return f"uncertain (leaning {label}, {confidence:.1%})"
    words = next(w for floor, w in CONFIDENCE_WORDS if confidence >= floor)
    return f"{words} {label} ({confidence:.1%})"


def format_prediction(text: str, label: str, confidence: float) -> str:
    """One prediction as a JSON line, with the answer in words."""
    return json.dumps(
        {"text": text, "label": label, "confidence": round(confidence, 4), "answer": in_words(label, confidence)},
        ensure_ascii=False,
    )
