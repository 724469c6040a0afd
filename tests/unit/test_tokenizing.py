import numpy as np
import pandas as pd

from raybm.config import AugmentConfig
from raybm.data.tokenizing import AugmentCollate, CountTokens, Tokenize, augment_text, augment_units, pad_collate

MODEL = "all-minilm-l6-v2"  # shipped in an installed package: no download
TEXTS = ["a short one", "this text is quite a bit longer than the first one, with more words"]


def test_tokenize_longest_gives_variable_rows_and_collate_pads():
    tok = Tokenize(MODEL, max_length=8, padding="longest")
    out = tok(pd.DataFrame({"text": TEXTS, "label": [0, 1]}))
    lengths = [len(r) for r in out["input_ids"]]
    assert lengths[0] < lengths[1] == 8  # truncated at max_length
    assert out["labels"].tolist() == [0, 1]
    batch = pad_collate(out)
    assert tuple(batch["input_ids"].shape) == (2, 8)
    assert batch["attention_mask"][0].sum().item() == lengths[0]
    assert batch["input_ids"][0, lengths[0] :].eq(0).all()


def test_tokenize_max_length_gives_fixed_width():
    out = Tokenize(MODEL, max_length=16, padding="max_length")(pd.DataFrame({"text": TEXTS}))
    assert out["input_ids"].shape == (2, 16) and out["input_ids"].dtype == np.int64
    assert "labels" not in out


def test_count_tokens_is_untruncated_and_stores_the_ids_training_reads():
    out = CountTokens(MODEL, max_length=8)(pd.DataFrame({"text": TEXTS, "split": ["train", "test"], "label": [0, 1]}))
    assert out.column("n_tokens").to_pylist()[1] > 8
    assert str(out.schema.field("input_ids").type) == "list<item: int32>"
    stored = out.column("input_ids").to_pylist()
    tokenized = Tokenize(MODEL, max_length=8, padding="longest")(pd.DataFrame({"text": TEXTS}))["input_ids"]
    assert stored == [r.tolist() for r in tokenized]  # what Tokenize would hand the workers
    assert out.column("text").to_pylist() == TEXTS and out.column("label").to_pylist() == [0, 1]


def test_count_tokens_counts_as_the_tokenizer_itself_for_every_kind_of_tokenizer():
    # CountTokens runs a fast tokenizer's own encoder (faster); the ids must be the ones the
    # transformers call gives, special tokens included, whatever the tokenizer.
    from raybm.models.build import TINY_MODELS, load_tokenizer

    texts = TEXTS + ["Émojis 😀 and\ttabs, URLs http://x.y/z?q=1 — and “quotes”", "", "   spaced   out  "]
    for name in [MODEL, *TINY_MODELS]:
        counter = CountTokens(name, max_length=6)
        tokenizer = load_tokenizer(name)
        expected = tokenizer(texts, truncation=False, padding=False)["input_ids"]
        out = counter(pd.DataFrame({"text": texts, "label": [0] * len(texts)}))
        assert out.column("n_tokens").to_pylist() == [len(ids) for ids in expected], name
        cut = tokenizer(texts, truncation=True, max_length=6, padding=False)["input_ids"]
        assert out.column("input_ids").to_pylist() == cut, name
        assert counter.encoder is not None or not tokenizer.is_fast, name


def test_collate_of_stored_ids_attends_to_every_token_and_pads_to_a_fixed_width():
    ids = np.empty(2, dtype=object)
    ids[:] = [np.array([101, 7, 102], dtype=np.int32), np.array([101, 102], dtype=np.int32)]
    batch = pad_collate({"input_ids": ids, "label": np.array([1, 0])})
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
    fixed = pad_collate({"input_ids": ids, "label": np.array([1, 0])}, width=5)
    assert tuple(fixed["input_ids"].shape) == (2, 5) and fixed["attention_mask"].sum().item() == 5
    same = np.array([[101, 7, 102], [101, 8, 102]])  # rows of one length arrive as one 2-D array
    assert pad_collate({"input_ids": same, "label": np.array([0, 1])})["attention_mask"].tolist() == [[1] * 3] * 2


def test_augmentation_is_seeded_and_changes_text():
    cfg = AugmentConfig(
        enabled=True,
        crop_prob=1.0,
        crop_min_ratio=0.5,
        pad_prob=1.0,
        pad_max_tokens=2,
        replace_prob=0.3,
        delete_prob=0.2,
    )
    text = "one two three four five six seven eight nine ten"
    a = augment_text(text, cfg, np.random.default_rng(5), "[MASK]", "[PAD]")
    b = augment_text(text, cfg, np.random.default_rng(5), "[MASK]", "[PAD]")
    assert a == b and a != text
    assert "[PAD]" in a
    off = AugmentConfig(enabled=True, crop_prob=0, pad_prob=0, replace_prob=0, delete_prob=0)
    assert augment_text(text, off, np.random.default_rng(0), "[MASK]", "[PAD]") == text


def test_chinese_text_is_augmented_by_characters_not_as_one_word():
    cfg = AugmentConfig(enabled=True, crop_prob=0, pad_prob=0, replace_prob=0.2, delete_prob=0)
    text = "这部电影的结局非常感人我很喜欢"
    words, joiner = augment_units(text)
    assert words == list(text) and joiner == ""
    masked = [augment_text(text, cfg, np.random.default_rng(seed), "[MASK]", "[PAD]") for seed in range(20)]
    # Some characters masked, never the whole text as one unit, the others kept in place.
    assert all(m != "[MASK]" for m in masked) and any("[MASK]" in m for m in masked)
    for m in masked:
        assert len(m.replace("[MASK]", "?")) == len(text)
    assert augment_units("the film was long") == (["the", "film", "was", "long"], " ")


def test_training_texts_are_augmented_anew_every_epoch_and_the_same_in_every_run():
    from raybm.models.build import load_tokenizer

    batch = {
        "text": np.array(["the film was long but the ending was wonderful and moving"], dtype=object),
        "label": np.array([1]),
    }
    aug = AugmentConfig(enabled=True, crop_prob=1.0, replace_prob=0.5)
    tokenizer = load_tokenizer(MODEL)
    plain = Tokenize(MODEL, 64, "longest")(pd.DataFrame(batch))["input_ids"][0].tolist()
    collate = AugmentCollate(tokenizer, aug, 64, "longest", seed=0)
    e0 = collate.for_epoch(0)(batch)["input_ids"][0].tolist()
    e1 = collate.for_epoch(1)(batch)["input_ids"][0].tolist()
    e0_again = AugmentCollate(tokenizer, aug, 64, "longest", seed=0).for_epoch(0)(batch)
    assert e0 == e0_again["input_ids"][0].tolist() and e0 != plain and e1 != e0
    assert e0_again["labels"].tolist() == [1] and e0_again["attention_mask"].shape == e0_again["input_ids"].shape
    fixed = AugmentCollate(tokenizer, aug, 16, "max_length", seed=0).for_epoch(2)(batch)
    assert tuple(fixed["input_ids"].shape) == (1, 16)


def test_collate_of_read_only_arrays_copies_without_a_warning():
    # Ray Data hands the loop read-only arrays; torch warns (once per worker) on a tensor
    # that shares memory with one.
    import warnings

    labels = np.arange(4)
    ids = np.ones((4, 8), dtype=np.int64)
    for a in (labels, ids):
        a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pad_collate({"input_ids": ids, "label": labels})
    out["labels"][0] = 7  # writable, and not the caller's array
    assert labels[0] == 0 and out["input_ids"].shape == (4, 8)


def test_batches_pad_with_the_models_pad_id_whether_ragged_or_zero_padded_upstream():
    ragged = {"input_ids": np.array([np.array([7, 8, 9]), np.array([7])], dtype=object), "label": np.array([0, 1])}
    assert pad_collate(ragged, pad_id=5)["input_ids"].tolist() == [[7, 8, 9], [7, 5, 5]]
    whole = {
        "input_ids": np.array([[7, 8, 9], [7, 0, 0]]),
        "attention_mask": np.array([[1, 1, 1], [1, 0, 0]]),
        "label": np.array([0, 1]),
    }  # a whole split's rows come 0-padded
    out = pad_collate(whole, pad_id=5)
    assert out["input_ids"].tolist() == [[7, 8, 9], [7, 5, 5]] and out["attention_mask"].tolist() == [
        [1, 1, 1],
        [1, 0, 0],
    ]
