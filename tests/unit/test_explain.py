"""Word-level explanations (occlusion with Captum): faithful to the model, placed on the
text, on every backend; and their display escapes the text."""

import numpy as np
import pytest

from raybm.inference.explain import explain, strongest
from raybm.inference.loading import load_predictor

TEXT = "An unbelievably rude crew, never again!"


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    return load_predictor(tiny_model_dir)


def test_each_weight_is_the_drop_in_the_answers_log_odds_without_that_word(predictor):
    found = explain(predictor, TEXT)
    probs = predictor.predict([TEXT])[0]
    best = int(probs.argmax())
    assert found["label"] == predictor.labels[best] and found["confidence"] == pytest.approx(probs[best], abs=1e-6)
    tok = predictor.tokenizer
    enc = tok(TEXT, return_offsets_mapping=True)
    for w in found["words"]:
        assert TEXT[w["start"] : w["end"]] == w["word"]
        # Mask every token of this word by hand and score again.
        ids = np.array([enc["input_ids"]])
        for k, (s, e) in enumerate(enc["offset_mapping"]):
            if s >= w["start"] and e <= w["end"] and e > s:
                ids[0, k] = tok.mask_token_id
        without = predictor.probabilities(ids, np.array([enc["attention_mask"]]))[0][best]
        odds = lambda p: np.log(p / (1 - p))  # noqa: E731
        assert w["weight"] == pytest.approx(odds(probs[best]) - odds(without), abs=1e-4)
    assert [w["word"] for w in found["words"]] == ["An", "unbelievably", "rude", "crew", ",", "never", "again", "!"]


def test_the_strongest_words_are_those_that_pushed_the_answer(predictor):
    found = {"words": [{"word": "a", "weight": 0.1}, {"word": "b", "weight": -0.5}, {"word": "c", "weight": 0.3}]}
    assert strongest(found) == ["c", "a"]


def test_onnx_gives_the_same_explanation(tiny_model_dir, tmp_path, predictor):
    from raybm.export.onnx import export_onnx

    export_onnx(tiny_model_dir, str(tmp_path / "onnx"))
    onnx = explain(load_predictor(str(tmp_path / "onnx"), "onnx"), TEXT)
    torch = explain(predictor, TEXT)
    assert [w["word"] for w in onnx["words"]] == [w["word"] for w in torch["words"]]
    assert [w["weight"] for w in onnx["words"]] == pytest.approx([w["weight"] for w in torch["words"]], abs=1e-4)


def test_a_text_without_words_gets_its_answer_and_no_words(predictor):
    found = explain(predictor, "\u200b")  # a zero-width space: text to the server, nothing to the tokenizer
    assert found["words"] == [] and found["label"] in predictor.labels and 0 < found["confidence"] <= 1


def test_the_highlighted_text_escapes_whatever_the_text_holds():
    from raybm.dashboard.try_it import highlighted

    text = "<script>alert(1)</script> & good"
    words = [
        {"word": "<script>alert(1)</script>", "start": 0, "end": 25, "weight": -0.2},
        {"word": "good", "start": 28, "end": 32, "weight": 0.4},
    ]
    out = highlighted(text, words)
    assert "<script>" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out and " &amp; " in out
    assert "rgba(0, 160, 60, 0.60)" in out and "rgba(220, 40, 40, 0.30)" in out


def test_predict_explain_and_the_watcher_share_one_tokenizer_safely(tiny_model_dir):
    """A replica's batch thread (truncation and padding), its explanation threads and its
    watcher (no truncation) call one fast tokenizer at once; each call resets the
    tokenizer's settings, so every call goes one at a time (raybm.inference.loading.tokenize)."""
    from concurrent.futures import ThreadPoolExecutor

    from raybm.inference.explain import explain
    from raybm.inference.loading import load_predictor
    from raybm.serve.watch import length_bins

    predictor = load_predictor(tiny_model_dir, max_length=8)
    texts = [
        "short one",
        "a much longer text that goes well past eight tokens of the tiny model, and on",
        "mid length text here",
        "x",
    ]
    reference = {"length_edges": [2, 4, 8, 16], "labels": {"a": 1}}
    want_probs = predictor.predict(texts)
    want_words = [w["word"] for w in explain(predictor, texts[1])["words"]]
    want_bins = length_bins(predictor.tokenizer, texts, reference)

    def job(i: int):
        kind = i % 3
        if kind == 0:
            return np.allclose(predictor.predict(texts), want_probs, atol=1e-5)
        if kind == 1:
            return [w["word"] for w in explain(predictor, texts[1])["words"]] == want_words
        return length_bins(predictor.tokenizer, texts, reference) == want_bins

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(lambda i: _safely(job, i), range(300)))
    assert outcomes.count(True) == 300, [o for o in outcomes if o is not True][:3]


def _safely(job, i):
    try:
        return job(i)
    except Exception as e:  # noqa: BLE001 - reported by the assertion
        return f"{type(e).__name__}: {e}"
