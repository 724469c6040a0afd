"""The data stage on a shared local Ray, over real files in every supported format."""

import os
from pathlib import Path

import pandas as pd
import pytest

from raybm.config import build_config, load_config
from raybm.data import load_split, run_data_stage, tokenize_dataset
from raybm.data.tokenizing import PadCollate
from raybm.errors import DataError
from raybm.storage.results import Results
from tests.helpers import make_frame

pytestmark = pytest.mark.integration
ASSETS = Path(__file__).resolve().parents[1] / "assets"
REPO = Path(__file__).resolve().parents[2]


def quiet(_msg):
    pass


def prepare(tmp_path, source, *overrides):
    cfg = build_config(
        overrides=[
            f"storage.root={tmp_path / 'results'}",
            f"data.source={source}",
            "data.text_column=body",
            "data.label_column=sentiment",
            *overrides,
        ]
    )
    return cfg, run_data_stage(cfg, log=quiet)


def split_of(results: Results, name: str) -> dict[str, str]:
    out = {}
    for split in ("train", "validation", "test"):
        for text in pd.read_parquet(results.dataset_split_dir(name, split))["text"]:
            assert text not in out, f"{text!r} is in two splits"
            out[text] = split
    return out


def test_user_csv_end_to_end(ray_local, tmp_path):
    cfg = load_config(
        REPO / "jobs/configs/user-files.yaml", [f"storage.root={tmp_path}", f"data.source={ASSETS / 'reviews.csv'}"]
    )
    prepared = run_data_stage(cfg, log=quiet)
    rep = prepared.report.to_json()  # as written in report.json
    assert rep["rows_read"] == 54
    assert rep["dropped"] == {"missing_text": 1, "excluded_label": 3, "empty_after_cleaning": 1, "duplicate": 1}
    assert rep["rows_read"] == rep["rows_kept"] + rep["dropped_total"]
    assert sum(s["rows"] for s in rep["splits"].values()) == rep["rows_kept"] == 48
    assert rep["splits"]["validation"]["labels"] == {"negative": 2, "positive": 2}

    results = Results.from_config(cfg.storage)
    folder = Path(results.dataset_dir(prepared.name))
    assert sorted(os.listdir(folder)) == [
        "_SUCCESS",
        "config.yaml",
        "label_map.json",
        "report.json",
        "test",
        "train",
        "validation",
    ]
    assert results.dataset_label_map(prepared.name)["label_to_id"] == {"negative": 0, "positive": 1}
    resolved = load_config(folder / "config.yaml")
    assert resolved.data.label_values == cfg.data.label_values
    train = pd.read_parquet(folder / "train")
    assert list(train.columns) == ["text", "label", "input_ids"] and set(train["label"]) == {0, 1}
    all_text = set(split_of(results, prepared.name))
    assert "Excellent quality highly recommended" in all_text  # HTML tags cleaned
    assert not any("http" in t or "@" in t for t in all_text)  # URLs and mentions cleaned


def test_every_format_gives_the_same_split(ray_local, tmp_path):
    df = make_frame()
    (tmp_path / "in").mkdir()
    df.to_csv(tmp_path / "in/a.csv", index=False)
    df.to_csv(tmp_path / "in/a.tsv", index=False, sep="\t")
    df.to_json(tmp_path / "in/a.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "in/a.parquet")
    (tmp_path / "parts").mkdir()
    df.iloc[:30].to_csv(tmp_path / "parts/p1.csv", index=False)
    df.iloc[30:].to_csv(tmp_path / "parts/p2.csv", index=False)

    splits = {}
    for i, source in enumerate(["in/a.csv", "in/a.tsv", "in/a.jsonl", "in/a.parquet", "parts", "parts/p*.csv"]):
        cfg, prepared = prepare(tmp_path, tmp_path / source, f"data.name=ds{i}")
        assert prepared.report.rows_kept == 80, source
        splits[source] = split_of(Results.from_config(cfg.storage), prepared.name)
    first = splits["in/a.csv"]
    assert sorted(set(first.values())) == ["test", "train", "validation"]
    for source, got in splits.items():
        assert got == first, f"{source} split differs from the CSV's"


def test_rerun_reuses_and_force_rebuilds(ray_local, tmp_path):
    make_frame().to_csv(tmp_path / "d.csv", index=False)
    cfg, first = prepare(tmp_path, tmp_path / "d.csv")
    again = run_data_stage(cfg, log=quiet)
    assert again.reused and again.report == first.report
    rebuilt = run_data_stage(cfg, force=True, log=quiet)
    assert not rebuilt.reused and rebuilt.report.created_at >= first.report.created_at
    # a changed data config gets another dataset name, never the stale one
    _, other = prepare(tmp_path, tmp_path / "d.csv", "data.seed=1")
    assert other.name != first.name
    # a fixed name with a changed config is refused
    prepare(tmp_path, tmp_path / "d.csv", "data.name=fixed")
    with pytest.raises(DataError, match="different data config"):
        prepare(tmp_path, tmp_path / "d.csv", "data.name=fixed", "data.seed=3")


def no_leftovers(tmp_path):
    data = tmp_path / "results" / "data"
    return not data.exists() or os.listdir(data) == []


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_file", r"no such file or folder"),
        ("missing_column", r"column\(s\) \['sentiment'\] not found; columns found: \['body', 'stars'\]"),
        ("unknown_label", r"unknown label value\(s\) in 'sentiment': 'meh' \(2 rows\)"),
        ("bad_encoding_head", r"bad\.csv: bytes at offset \d+ are not valid utf-8; set data\.encoding"),
        ("bad_encoding_tail", r"bad\.csv \(byte \d+\): not valid utf-8 text; set data\.encoding"),
        ("empty_after_cleaning", r"no rows left after cleaning 4 rows"),
        ("class_too_small", r"class 'neg' has 2 row\(s\).*leaves the validation split without it"),
        ("bad_format", r"cannot tell the format"),
        ("corrupt_parquet", r"data\.parquet: cannot read it as parquet"),
        ("ragged_csv", r"cannot read csv data from .*bad\.csv"),
        ("stop_words_zh", r"stop_words removes English stop words; chinese-reviews is zh"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing(ray_local, tmp_path, case, match):
    src = tmp_path / "bad.csv"
    labels = ["pos", "neg"]
    if case == "missing_column":
        pd.DataFrame({"body": ["a"], "stars": [1]}).to_csv(src, index=False)
    elif case == "unknown_label":
        df = make_frame(10)
        df.loc[[0, 3], "sentiment"] = "meh"
        df.to_csv(src, index=False)
    elif case == "bad_encoding_head":
        src.write_bytes("body,sentiment\ncaf\u00e9 ok,pos\n".encode("latin-1"))
    elif case == "bad_encoding_tail":
        good = make_frame(2000).to_csv(index=False).encode()
        assert len(good) > 1 << 16
        src.write_bytes(good + "caf\u00e9 bad,pos\n".encode("latin-1"))
    elif case == "empty_after_cleaning":
        pd.DataFrame({"body": ["<b></b>", "http://x.y", "@someone", " "], "sentiment": labels * 2}).to_csv(
            src, index=False
        )
    elif case == "class_too_small":
        df = pd.concat(
            [
                make_frame(20)[lambda d: d.sentiment == "pos"],
                pd.DataFrame({"body": ["bad one", "bad two"], "sentiment": ["neg", "neg"]}),
            ]
        )
        df.to_csv(src, index=False)
    elif case == "bad_format":
        src = tmp_path / "data.xlsx"
        src.write_bytes(b"PK\x03\x04")
    elif case == "corrupt_parquet":
        src = tmp_path / "data.parquet"
        src.write_bytes(b"PAR1 this is not really parquet")
    elif case == "ragged_csv":
        src.write_text("body,sentiment\n" + "fine text,pos\n" * 30 + "a,b,c,d,e\n" + "other text,neg\n" * 30)
    elif case == "stop_words_zh":
        src = "chinese-reviews"
    if case == "missing_file":
        src = tmp_path / "nope.csv"
    extra = {"unknown_label": "data.labels=[neg, pos]", "stop_words_zh": "data.clean.stop_words=true"}
    with pytest.raises(DataError, match=match):
        prepare(tmp_path, src, extra.get(case, "data.seed=0"))
    assert no_leftovers(tmp_path)


def test_tokenized_split_streams_into_torch_batches(ray_local, tmp_path):
    make_frame().to_csv(tmp_path / "d.csv", index=False)
    cfg, prepared = prepare(tmp_path, tmp_path / "d.csv", "data.max_length=12")
    results = Results.from_config(cfg.storage)
    train = load_split(results, prepared.name, "train")
    tokens = tokenize_dataset(train, cfg.data, cfg.model)
    seen, labels = 0, set()
    for batch in tokens.iter_torch_batches(batch_size=16, collate_fn=PadCollate()):
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape[1] <= 12
        seen += batch["input_ids"].shape[0]
        labels |= set(batch["labels"].tolist())
    assert seen == prepared.report.split_rows("train")
    assert labels == {0, 1}
    with pytest.raises(DataError, match="not prepared"):
        load_split(results, "missing", "train")


def test_training_reads_the_ids_the_data_stage_stored_and_tokenizes_when_they_do_not_fit(ray_local, tmp_path):
    from raybm.train.driver import stored_ids_fit, training_datasets

    make_frame().to_csv(tmp_path / "d.csv", index=False)
    cfg, prepared = prepare(tmp_path, tmp_path / "d.csv", "data.max_length=12")
    assert stored_ids_fit(cfg, prepared.report)
    results = Results.from_config(cfg.storage)
    assert set(load_split(results, prepared.name, "validation", columns=("text", "label", "input_ids")).columns()) == {
        "text",
        "label",
        "input_ids",
    }

    def rows(datasets):  # (ids, label) of every validation row, padded per batch
        out = []
        for batch in datasets["validation"].iter_torch_batches(batch_size=8, collate_fn=PadCollate()):
            for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                out.append((tuple(ids[mask.bool()].tolist()), int(label)))
        return sorted(out)

    stored = training_datasets(cfg, prepared)
    assert "input_ids" in stored["train"].columns() and "attention_mask" not in stored["train"].columns()
    tokenized = {"validation": tokenize_dataset(load_split(results, prepared.name, "validation"), cfg.data, cfg.model)}
    assert rows(stored) == rows(tokenized)
    # Another max_length than the data stage's: tokenized again, at the new length.
    shorter = build_config(
        overrides=[
            *[f"{k}={v}" for k, v in (("storage.root", tmp_path / "results"), ("data.source", tmp_path / "d.csv"))],
            "data.text_column=body",
            "data.label_column=sentiment",
            "data.max_length=8",
        ]
    )
    assert not stored_ids_fit(shorter, prepared.report)
    assert max(len(ids) for ids, _ in rows(training_datasets(shorter, prepared))) == 8


def test_a_pipeline_whose_data_stage_fails_records_it(ray_local, tmp_path):
    # The pipeline's summary is named before the data is read, so a failing data stage is
    # in it (status, error), for the dashboard and for whoever submitted the job.
    import json

    from raybm.pipeline import run_pipeline

    src = tmp_path / "d.csv"
    df = make_frame(10)
    df.loc[[0, 3], "sentiment"] = "meh"
    df.to_csv(src, index=False)
    cfg = build_config(
        overrides=[
            f"storage.root={tmp_path / 'results'}",
            f"data.source={src}",
            "name=fails",
            "data.text_column=body",
            "data.label_column=sentiment",
            "data.labels=[neg, pos]",
            "pipeline.stages=[data, train]",
        ]
    )
    with pytest.raises(DataError, match="unknown label value"):
        run_pipeline(cfg, log=quiet)
    summary = json.loads((tmp_path / "results" / "pipelines" / "fails" / "summary.json").read_text())
    assert summary["status"] == "failed" and list(summary["stages"]) == ["data"]
    assert summary["stages"]["data"]["status"] == "failed"
    assert "unknown label value" in summary["stages"]["data"]["error"]
    assert not (tmp_path / "results" / "pipelines" / "fails" / "_SUCCESS").exists()
