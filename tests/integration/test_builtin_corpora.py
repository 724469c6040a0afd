"""The built-in corpora, read from the installed packages (no network).

The counts asserted here are the documented ones (docs/data.md): if cleaning or
de-duplication changes, this test and the doc change together.
"""

import pandas as pd
import pytest

from raybm.config import build_config, load_config
from raybm.data import run_data_stage
from raybm.storage.results import Results

pytestmark = pytest.mark.integration

TWITTER_BINARY = {"rows_read": 38158, "excluded_label": 15018, "duplicate": 892, "negative": 15527, "positive": 6721}


def split_assignment(cfg, name):
    results = Results.from_config(cfg.storage)
    frames = []
    for split in ("train", "validation", "test"):
        df = pd.read_parquet(results.dataset_split_dir(name, split))
        frames.append(df.assign(split=split))
    return pd.concat(frames).set_index("text").sort_index()


def test_twitter_corpus_documented_counts_and_repeatable_split(ray_local, tmp_path):
    cfg = load_config("jobs/configs/twitter-full.yaml", [f"storage.root={tmp_path}"])
    first = run_data_stage(cfg, log=lambda _: None)
    rep = first.report.to_json()  # as written in report.json
    assert rep["rows_read"] == TWITTER_BINARY["rows_read"]
    assert rep["dropped"] == {
        "excluded_label": TWITTER_BINARY["excluded_label"],
        "duplicate": TWITTER_BINARY["duplicate"],
    }
    per_label = {lab: sum(s["labels"][lab] for s in rep["splits"].values()) for lab in rep["labels"]}
    assert per_label == {"negative": TWITTER_BINARY["negative"], "positive": TWITTER_BINARY["positive"]}
    assert rep["rows_kept"] == rep["rows_read"] - rep["dropped_total"]
    # 8:1:1 and stratified: every split has the corpus's 70/30 balance
    for split in rep["splits"].values():
        assert abs(split["labels"]["positive"] / split["rows"] - 6721 / 22248) < 0.005
    assert rep["splits"]["validation"]["rows"] == rep["splits"]["test"]["rows"] == 2225

    a = split_assignment(cfg, first.name)
    assert not a.index.duplicated().any()  # no text in two splits
    assert not a.index.str.contains("Õ¢_|äó", regex=True).any()  # mojibake repaired
    second = run_data_stage(cfg, force=True, log=lambda _: None)
    b = split_assignment(cfg, second.name)
    assert a.equals(b)


def test_twitter_three_classes(ray_local, tmp_path):
    cfg = load_config("jobs/configs/twitter-3class.yaml", [f"storage.root={tmp_path}", "data.max_rows=3000"])
    rep = run_data_stage(cfg, log=lambda _: None).report.to_json()
    assert rep["labels"] == ["negative", "neutral", "positive"]
    assert "excluded_label" not in rep["dropped"]
    assert rep["rows_kept"] == 3000 and rep["dropped"]["over_max_rows"] > 30000
    assert all(v > 0 for s in rep["splits"].values() for v in s["labels"].values())


def test_chinese_reviews(ray_local, tmp_path):
    cfg = build_config(overrides=[f"storage.root={tmp_path}", "data.source=chinese-reviews", "data.max_rows=2000"])
    rep = run_data_stage(cfg, log=lambda _: None).report.to_json()
    assert rep["rows_read"] == 16548 + 18576  # one review a line in pos.txt and neg.txt
    assert rep["labels"] == ["negative", "positive"]
    assert rep["rows_kept"] == 2000
    assert rep["rows_read"] == rep["rows_kept"] + rep["dropped_total"]
    assert rep["splits"]["test"]["labels"]["negative"] > 0 and rep["splits"]["test"]["labels"]["positive"] > 0
