import json

import pytest

from raybm.errors import RaybmError
from raybm.storage.records import LeaderboardRow, PipelineSummary, RunRecord, Winner


def test_a_winner_round_trips_with_its_format_and_keeps_fields_it_does_not_know():
    w = Winner(
        trial="t1",
        values={"train.lr": 1e-3},
        dataset="d1",
        metric="val_f1_macro",
        validation=0.8,
        model_dir="/r/sweeps/s/model",
        soup={"method": "greedy", "ingredients": ["t1"]},
        test={"accuracy": 0.9},
    )
    written = json.loads(json.dumps(w.to_json()))
    assert written["version"] == 1 and written["trial"] == "t1"
    back = Winner.from_json({**written, "added_later": [1, 2]})
    assert back.trial == "t1" and back.test == {"accuracy": 0.9} and back.extra == {"added_later": [1, 2]}
    assert back.to_json()["added_later"] == [1, 2]  # rewritten as read
    assert back.handed_on_soup is None  # a greedy soup that kept one model is that model alone
    assert Winner.from_json({**written, "soup": {"method": "uniform", "ingredients": ["t1"]}}).handed_on_soup


def test_a_record_from_before_versions_reads_as_version_1_and_a_missing_field_as_its_default():
    run = RunRecord.from_json({"run": "r1", "dataset": "d1", "test": {"accuracy": 0.5}})
    assert run.run == "r1" and run.best_epoch is None and run.worker_nodes == [] and run.to_json()["version"] == 1


@pytest.mark.parametrize("version", [2, "1", 0, True, None])
def test_a_record_of_a_version_this_raybm_does_not_know_is_refused_with_what_to_do(version):
    said = r"a sweep's winner.json \(s3://b/w.json\) is version .* of its format.*upgrade raybm"
    with pytest.raises(RaybmError, match=said):
        Winner.from_json({"version": version, "trial": "t1"}, "s3://b/w.json")


def test_a_record_that_is_not_an_object_is_refused():
    with pytest.raises(RaybmError, match="a run's metrics.json is not a JSON object; the file is damaged"):
        RunRecord.from_json([1, 2])


def test_a_leaderboard_row_keeps_its_searched_values_and_score_under_their_own_keys():
    row = LeaderboardRow(
        trial="t1", rank=1, metric="val_f1_macro", status="completed", extra={"train.lr": 3e-4, "val_f1_macro": 0.9}
    )
    written = json.loads(json.dumps(row.to_json()))
    assert list(written)[:5] == ["version", "rank", "trial", "train.lr", "val_f1_macro"]  # a table's reading order
    back = LeaderboardRow.from_json(written)
    assert back == row and back.score() == 0.9 and back.searched() == {"train.lr": 3e-4}
    assert back.get("status") == "completed" and back.get("train.lr") == 3e-4 and back.get("missing") is None
    assert back.searched(["train.lr", "train.seed"]) == {"train.lr": 3e-4}


def test_a_leaderboard_row_written_before_rows_named_their_metric_is_ranked_by_its_val_key():
    old = {"rank": 1, "trial": "t1", "train.lr": 1e-3, "val_f1_macro": 0.7, "val_accuracy": 0.8, "status": "completed"}
    row = LeaderboardRow.from_json(old)
    assert row.ranked_by() == "val_f1_macro" and row.score() == 0.7 and row.val_accuracy == 0.8
    assert LeaderboardRow.from_json({"trial": "t2", "val_accuracy": 0.6}).score() == 0.6  # the metric is a field


def test_a_pipeline_summary_names_the_model_its_sweep_or_run_handed_on():
    stages = {"data": {"status": "done"}, "train": {"model": "s3://b/runs/r/model"}}
    assert PipelineSummary(stages=stages).trained_model() == "s3://b/runs/r/model"
    assert (
        PipelineSummary(stages={**stages, "tune": {"model": "/r/sweeps/s/model"}}).trained_model()
        == "/r/sweeps/s/model"
    )
    assert PipelineSummary(stages={"data": {"status": "done"}}).trained_model() is None
