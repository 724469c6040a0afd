"""Serving cost in sweeps: architecture fingerprints and the latency budget's choice."""

import pytest

from raybm.config import build_config
from raybm.errors import ConfigError
from raybm.models.build import build_classifier, load_tokenizer
from raybm.storage.records import LeaderboardRow
from raybm.tune.cost import architecture, within_budget


def test_architecture_tells_cropped_models_apart_and_counts_parameters(tmp_path, tiny_model_dir):
    cropped = tmp_path / "cropped"
    cfg = build_config(overrides=["model.name=tiny-bert", "model.keep_layers=1"])
    model = build_classifier(cfg.model, ["negative", "positive"], seed=3)
    model.save_pretrained(cropped, safe_serialization=True)
    load_tokenizer("tiny-bert").save_pretrained(cropped)
    full_key, full_params = architecture(tiny_model_dir)
    crop_key, crop_params = architecture(str(cropped))
    assert crop_key != full_key and crop_params == sum(p.numel() for p in model.parameters())
    assert 0 < crop_params < full_params
    retrained = tmp_path / "retrained"  # other weights, same shapes: same architecture
    build_classifier(
        build_config(overrides=["model.name=tiny-bert"]).model, ["negative", "positive"], seed=9
    ).save_pretrained(retrained, safe_serialization=True)
    assert architecture(str(retrained)) == (full_key, full_params)


def rows(*latencies):
    return [LeaderboardRow(trial=f"t{i}", latency_p50_ms=ms) for i, ms in enumerate(latencies)]  # best first


def test_the_budget_keeps_the_best_trials_within_it_in_order():
    ranked, budget = within_budget(rows(9.0, 4.0, 12.0, 3.0), 5.0)
    assert [r.trial for r in ranked] == ["t1", "t3"]
    assert budget == {"max_latency_ms": 5.0, "met": True, "trials_within": 2, "fastest_ms": 3.0}


def test_when_no_trial_meets_the_budget_the_best_wins_and_it_says_so():
    board = rows(9.0, 7.0)
    ranked, budget = within_budget(board, 1.0)
    assert ranked == board and budget["met"] is False and budget["fastest_ms"] == 7.0
    assert [r.within_budget for r in board] == [False, False]


def test_without_a_budget_nothing_changes():
    board = rows(9.0, 7.0)
    assert within_budget(board, None) == (board, None) and board[0].within_budget is None


def test_a_budget_needs_the_measurement():
    with pytest.raises(ConfigError, match="needs tune.measure_cost"):
        build_config(overrides=["tune.max_latency_ms=20", "tune.measure_cost=false"])
