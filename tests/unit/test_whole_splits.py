"""Whole splits in a worker: padding, per-epoch shuffled equal shards, batches as the collate wants them."""

import numpy as np
import pyarrow as pa
import pytest

from raybm.data.tokenizing import pad_collate
from raybm.data.whole import TokenArrays, WholeSplit, epoch_order
from raybm.errors import DataError


def table(rows, texts=None):
    columns = {
        "input_ids": pa.array(rows, type=pa.list_(pa.int32())),
        "label": pa.array([i % 2 for i in range(len(rows))]),
    }
    if texts is not None:
        columns["text"] = pa.array(texts)
    return pa.table(columns)


def test_token_arrays_pad_each_row_and_keep_its_length_label_and_text():
    rows = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]]
    arrays = TokenArrays.from_table(table(rows, ["a", "b", "c"]), width=6)
    assert arrays.ids.tolist() == [[101, 7, 102, 0, 0, 0], [101, 102, 0, 0, 0, 0], [101, 5, 6, 7, 102, 0]]
    assert arrays.lengths.tolist() == [3, 2, 5] and arrays.labels.tolist() == [0, 1, 0]
    assert arrays.texts.tolist() == ["a", "b", "c"]
    # A chunked, sliced column (as Parquet reads give) lines up the same way.
    chunked = pa.concat_tables([table(rows[:1]), table(rows[1:])]).slice(1)
    assert TokenArrays.from_table(chunked, width=6).ids.tolist() == arrays.ids[1:].tolist()


def test_a_stored_row_longer_than_max_length_is_refused():
    with pytest.raises(DataError, match="more than max_length=2"):
        TokenArrays.from_table(table([[1, 2, 3]]), width=2)


def test_a_batch_is_cut_to_its_longest_row_and_collates_like_the_stored_rows():
    rows = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]]
    arrays = TokenArrays.from_table(table(rows), width=8)
    picked = np.array([1, 0])
    batch = arrays.batch(picked)
    assert batch["input_ids"].shape == (2, 3)
    ours = pad_collate(batch)
    ragged = np.empty(len(picked), dtype=object)  # rows as Ray Data hands them: one array each
    ragged[:] = [np.array(rows[i]) for i in picked]
    stored = pad_collate({"input_ids": ragged, "label": arrays.labels[picked]})
    for key in ("input_ids", "attention_mask", "labels"):
        assert ours[key].tolist() == stored[key].tolist(), key
    assert arrays.batch(picked, width=8)["input_ids"].shape == (2, 8)  # data.padding=max_length


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 2), (2, 4)])
def test_every_rank_gets_an_equal_shard_of_one_permutation_that_covers_every_row(n, world):
    shards = [epoch_order(n, epoch=0, seed=3, rank=r, world=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    seen = np.concatenate(shards)
    assert set(seen.tolist()) == set(range(n))
    assert len(seen) - n < world  # only the padding repeats rows


def test_the_order_changes_every_epoch_and_repeats_for_the_same_seed():
    first = epoch_order(100, epoch=0, seed=1)
    assert sorted(first.tolist()) == list(range(100)) and first.tolist() != list(range(100))
    assert epoch_order(100, epoch=1, seed=1).tolist() != first.tolist()
    assert epoch_order(100, epoch=0, seed=1).tolist() == first.tolist()  # a resumed epoch reads the same rows
    assert epoch_order(100, epoch=0, seed=2).tolist() != first.tolist()
    assert epoch_order(5, epoch=4, seed=1, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_a_whole_split_iterates_its_shard_in_batches_through_the_collate():
    rows = [[101, i, 102] for i in range(10)]
    train = WholeSplit(TokenArrays.from_table(table(rows), width=4), rank=1, world=2, seed=0, shuffle=True)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        batches = list(train.iter_torch_batches(batch_size=2, collate_fn=pad_collate))
        assert [len(b["labels"]) for b in batches] == [2, 2, 1]
        got = [int(x) for b in batches for x in b["input_ids"][:, 1]]
        assert got == epoch_order(10, epoch=epoch, seed=0, rank=1, world=2).tolist()
    validation = WholeSplit(TokenArrays.from_table(table(rows, [str(i) for i in range(10)]), width=4))
    assert [b["text"].tolist() for b in validation.iter_batches(4)] == [
        ["0", "1", "2", "3"],
        ["4", "5", "6", "7"],
        ["8", "9"],
    ]
