"""Offline prediction without Ray: one text, and whole files in every format."""

import os

import pandas as pd
import pytest

from raybm.errors import RaybmError
from raybm.evaluate import Classify
from raybm.predict import CONFIDENCE, PREDICTED_LABEL, predict_file, predict_texts

TEXTS = ["I love it", "terrible, broke in a day", "fine I guess", "best thing ever", "never again"]


def test_predict_texts_matches_the_model(tiny_model_dir):
    got = predict_texts(tiny_model_dir, TEXTS, max_length=32)
    probs = Classify(tiny_model_dir, max_length=32).predict(TEXTS)
    assert [lab for lab, _ in got] == [["negative", "positive"][i] for i in probs.argmax(-1)]
    assert all(0.5 <= conf <= 1.0 for _, conf in got)


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet"])
def test_predict_file_keeps_columns_and_order(tiny_model_dir, tmp_path, ext):
    df = pd.DataFrame({"id": [str(i) for i in range(len(TEXTS))], "review": TEXTS})
    src = tmp_path / f"in.{ext}"
    {"csv": lambda: df.to_csv(src, index=False), "tsv": lambda: df.to_csv(src, index=False, sep="\t"),
     "jsonl": lambda: df.to_json(src, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(src)}[ext]()
    out = tmp_path / f"out.{ext}"
    rows = predict_file(tiny_model_dir, str(src), str(out), text_column="review", max_length=32, use_ray=False)
    assert rows == len(TEXTS)
    read = {"csv": lambda p: pd.read_csv(p, dtype=str), "tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str),
            "jsonl": lambda p: pd.read_json(p, lines=True, dtype=False), "parquet": pd.read_parquet}[ext]
    got = read(out)
    assert list(got.columns) == ["id", "review", PREDICTED_LABEL, CONFIDENCE]
    assert got["review"].tolist() == TEXTS
    expected = [lab for lab, _ in predict_texts(tiny_model_dir, TEXTS, max_length=32)]
    assert got[PREDICTED_LABEL].tolist() == expected


def test_bad_inputs_are_clear_and_leave_no_file(tiny_model_dir, tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"body": ["x"]}).to_csv(src, index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(RaybmError, match=r"no text column 'text'; columns found: \['body'\]"):
        predict_file(tiny_model_dir, str(src), str(out))
    with pytest.raises(RaybmError, match="use a .csv, .tsv, .jsonl or .parquet"):
        predict_file(tiny_model_dir, str(src), str(tmp_path / "out.xlsx"), text_column="body")
    with pytest.raises(RaybmError, match="no such file"):
        predict_file(tiny_model_dir, str(tmp_path / "nope.csv"), str(out))
    with pytest.raises(RaybmError, match="not a raybm model folder"):
        predict_file(str(tmp_path), str(src), str(out), text_column="body")
    assert os.listdir(tmp_path) == ["in.csv"]
