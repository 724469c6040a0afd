"""Offline prediction without Ray: one text, and whole files in every format."""

import os

import numpy as np
import pandas as pd
import pytest

from raybm.errors import RaybmError
from raybm.inference.evaluate import Classify
from raybm.inference.predict import CONFIDENCE, PREDICTED_LABEL, predict_file, predict_texts

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
    {
        "csv": lambda: df.to_csv(src, index=False),
        "tsv": lambda: df.to_csv(src, index=False, sep="\t"),
        "jsonl": lambda: df.to_json(src, orient="records", lines=True),
        "parquet": lambda: df.to_parquet(src),
    }[ext]()
    out = tmp_path / f"out.{ext}"
    rows = predict_file(tiny_model_dir, str(src), str(out), text_column="review", max_length=32, use_ray=False)
    assert rows == (len(TEXTS), 0)
    read = {
        "csv": lambda p: pd.read_csv(p, dtype=str),
        "tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str),
        "jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
        "parquet": pd.read_parquet,
    }[ext]
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


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_rows_without_text_are_kept_unlabelled_and_counted(tiny_model_dir, tmp_path, ext, monkeypatch):
    texts = ["I love it", "", None, "   ", "never again"]
    df = pd.DataFrame({"id": [str(i) for i in range(len(texts))], "review": texts})
    src, out = tmp_path / f"in.{ext}", tmp_path / f"out.{ext}"
    {
        "csv": lambda: df.to_csv(src, index=False),
        "jsonl": lambda: df.to_json(src, orient="records", lines=True),
        "parquet": lambda: df.to_parquet(src),
    }[ext]()
    # chunks of 2 rows: a chunk with no text at all comes after one with labels
    import raybm.inference.predict as predict_mod

    frames = predict_mod._read_frames
    monkeypatch.setattr(predict_mod, "_read_frames", lambda path, fmt, chunk_rows=2: frames(path, fmt, chunk_rows=2))
    done = predict_file(tiny_model_dir, str(src), str(out), text_column="review", max_length=32, use_ray=False)
    assert done == (5, 3)
    got = {
        "csv": lambda p: pd.read_csv(p, dtype=str),
        "jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
        "parquet": pd.read_parquet,
    }[ext](out)
    assert got["id"].tolist() == [str(i) for i in range(5)]
    expected = [lab for lab, _ in predict_texts(tiny_model_dir, ["I love it", "never again"], max_length=32)]
    assert got[PREDICTED_LABEL].tolist()[0::4] == expected
    assert got[PREDICTED_LABEL].iloc[1:4].isna().all() and got[CONFIDENCE].iloc[1:4].isna().all()
    assert got[CONFIDENCE].iloc[[0, 4]].notna().all()


def test_output_folder_must_exist_and_differ_from_the_input(tiny_model_dir, tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": ["x"]}).to_csv(src, index=False)
    with pytest.raises(RaybmError, match="does not exist; create it first"):
        predict_file(tiny_model_dir, str(src), str(tmp_path / "no" / "out.csv"))
    with pytest.raises(RaybmError, match="is the input file"):
        predict_file(tiny_model_dir, str(src), str(src))
    assert os.listdir(tmp_path) == ["in.csv"] and pd.read_csv(src)["text"].tolist() == ["x"]


def test_probabilities_add_a_column_per_class_and_input_columns_are_never_overwritten(tiny_model_dir, tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"review": TEXTS[:3] + [""]}).to_csv(src, index=False)
    assert predict_file(
        tiny_model_dir, str(src), str(out), text_column="review", max_length=32, use_ray=False, probabilities=True
    ) == (4, 1)
    got = pd.read_csv(out)
    assert list(got.columns) == ["review", PREDICTED_LABEL, CONFIDENCE, "prob_negative", "prob_positive"]
    probs = Classify(tiny_model_dir, max_length=32).predict(TEXTS[:3])
    assert got[["prob_negative", "prob_positive"]].to_numpy()[:3] == pytest.approx(probs, abs=1e-6)
    assert got[CONFIDENCE][:3].tolist() == pytest.approx(probs.max(1).tolist(), abs=1e-6)
    assert got.iloc[3][["prob_negative", "prob_positive", CONFIDENCE]].isna().all()

    labelled = tmp_path / "labelled.csv"  # labelling a labelled file would overwrite its columns
    got.to_csv(labelled, index=False)
    with pytest.raises(RaybmError, match=r"already has the column\(s\) \['predicted_label', 'confidence'\]"):
        predict_file(tiny_model_dir, str(labelled), str(tmp_path / "again.csv"), text_column="review")
    assert not (tmp_path / "again.csv").exists()


def test_long_files_report_progress(tiny_model_dir, tmp_path, monkeypatch):
    import raybm.inference.predict as predict_mod

    monkeypatch.setattr(predict_mod, "PROGRESS_EVERY_S", 0.0)
    frames = predict_mod._read_frames
    monkeypatch.setattr(predict_mod, "_read_frames", lambda path, fmt, chunk_rows=2: frames(path, fmt, chunk_rows=2))
    src = tmp_path / "in.csv"
    pd.DataFrame({"text": TEXTS}).to_csv(src, index=False)
    lines = []
    predict_file(tiny_model_dir, str(src), str(tmp_path / "out.csv"), max_length=32, use_ray=False, log=lines.append)
    assert [ln.split(" rows labelled")[0].strip() for ln in lines] == ["2", "4", "5"]


def test_answers_in_words_follow_the_confidence_and_the_abstain_band():
    from raybm.inference.predict import in_words

    assert in_words("negative", 0.9964) == "very likely negative (99.6%)"
    assert in_words("positive", 0.85) == "likely positive (85.0%)"
    assert in_words("positive", 0.62) == "probably positive (62.0%)"
    assert in_words("neutral", 0.41) == "unsure, leaning neutral (41.0%)"
    assert in_words("negative", 0.967, min_confidence=0.98) == "uncertain (leaning negative, 96.7%)"


def test_cli_and_server_use_the_length_the_model_was_trained_with(tiny_model_dir, tmp_path):
    """`raybm predict` and `raybm evaluate` truncate as the model server does: at the model's
    own data.max_length (its raybm_config.yaml), unless --max-length says otherwise."""
    import shutil

    from raybm.cli import build_parser
    from raybm.inference.loading import load_predictor

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "raybm_config.yaml").write_text("data:\n  max_length: 6\n")
    text = "the first words say one thing " + "but then it goes on and on about something else entirely " * 6
    served = load_predictor(str(folder)).predict([text])[0]  # what a replica answers (no length given)
    full = load_predictor(str(folder), max_length=128).predict([text])[0]
    assert abs(served[1] - full[1]) > 1e-6  # truncation matters for this text
    for command in (["predict", "--model", "m", "--text", "t"], ["evaluate", "--checkpoint", "m", "--data", "d"]):
        assert build_parser().parse_args(command).max_length is None  # the commands' default: the model's own
    ((_, confidence),) = predict_texts(str(folder), [text])
    assert confidence == pytest.approx(float(max(served)), abs=1e-7)
    assert Classify(str(folder)).predict([text])[0] == pytest.approx(served, abs=1e-7)
    ((_, confidence),) = predict_texts(str(folder), [text], max_length=128)
    assert confidence == pytest.approx(float(max(full)), abs=1e-7)


def test_a_folder_a_glob_or_s3_makes_a_scoring_job_and_its_files_are_found_in_name_order(tmp_path):
    from raybm.config import StorageConfig
    from raybm.inference.batch import find_inputs, is_folder_job

    assert not is_folder_job(str(tmp_path / "in.csv"), str(tmp_path / "out.parquet"))  # file to file: in process
    assert is_folder_job(str(tmp_path / "*.csv"), str(tmp_path / "out.parquet"))
    assert is_folder_job(str(tmp_path / "in.csv"), str(tmp_path / "scored"))  # no suffix: a folder of Parquet
    assert is_folder_job("s3://bucket/in.csv", str(tmp_path / "out.csv"))
    assert is_folder_job(str(tmp_path), str(tmp_path / "out.csv"))
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("b.csv", "a.csv", "sub/c.csv", "_SUCCESS", ".a.csv.tmp-1", "notes.txt"):
        (tmp_path / "in" / name).write_text("text\nhi\n")
    storage = StorageConfig()
    found = find_inputs(str(tmp_path / "in"), storage)
    assert found.fmt == "csv" and [os.path.relpath(p, tmp_path / "in") for p in found.paths] == [
        "a.csv",
        "b.csv",
        "sub/c.csv",
    ]
    assert [os.path.basename(p) for p in find_inputs(str(tmp_path / "in" / "*.csv"), storage).paths] == [
        "a.csv",
        "b.csv",
        "c.csv",
    ]  # * crosses folders, as ** does
    assert len(find_inputs(str(tmp_path / "in" / "a.csv"), storage).paths) == 1
    (tmp_path / "in" / "d.parquet").write_text("")
    with pytest.raises(RaybmError, match=r"must all be one of .*score each kind apart"):
        find_inputs(str(tmp_path / "in"), storage)
    with pytest.raises(RaybmError, match="no such file or folder"):
        find_inputs(str(tmp_path / "missing"), storage)
    with pytest.raises(RaybmError, match="no .csv, .tsv, .jsonl or .parquet file there"):
        find_inputs(str(tmp_path / "in" / "*.jsonl"), storage)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_a_scoring_job_learns_its_columns_and_rows_without_reading_the_files_whole(tmp_path, fmt):
    from raybm.config import StorageConfig
    from raybm.inference.batch import estimate_rows, find_inputs, input_columns

    frame = pd.DataFrame({"id": range(3000), "text": [f"tweet number {i}" + "!" * (i % 7) for i in range(3000)]})
    for k in range(3):
        part = frame.iloc[1000 * k : 1000 * (k + 1)]
        path = tmp_path / f"p{k}.{fmt}"
        if fmt == "parquet":
            part.to_parquet(path, index=False)
        elif fmt == "jsonl":
            part.to_json(path, orient="records", lines=True)
        else:
            part.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    inputs = find_inputs(str(tmp_path), StorageConfig())
    assert input_columns(inputs) == ["id", "text"]
    rows, exact = estimate_rows(inputs, [1, 2])
    assert exact == (fmt == "parquet") and abs(rows - 2000) <= 40  # text formats: from the first file's rows per byte


def test_texts_run_fewest_tokens_first_come_back_in_order_with_their_own_answers(tiny_model_dir):
    from raybm.inference.loading import load_predictor

    p = load_predictor(tiny_model_dir, "torch", batch_size=4, max_length=24)
    texts = [("word " * n).strip() + ("!" if n % 2 else "") for n in (9, 1, 30, 4, 4, 2, 17, 6, 1, 12, 3)]
    together = p.predict(texts)  # three batches, each of texts of about one length
    alone = np.stack([p.predict([t])[0] for t in texts])  # no padding at all
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert p.predict([]).shape == (0, len(p.labels))


def test_length_groups_cut_at_the_batch_size_and_the_padding_they_would_waste():
    from raybm.inference.loading import length_groups

    lengths = np.array([30, 5, 6, 31, 5, 12, 7, 5, 64, 29, 6, 5])
    groups = length_groups(lengths, batch_size=3, max_waste=0.2)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))  # every row once
    assert [lengths[g].tolist() for g in groups] == [[5, 5, 5], [5, 6, 6], [7], [12], [29, 30, 31], [64]]
    for g in groups:
        assert len(g) <= 3 and (lengths[g].max() * len(g) - lengths[g].sum()) <= 0.2 * lengths[g].max() * len(g)
    assert [len(g) for g in length_groups(lengths, batch_size=64, max_waste=1.0)] == [12]  # padding allowed: one call
    assert [len(g) for g in length_groups(np.array([9]), batch_size=8)] == [1]
