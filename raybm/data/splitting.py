"""De-duplication, sampling and the stratified split: plain functions on pandas frames.

Both are deterministic functions of the rows' content and the seed, never of row order,
partitioning or machine: every decision comes from a SHA-256 of (seed, text). Every kept
row gets a text key where it is cleaned; the keys alone (integers) come to the driver,
which finds the keys held by more than one row. Only those rows (copies of a text, or a
rare key collision) are shuffled so that copies meet and are compared by their text; every
other row is unique as it stands and never moves. The split itself is a per-class
threshold on the keys, found on the driver. So two runs on different machines, with any
number of Ray blocks, give the same split. Duplicates are removed before the split, so no
text can be in two splits.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raybm.errors import DataError

MIN_DEDUP_BUCKETS = 32
ROWS_PER_DEDUP_BUCKET = 100_000  # more rows, more buckets: each bucket is held whole by one task


def dedup_buckets(rows: int) -> int:
    """How many text buckets de-duplication uses for ``rows`` rows (at least 32, about
    ``ROWS_PER_DEDUP_BUCKET`` rows each). Any count gives the same result: copies of a text
    always share a bucket."""
    return max(MIN_DEDUP_BUCKETS, -(-rows // ROWS_PER_DEDUP_BUCKET))


# Explicit output schemas: Ray's hash shuffle cannot join an empty block whose column
# types pandas left unknown with a full one, so every function here returns typed tables.
BUCKETED = pa.schema([("text", pa.large_string()), ("label", pa.int64()), ("bucket", pa.int64())])
DEDUPED = pa.schema(
    [
        ("text", pa.large_string()),
        ("label", pa.int64()),
        ("copies", pa.int64()),
        ("conflict", pa.bool_()),
        ("sample_key", pa.int64()),
        ("split_key", pa.int64()),
    ]
)
KEYS = pa.schema(
    [("text_key", pa.int64()), ("label", pa.int64()), ("sample_key", pa.int64()), ("split_key", pa.int64())]
)
SPLIT = pa.schema([("text", pa.large_string()), ("label", pa.int64()), ("split", pa.large_string())])


def _table(columns: dict, schema: pa.Schema) -> pa.Table:
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def text_key(text: str, salt: str) -> int:
    """A stable 63-bit key for a text (same on every machine and Python run)."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def with_keys(marked: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Cleaned rows (``drop_reason`` marks the dropped) with the keys of the kept ones:
    ``text_key`` (copies of a text share it), ``sample_key`` and ``split_key``; -1 on
    dropped rows."""
    kept = (marked["drop_reason"] == "").tolist()
    texts = marked["text"].tolist()
    for column, salt in (("text_key", "bucket"), ("sample_key", f"sample:{seed}"), ("split_key", f"split:{seed}")):
        marked[column] = np.array([text_key(t, salt) if k else -1 for t, k in zip(texts, kept)], dtype="int64")
    return marked


def kept_keys(batch: pd.DataFrame) -> pa.Table:
    """The kept rows' keys and labels, no text: all of the rows the driver sees."""
    kept = batch.loc[batch["drop_reason"] == ""]
    return _table({c: kept[c].to_numpy(dtype="int64") for c in KEYS.names}, KEYS)


def shared_keys(text_keys: np.ndarray) -> np.ndarray:
    """The text keys held by more than one row, sorted: those rows may be copies."""
    text_keys = np.asarray(text_keys, dtype="int64")
    return np.unique(text_keys[pd.Series(text_keys).duplicated(keep=False).to_numpy()])


def holds_shared_key(text_keys: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """Which of ``text_keys`` are among ``shared`` (sorted)."""
    text_keys = np.asarray(text_keys, dtype="int64")
    if len(shared) == 0:
        return np.zeros(len(text_keys), dtype=bool)
    at = np.minimum(np.searchsorted(shared, text_keys), len(shared) - 1)
    return shared[at] == text_keys


def unique_rows(batch: pd.DataFrame, *, shared: np.ndarray, thresholds: dict[int, list[int]] | None = None) -> pa.Table:
    """The kept rows whose text key no other row holds: unique texts, as ``deduplicate``
    would return them (one copy, no conflict; ``DEDUPED`` columns), or with ``thresholds``
    split as ``apply_split`` splits them (``SPLIT`` columns)."""
    kept = batch.loc[batch["drop_reason"] == ""]
    kept = kept.loc[~holds_shared_key(kept["text_key"].to_numpy(), shared)]
    if thresholds is not None:
        return apply_split(kept, thresholds=thresholds)
    return _table(
        {
            "text": kept["text"].astype(str).tolist(),
            "label": kept["label"].to_numpy(dtype="int64"),
            "copies": np.ones(len(kept), dtype="int64"),
            "conflict": np.zeros(len(kept), dtype=bool),
            "sample_key": kept["sample_key"].to_numpy(dtype="int64"),
            "split_key": kept["split_key"].to_numpy(dtype="int64"),
        },
        DEDUPED,
    )


def keep_and_bucket(
    batch: pd.DataFrame, *, buckets: int = MIN_DEDUP_BUCKETS, shared: np.ndarray | None = None
) -> pa.Table:
    """Rows kept by cleaning (with ``shared``: only those holding a shared text key),
    bucketed by text (one of ``buckets``) so all copies of a text meet in one group."""
    kept = batch.loc[batch["drop_reason"] == ""]
    if shared is not None:
        kept = kept.loc[holds_shared_key(kept["text_key"].to_numpy(), shared)]
    texts = kept["text"].astype(str).tolist()
    keys = kept["text_key"].to_numpy(dtype="int64") if "text_key" in kept else [text_key(t, "bucket") for t in texts]
    return _table(
        {
            "text": texts,
            "label": kept["label"].to_numpy(dtype="int64"),
            "bucket": np.asarray(keys, dtype="int64") % buckets,
        },
        BUCKETED,
    )


def deduplicate(group: pd.DataFrame, *, seed: int = 0) -> pa.Table:
    """Keep one row per distinct text (a map_groups function over text buckets).

    Copies with one label collapse to one row. Copies with conflicting labels keep the
    most frequent label (ties: the lowest id), so the result does not depend on order.
    Each row also gets its seeded sample and split keys. Output: ``DEDUPED`` columns.
    """
    counts = group.groupby(["text", "label"], sort=False).size().reset_index(name="n")
    per_text = counts.groupby("text", sort=False).agg(copies=("n", "sum"), labels=("label", "nunique"))
    best = counts.sort_values(["text", "n", "label"], ascending=[True, False, True]).drop_duplicates("text")
    best = best.merge(per_text, left_on="text", right_index=True)
    texts = best["text"].astype(str).tolist()
    return _table(
        {
            "text": texts,
            "label": best["label"].to_numpy(dtype="int64"),
            "copies": best["copies"].to_numpy(dtype="int64"),
            "conflict": (best["labels"] > 1).to_numpy(),
            "sample_key": [text_key(t, f"sample:{seed}") for t in texts],
            "split_key": [text_key(t, f"split:{seed}") for t in texts],
        },
        DEDUPED,
    )


def split_sizes(n: int, ratios: list[float]) -> tuple[int, int, int]:
    """Rows of one class per split: validation and test rounded, train gets the rest."""
    n_val = int(round(n * ratios[1]))
    n_test = int(round(n * ratios[2]))
    return n - n_val - n_test, n_val, n_test


def sample_quotas(class_counts: dict[int, int], max_rows: int | None) -> dict[int, int]:
    """Rows to keep per class so that at most ``max_rows`` remain, in proportion."""
    total = sum(class_counts.values())
    if max_rows is None or max_rows >= total:
        return dict(class_counts)
    return {c: max(1, int(round(max_rows * n / total))) for c, n in class_counts.items()}


def check_split_sizes(class_counts: dict[int, int], ratios: list[float], labels: list[str]) -> None:
    """Fail before splitting if a class would be missing from any split."""
    for cid, n in sorted(class_counts.items()):
        sizes = split_sizes(n, ratios)
        for split, size in zip(("train", "validation", "test"), sizes):
            if size <= 0:
                raise DataError(
                    f"class {labels[cid]!r} has {n} row(s) after cleaning and de-duplication, "
                    f"which leaves the {split} split without it (split {ratios}). Add data for "
                    f"this class, change data.split, or drop the class with data.exclude_labels."
                )


def split_thresholds(keys: pd.DataFrame, quotas: dict[int, int], ratios: list[float]) -> dict[int, list[int]]:
    """Per class, the key thresholds that sample and split it (computed on the driver).

    ``keys`` holds only label, sample_key and split_key (integers, no text). A class keeps
    its ``quota`` rows with the smallest sample keys; those, ordered by split key, are cut
    train / validation / test. Returns class -> [max sample key, max train key, max
    validation key].
    """
    out: dict[int, list[int]] = {}
    for label, part in keys.groupby("label"):
        label = int(label)
        kept = part.nsmallest(quotas[label], "sample_key")
        split_sorted = np.sort(kept["split_key"].to_numpy())
        n_train, n_val, _ = split_sizes(len(kept), ratios)
        out[label] = [
            int(kept["sample_key"].max()),
            int(split_sorted[n_train - 1]),
            int(split_sorted[n_train + n_val - 1]),
        ]
    return out


def apply_split(batch: pd.DataFrame, *, thresholds: dict[Any, list[int]]) -> pa.Table:
    """Label each row train / validation / test by the thresholds; drop sampled-out rows."""
    texts, labels, splits = [], [], []
    for text, label, sample_key, split_key in zip(
        batch["text"].tolist(), batch["label"].tolist(), batch["sample_key"].tolist(), batch["split_key"].tolist()
    ):
        t = thresholds.get(label) or thresholds[str(label)]  # keys may come back as strings
        if sample_key > t[0]:
            continue
        texts.append(text)
        labels.append(label)
        splits.append("train" if split_key <= t[1] else "validation" if split_key <= t[2] else "test")
    return _table({"text": texts, "label": labels, "split": splits}, SPLIT)
