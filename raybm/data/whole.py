"""Prepared splits held whole in a training worker's memory, without Ray Data in the loop.

For a split whose token ids the data stage stored, a Ray Data pipeline per run costs more
than reading the data: the driver reads the split into the object store, Ray Train starts
a split coordinator process, and the first batch waits for it. Small enough splits are
instead read by each worker straight from the results folder (local, or S3 as the
worker's checkpoints are) and batched in the worker. Training order is one permutation
per epoch, the same on every rank, of which each rank takes every world-th row, padded by
wrapping so that every rank runs the same number of steps (as torch's
``DistributedSampler`` does); validation and test are read in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from raybm.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

    from raybm.storage.results import Results

# Each worker holds the training and validation ids as int32 arrays of max_length columns.
# Up to this many bytes (per split) the workers read splits whole; above it, Ray Data
# streams them (train.data_feed=auto).
WHOLE_SPLIT_MAX_BYTES = 512 * 2**20


def whole_split_bytes(rows: int, max_length: int) -> int:
    """The memory a split of ``rows`` rows takes in a worker, held whole."""
    return rows * max_length * 4


@dataclass
class TokenArrays:
    """A split's token ids as one 0-padded ``[rows, width]`` int32 array, with each row's
    length, label and (when read) text."""

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    texts: np.ndarray | None = None

    @classmethod
    def from_table(cls, table: pa.Table, width: int) -> TokenArrays:
        """From a prepared split's Arrow table (``input_ids`` a list column, ``label``, and
        ``text`` if present); ``width`` is the longest a row may be (``data.max_length``)."""
        col = table.column("input_ids").combine_chunks()
        lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(lengths) and int(lengths.max()) > width:
            raise DataError(
                f"a stored row has {int(lengths.max())} token ids, more than max_length={width}; "
                f"prepare the dataset again (raybm data)"
            )
        ids: np.ndarray = np.zeros((len(lengths), width), dtype=np.int32)
        ids[np.arange(width) < lengths[:, None]] = col.flatten().to_numpy(zero_copy_only=False)
        texts = table.column("text").to_numpy(zero_copy_only=False) if "text" in table.column_names else None
        return cls(ids, lengths, table.column("label").to_numpy(zero_copy_only=False).astype(np.int64), texts)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray, width: int | None = None) -> dict[str, np.ndarray]:
        """Rows ``rows`` as a batch, cut to its longest row (or to ``width``), with
        ``attention_mask`` and ``label`` (and ``text`` when read)."""
        lengths = self.lengths[rows]
        size = width or max(1, int(lengths.max(initial=0)))
        out = {
            "input_ids": self.ids[rows, :size].astype(np.int64),
            "attention_mask": (np.arange(size) < lengths[:, None]).astype(np.int64),
            "label": self.labels[rows],
        }
        if self.texts is not None:
            out["text"] = self.texts[rows]
        return out


def epoch_order(n: int, *, epoch: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> np.ndarray:
    """The rows rank ``rank`` of ``world`` reads in ``epoch``: every rank gets
    ``ceil(n / world)`` rows of one shared permutation (the first rows repeat to make the
    shards equal, as in torch's ``DistributedSampler``)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = -(-n // world) if n else 0
    if per_rank * world > n:
        order = np.concatenate([order, np.resize(order, per_rank * world - n)])
    return order[rank::world]


class WholeSplit:
    """A split in memory, iterated with the two methods the training loop uses on a Ray
    Data shard: ``iter_torch_batches`` (through a collate) and ``iter_batches`` (numpy).
    For training, ``set_epoch`` picks the epoch's shuffled shard."""

    def __init__(
        self,
        arrays: TokenArrays,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        width: int | None = None,
    ) -> None:
        self.arrays, self.rank, self.world, self.seed, self.shuffle = arrays, rank, world, seed, shuffle
        self.width = width
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch``'s order from now on."""
        self.epoch = epoch

    def rows(self) -> np.ndarray:
        """This rank's rows in the current epoch, in order."""
        return epoch_order(
            len(self.arrays), epoch=self.epoch, seed=self.seed, rank=self.rank, world=self.world, shuffle=self.shuffle
        )

    def iter_batches(self, batch_size: int, batch_format: str = "numpy") -> Iterator[dict[str, np.ndarray]]:
        """Numpy batches of up to ``batch_size`` rows."""
        if batch_format != "numpy":
            raise ValueError(f"batch_format={batch_format!r}: only numpy batches")
        rows = self.rows()
        for start in range(0, len(rows), batch_size):
            yield self.arrays.batch(rows[start : start + batch_size], self.width)

    def iter_torch_batches(self, batch_size: int, collate_fn: Callable[[dict], Any]) -> Iterator[Any]:
        """``collate_fn`` applied to each numpy batch."""
        for batch in self.iter_batches(batch_size):
            yield collate_fn(batch)


def read_whole_split(results: Results, dataset: str, split: str, width: int, *, texts: bool = False) -> TokenArrays:
    """A prepared split's stored token ids (and text when ``texts``), read whole from the
    results folder."""
    from raybm.data.pipeline import read_split_table

    columns = ("input_ids", "label", "text") if texts else ("input_ids", "label")
    return TokenArrays.from_table(read_split_table(results, dataset, split, columns), width)
