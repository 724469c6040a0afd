import dataclasses

import pytest

from raybm.config import JobConfig, build_config, config_hash, describe, load_config, parse_overrides
from raybm.errors import ConfigError


def test_defaults_are_valid():
    cfg = build_config({})
    assert cfg.data.source == "twitter-sentiment"
    assert cfg.data.split == [0.8, 0.1, 0.1]
    assert cfg.model.trust_remote_code is False


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  max_length: 32\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["train.lr=3e-5", "data.labels=[neg, pos]", "data.clean.lowercase=true", "train.epochs=2"])
    assert cfg.data.max_length == 32
    assert cfg.train.lr == pytest.approx(3e-5)  # "3e-5" is a string to YAML; coerced to float
    assert cfg.data.labels == ["neg", "pos"]
    assert cfg.data.clean.lowercase is True
    assert cfg.train.epochs == 2


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"data\.max_lenght: unknown key\. Did you mean 'data\.max_length'"):
        build_config(overrides=["data.max_lenght=64"])
    with pytest.raises(ConfigError, match=r"trian: unknown key\. Did you mean 'train'"):
        build_config({"trian": {"lr": 0.1}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        build_config(overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        build_config({"train": {"epochs": 2.5}})
    with pytest.raises(ConfigError, match=r"data\.clean\.html: expected true or false"):
        build_config({"data": {"clean": {"html": "maybe"}}})
    with pytest.raises(ConfigError, match=r"data: expected a section"):
        build_config({"data": 3})


def test_out_of_range_names_the_range():
    with pytest.raises(ConfigError, match=r"train\.lr: must be > 0 and <= 1, got -0\.1"):
        build_config(overrides=["train.lr=-0.1"])
    with pytest.raises(ConfigError, match=r"data\.max_length: must be >= 8"):
        build_config(overrides=["data.max_length=2"])


def test_bad_choice_lists_valid_choices():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["train.optimizer=adamm"])
    msg = str(e.value)
    assert "train.optimizer" in msg and "adamw" in msg and "sgd" in msg and "Did you mean 'adam" in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="add up to 1"):
        build_config(overrides=["data.split=[0.8, 0.1, 0.2]"])
    with pytest.raises(ConfigError, match="three shares"):
        build_config(overrides=["data.split=[0.9, 0.1]"])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_config(overrides=["data.labels=[only]"])
    with pytest.raises(ConfigError, match="not in data.labels"):
        build_config({"data": {"labels": ["neg", "pos"], "label_values": {"1": "bad"}}})
    with pytest.raises(ConfigError, match="English text only"):
        build_config(overrides=["data.language=zh", "data.clean.stop_words=true"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="malformed"):
        parse_overrides(["train..lr=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)


def test_every_key_is_documented():
    rows = describe(JobConfig)
    keys = [k for k, _, _ in rows]
    assert "data.clean.stop_words" in keys and "train.lr" in keys and "storage.root" in keys
    undocumented = [k for k, _, doc in rows if not doc]
    assert undocumented == []


def test_config_round_trips_through_yaml(tmp_path):
    cfg = build_config(overrides=["data.labels=[a, b]", "train.lr=0.001"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert config_hash(again.data) == config_hash(cfg.data)
    assert config_hash(build_config(overrides=["data.seed=1"]).data) != config_hash(cfg.data)


def test_yes_and_no_choices_survive_yaml_booleans(tmp_path):
    assert build_config(overrides=["train.use_gpu=yes"]).train.use_gpu == "yes"
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  use_gpu: no\n")
    assert load_config(path, []).train.use_gpu == "no"


def test_pipeline_stages_are_checked():
    from raybm.config import pipeline_stages

    assert pipeline_stages(build_config({})) == ["data", "train", "export", "deploy"]
    swept = build_config(overrides=["tune.search_space={train.lr: 'grid([1e-4, 3e-4])'}"])
    assert pipeline_stages(swept) == ["data", "tune", "export", "deploy"]
    explicit = build_config(
        overrides=["pipeline.stages=[data, tune]", "tune.search_space={train.lr: 'grid([1e-4, 3e-4])'}"]
    )
    assert pipeline_stages(explicit) == ["data", "tune"]
    for stages, message in (
        ("[data, deploy, tune]", "in the order"),
        ("[data, train, tune]", "not both"),
        ("[data, tune]", "tune.search_space is empty"),
        ("[data, fit]", "unknown stage"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_config(overrides=[f"pipeline.stages={stages}"])


@pytest.mark.parametrize(
    "override",
    [
        "name=../x",
        "data.name=../x",
        "name=a/b",
        "name=.hidden",
        "name=a:b",
        "name=a b",
        "data.name=/abs",
        "name=" + "x" * 201,
        "name=..",
        "name=a\\b",
    ],
)
def test_names_that_would_leave_or_hide_in_the_results_folder_are_refused(override):
    with pytest.raises(ConfigError, match="a name may hold only letters"):
        build_config(overrides=[override])


def test_safe_names_load_and_derived_names_are_always_safe(tmp_path):
    from raybm.config import check_name, derived_name

    cfg = build_config(overrides=["name=run_1.v2-final", "data.name=tweets-2026"])
    assert cfg.name == "run_1.v2-final" and cfg.data.name == "tweets-2026"
    odd = build_config(overrides=["model.name=/models/my model (v2)"])
    assert check_name(derived_name(odd, "my data", ("train",), "sweep"), "derived")


def test_the_results_folder_refuses_unsafe_names_whoever_asks(tmp_path):
    from raybm.config import StorageConfig
    from raybm.storage.results import Results

    results = Results(str(tmp_path), StorageConfig(root=str(tmp_path)))
    for build in (results.run_dir, results.sweep_dir, results.dataset_dir, results.export_dir, results.pipeline_dir):
        with pytest.raises(ConfigError):
            build("../outside")
    assert results.run_dir("fine").startswith(str(tmp_path))
