"""Model soups: the greedy and uniform recipes on tiny model folders (no Ray)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from raybm.config import build_config
from raybm.errors import ConfigError, RaybmError
from raybm.inference.loading import load_model_folder
from raybm.metrics import soup_metric
from raybm.storage.layout import SOUP_FILE
from raybm.storage.records import soup_used
from raybm.tune.soup import average_models, make_soup

LABELS = ["negative", "positive"]


def model_folder(path, seed, **model_overrides):
    from raybm.models.build import build_classifier, load_tokenizer

    cfg = build_config(overrides=["model.name=tiny-bert", *[f"model.{k}={v}" for k, v in model_overrides.items()]])
    build_classifier(cfg.model, LABELS, seed=seed).save_pretrained(path, safe_serialization=True)
    load_tokenizer("tiny-bert").save_pretrained(path)
    (path / "label_map.json").write_text(json.dumps({"labels": LABELS}))
    (path / "train_state.pt").write_bytes(b"optimizer state of a checkpoint")
    (path / "epoch_metrics.json").write_text("{}")
    return str(path)


def weights(folder):
    return load_file(f"{folder}/model.safetensors")


def mean_of(*folders):
    states = [weights(f) for f in folders]
    return {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    return [model_folder(root / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))]


def distance_scorer(target):
    """A validation score that is higher the nearer a model's weights are to ``target``."""
    calls = []

    def score(folder):
        calls.append(folder)
        state = weights(folder)
        dist = sum(float((state[k].float() - target[k]).pow(2).sum()) for k in target)
        return {"accuracy": -dist}

    score.calls = calls
    return score


def test_greedy_keeps_what_helps_on_validation_and_leaves_out_the_rest(folders, tmp_path):
    a, b, c = folders
    score = distance_scorer(mean_of(a, b))  # the soup of a and b is the best possible model
    soup = make_soup([("a", a), ("b", b), ("c", c)], score, metric="accuracy", workdir=str(tmp_path), log=print)
    assert soup.ingredients == ["a", "b"]
    assert soup.validation == pytest.approx(0.0, abs=1e-6) and soup.best_single < soup.validation
    assert [(t["model"], t["kept"]) for t in soup.tried] == [("b", True), ("c", False)]
    assert len(score.calls) == 3  # a alone, a+b, a+b+c
    got, want = weights(soup.folder), mean_of(a, b)
    assert all(torch.allclose(got[k].float(), want[k], atol=1e-6) for k in want)
    # A loadable model folder without the training checkpoint's own files.
    model, _, labels = load_model_folder(soup.folder)
    assert labels == LABELS and model.num_labels == 2
    files = set(p.name for p in (tmp_path / "soup").iterdir())
    assert {"model.safetensors", "config.json", "label_map.json", SOUP_FILE} <= files
    assert not {"train_state.pt", "epoch_metrics.json"} & files
    info = json.loads((tmp_path / "soup" / SOUP_FILE).read_text())
    assert info["ingredients"] == ["a", "b"] and info["method"] == "greedy"


def test_greedy_hands_on_the_best_model_alone_when_nothing_helps(folders, tmp_path):
    a, b, c = folders
    score = distance_scorer(weights(a) | {})  # a itself is the target: every mix is worse
    soup = make_soup([("a", a), ("b", b), ("c", c)], score, metric="accuracy", workdir=str(tmp_path), log=print)
    assert soup.ingredients == ["a"] and soup.validation == soup.best_single == 0.0
    assert all(torch.equal(weights(soup.folder)[k], weights(a)[k]) for k in weights(a))


def test_min_mode_keeps_a_candidate_that_lowers_the_metric(folders, tmp_path):
    a, b, _ = folders
    target = mean_of(a, b)

    def loss(folder):
        state = weights(folder)
        return {"accuracy": sum(float((state[k].float() - target[k]).pow(2).sum()) for k in target)}

    soup = make_soup([("a", a), ("b", b)], loss, metric="accuracy", mode="min", workdir=str(tmp_path), log=print)
    assert soup.ingredients == ["a", "b"]


def test_uniform_averages_every_candidate(folders, tmp_path):
    score = distance_scorer(weights(folders[0]))
    soup = make_soup(
        list(zip("abc", folders)), score, metric="accuracy", method="uniform", workdir=str(tmp_path), log=print
    )
    assert soup.ingredients == ["a", "b", "c"] and soup.validation < soup.best_single  # reported, not hidden
    got, want = weights(soup.folder), mean_of(*folders)
    assert all(torch.allclose(got[k].float(), want[k], atol=1e-6) for k in want)
    average_models(folders, str(tmp_path / "plain"))
    assert all(torch.equal(weights(str(tmp_path / "plain"))[k], got[k]) for k in got)


def test_a_model_of_another_architecture_is_skipped_or_refused(folders, tmp_path):
    other = model_folder(tmp_path / "cropped", 4, keep_layers=1)
    lines = []
    soup = make_soup(
        [("a", folders[0]), ("cropped", other)],
        distance_scorer(weights(folders[0])),
        metric="accuracy",
        workdir=str(tmp_path / "w"),
        log=lines.append,
    )
    assert soup.ingredients == ["a"] and soup.tried == [
        {"model": "cropped", "kept": False, "reason": "weights do not match"}
    ]
    assert any("skipped" in line for line in lines)
    with pytest.raises(RaybmError, match="do not match"):
        average_models([folders[0], other], str(tmp_path / "bad"))


def test_soups_are_picked_by_a_classification_score():
    assert soup_metric("val_f1_macro") == "f1_macro" and soup_metric("accuracy") == "accuracy"
    with pytest.raises(ConfigError, match="val_loss"):
        soup_metric("val_loss")
    with pytest.raises(ConfigError, match="tune.soup=greedy"):
        build_config(overrides=["tune.soup=greedy", "tune.metric=val_loss", "tune.mode=min"])
    assert build_config(overrides=["tune.soup=uniform"]).tune.soup_size == 4


def test_a_soup_record_says_whether_it_is_the_model_handed_on():
    assert soup_used({"method": "greedy", "ingredients": ["t1", "t2"]})
    assert soup_used({"method": "uniform", "ingredients": ["t1"]})
    assert not soup_used({"method": "greedy", "ingredients": ["t1"]})  # tried, nothing added
    assert not soup_used(None)
