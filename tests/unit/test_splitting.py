import random

import numpy as np
import pandas as pd
import pytest

from raybm.data import splitting
from raybm.errors import DataError


def _split_all(df, ratios=(0.8, 0.1, 0.1), seed=0, max_rows=None, n_parts=3):
    """The pipeline's steps on pandas: de-duplicate, thresholds from keys, apply per part."""
    deduped = splitting.deduplicate(df, seed=seed).to_pandas()
    counts = deduped["label"].value_counts().to_dict()
    quota = splitting.sample_quotas(counts, max_rows)
    thresholds = splitting.split_thresholds(deduped[["label", "sample_key", "split_key"]], quota, list(ratios))
    parts = [
        splitting.apply_split(part, thresholds=thresholds).to_pandas()
        for idx in np.array_split(np.arange(len(deduped)), n_parts)
        for part in [deduped.iloc[idx]]
    ]
    return pd.concat(parts, ignore_index=True)


def test_deduplicate_keeps_majority_label_whatever_the_order():
    rows = [("a", 0), ("a", 0), ("a", 1), ("b", 1), ("c", 0), ("c", 1)]
    for _ in range(5):
        random.shuffle(rows)
        out = splitting.deduplicate(pd.DataFrame(rows, columns=["text", "label"])).to_pandas()
        got = {r.text: (r.label, r.copies, r.conflict) for r in out.itertuples()}
        assert got == {"a": (0, 3, True), "b": (1, 1, False), "c": (0, 2, True)}  # tie -> lowest id


def test_keep_and_bucket_drops_marked_rows_and_types_empty_output():
    batch = pd.DataFrame({"text": ["x", "y"], "label": [0, 1], "drop_reason": ["", "duplicate"]})
    out = splitting.keep_and_bucket(batch)
    assert out.column("text").to_pylist() == ["x"]
    empty = splitting.keep_and_bucket(batch.iloc[0:0])
    assert empty.num_rows == 0 and empty.schema == splitting.BUCKETED


def test_split_is_stratified_and_sized():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(1000)], "label": [0] * 700 + [1] * 300})
    out = _split_all(df)
    sizes = out.groupby(["split", "label"]).size().to_dict()
    assert sizes == {
        ("train", 0): 560,
        ("validation", 0): 70,
        ("test", 0): 70,
        ("train", 1): 240,
        ("validation", 1): 30,
        ("test", 1): 30,
    }


def test_split_does_not_depend_on_row_order_and_changes_with_seed():
    df = pd.DataFrame({"text": [f"text {i}" for i in range(500)], "label": [i % 3 for i in range(500)]})
    a = _split_all(df).set_index("text")["split"]
    b = _split_all(df.sample(frac=1, random_state=3), n_parts=7).set_index("text")["split"]
    assert a.sort_index().equals(b.sort_index())
    c = _split_all(df, seed=1).set_index("text")["split"]
    assert not a.sort_index().equals(c.sort_index())


def test_sample_keeps_class_proportions():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(1000)], "label": [0] * 800 + [1] * 200})
    out = _split_all(df, max_rows=100)
    assert out["label"].value_counts().to_dict() == {0: 80, 1: 20}


def test_class_too_small_for_a_split_is_an_error():
    with pytest.raises(DataError, match=r"class 'rare' has 3 row\(s\).*validation split"):
        splitting.check_split_sizes({0: 100, 1: 3}, [0.8, 0.1, 0.1], ["common", "rare"])
    splitting.check_split_sizes({0: 100, 1: 20}, [0.8, 0.1, 0.1], ["common", "rare"])


def test_text_key_is_stable():
    # The key is the documented SHA-256 prefix; a change would silently move every user's split.
    import hashlib

    expected = int.from_bytes(hashlib.sha256("split:0\x00héllo".encode()).digest()[:8], "big") >> 1
    assert splitting.text_key("héllo", "split:0") == expected


def test_dedup_buckets_grow_with_the_rows_and_any_count_keeps_the_same_rows():
    assert splitting.dedup_buckets(10) == 32 and splitting.dedup_buckets(3_200_000) == 32
    assert splitting.dedup_buckets(10_000_000) == 100  # about 100k rows a bucket
    rng = np.random.default_rng(0)
    texts = [f"t{i}" for i in rng.integers(0, 400, 1000)]  # many copies
    batch = pd.DataFrame({"text": texts, "label": rng.integers(0, 2, 1000), "drop_reason": ""})

    def deduped(buckets):
        rows = splitting.keep_and_bucket(batch, buckets=buckets).to_pandas()
        assert rows["bucket"].between(0, buckets - 1).all()
        out = pd.concat(
            [splitting.deduplicate(g.drop(columns="bucket")).to_pandas() for _, g in rows.groupby("bucket")]
        )
        return out.sort_values("text").reset_index(drop=True)

    pd.testing.assert_frame_equal(deduped(32), deduped(7))


def _deduplicated_where_they_are(batch, buckets=7):
    """The pipeline's de-duplication on pandas: rows whose text key no other row holds stay
    as they are; only the others are bucketed and compared by their text."""
    keyed = splitting.with_keys(batch.copy(), seed=0)
    keys = splitting.kept_keys(keyed).to_pandas()
    shared = splitting.shared_keys(keys["text_key"].to_numpy())
    unique = splitting.unique_rows(keyed, shared=shared).to_pandas()
    bucketed = splitting.keep_and_bucket(keyed, buckets=buckets, shared=shared).to_pandas()
    copies = [splitting.deduplicate(g.drop(columns="bucket")).to_pandas() for _, g in bucketed.groupby("bucket")]
    return pd.concat([unique, *copies]).sort_values("text").reset_index(drop=True), len(bucketed)


def test_only_rows_sharing_a_text_key_are_compared_and_the_result_is_the_whole_deduplication():
    rng = np.random.default_rng(1)
    texts = [f"t{i}" for i in rng.integers(0, 3000, 2000)]  # some copies, most texts once
    batch = pd.DataFrame(
        {
            "text": texts,
            "label": rng.integers(0, 3, 2000),
            "drop_reason": np.where(rng.random(2000) < 0.05, "empty_after_cleaning", ""),
        }
    )
    got, compared = _deduplicated_where_they_are(batch)
    kept = batch[batch["drop_reason"] == ""]
    expected = splitting.deduplicate(kept[["text", "label"]]).to_pandas().sort_values("text").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    copies = kept["text"].duplicated(keep=False)
    assert compared == int(copies.sum()) and 0 < compared < len(kept)  # only the copies moved
    assert got["text"].is_unique


def test_two_texts_sharing_a_text_key_are_both_kept(monkeypatch):
    real = splitting.text_key
    monkeypatch.setattr(splitting, "text_key", lambda t, salt: 42 if salt == "bucket" else real(t, salt))
    batch = pd.DataFrame({"text": ["good", "bad", "good"], "label": [1, 0, 1], "drop_reason": ""})
    got, compared = _deduplicated_where_they_are(batch)
    assert compared == 3  # every row holds key 42: all are compared by their text
    assert got[["text", "label", "copies"]].values.tolist() == [["bad", 0, 1], ["good", 1, 2]]


def test_keys_of_dropped_rows_are_not_handed_on():
    batch = pd.DataFrame({"text": ["a", "", "b"], "label": [0, -1, 1], "drop_reason": ["", "missing_text", ""]})
    keyed = splitting.with_keys(batch, seed=3)
    assert keyed["text_key"].tolist()[1] == -1 and (keyed["sample_key"] >= -1).all()
    keys = splitting.kept_keys(keyed).to_pandas()
    assert keys["label"].tolist() == [0, 1]
    assert keys["split_key"].tolist() == [splitting.text_key("a", "split:3"), splitting.text_key("b", "split:3")]


def test_unique_rows_split_where_they_are_as_apply_split_splits_them():
    batch = pd.DataFrame(
        {"text": [f"t{i % 150}" for i in range(200)], "label": [i % 2 for i in range(200)], "drop_reason": ""}
    )
    keyed = splitting.with_keys(batch, seed=0)
    shared = splitting.shared_keys(splitting.kept_keys(keyed).to_pandas()["text_key"].to_numpy())
    unique = splitting.unique_rows(keyed, shared=shared).to_pandas()
    assert len(unique) == 100  # t100..t149 appear once
    thresholds = splitting.split_thresholds(unique, {0: 50, 1: 50}, [0.8, 0.1, 0.1])
    split = splitting.unique_rows(keyed, shared=shared, thresholds=thresholds).to_pandas()
    expected = splitting.apply_split(unique, thresholds=thresholds).to_pandas()
    pd.testing.assert_frame_equal(split, expected)
    assert split["split"].value_counts().to_dict() == {"train": 80, "validation": 10, "test": 10}
