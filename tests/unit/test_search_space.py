"""Search spaces: parsing, checking against the config before any trial, leaderboard table."""

import pytest

from raybm.config import build_config
from raybm.config.search_space import grid_size, nested, parse_distribution, parse_space
from raybm.errors import ConfigError
from raybm.storage.records import LeaderboardRow
from raybm.tune.leaderboard import _status, format_leaderboard
from raybm.tune.trial import trial_config


def space(**entries):
    return build_config({"tune": {"search_space": {k.replace("__", "."): v for k, v in entries.items()}}})


def test_distributions_parse_to_ray_tune_domains():
    from ray import tune

    lr = parse_distribution("train.lr", "loguniform(1e-5, 1e-3)")
    assert (lr.kind, lr.args) == ("loguniform", (1e-5, 1e-3))
    assert isinstance(lr.to_tune(), tune.search.sample.Float)
    opt = parse_distribution("train.optimizer", "grid([adamw, momentum])")
    assert opt.args == (("adamw", "momentum"),) and opt.to_tune() == {"grid_search": ["adamw", "momentum"]}
    bs = parse_distribution("train.batch_size", "choice([16, 32])")
    assert bs.extremes() == [16, 32]
    assert parse_distribution("train.freeze_layers", "randint(0, 4)").extremes() == [0, 3]
    assert parse_distribution("train.l1", "quniform(0, 1e-4, 1e-5)").args == (0, 1e-4, 1e-5)
    assert grid_size([opt, bs, parse_distribution("x.y", "grid([1, 2, 3])")]) == 6


def test_a_valid_space_loads():
    cfg = space(
        train__lr="loguniform(1e-5, 1e-3)",
        train__weight_decay="uniform(0, 0.1)",
        train__optimizer="grid([adamw, momentum])",
        train__batch_size="choice([16, 32])",
        train__strategy="choice([full, gradual])",
        model__classifier_dropout="uniform(0.0, 0.3)",
    )
    assert len(parse_space(cfg.tune.search_space)) == 6


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.lrr", "loguniform(1e-5, 1e-3)", "train.lrr: unknown key. Did you mean 'train.lr'"),
        ("trian.lr", "loguniform(1e-5, 1e-3)", "trian: unknown key. Did you mean 'train'"),
        ("train.lr", "logunifrm(1e-5, 1e-3)", "'logunifrm' is not a distribution"),
        ("train.lr", "loguniform(1e-5)", "loguniform takes 2 numbers"),
        ("train.lr", "loguniform(0, 1e-3)", "needs bounds above 0"),
        ("train.lr", "uniform(1e-3, 1e-5)", "lower bound must be below"),
        ("train.lr", "uniform(1e-5, 2)", "allows 2, which the config refuses: train.lr: must be > 0"),
        ("train.lr", 0.001, "is not a distribution"),
        ("train.batch_size", "uniform(8, 64)", "takes whole numbers; use randint"),
        ("train.freeze_layers", "randint(0.5, 3)", "takes whole numbers"),
        ("train.optimizer", "choice([adamw, adamx])", "'adamx' is not valid"),
        ("train.optimizer", "choice([])", "one non-empty list"),
        ("train.optimizer", "grid([adamw, adamw])", "lists a value twice"),
        ("train.optimizer", "choice(adamw", "is not a distribution"),
        ("train", "choice([1])", "is a section"),
        ("storage.root", "choice([a, b])", "only job settings"),
        ("tune.num_samples", "choice([1, 2])", "only job settings"),
    ],
)
def test_bad_spaces_fail_at_load_with_the_key_named(key, value, message):
    with pytest.raises(ConfigError, match="tune.search_space") as err:
        build_config({"tune": {"search_space": {key: value}}})
    assert message in str(err.value)


def test_space_values_that_break_a_cross_field_rule_fail_at_load():
    with pytest.raises(ConfigError, match="freeze_layers"):
        build_config(
            {
                "model": {"keep_layers": 2},
                "train": {"strategy": "partial"},
                "tune": {"search_space": {"train.freeze_layers": "randint(0, 5)"}},
            }
        )


def test_trial_config_applies_sampled_values():
    cfg = space(train__lr="loguniform(1e-5, 1e-3)", train__optimizer="grid([adamw, momentum])")
    trial = trial_config(cfg.to_dict(), {"train.lr": 2e-4, "train.optimizer": "momentum"})
    assert trial.train.lr == 2e-4 and trial.train.optimizer == "momentum"
    assert trial.tune.search_space == {}
    assert nested({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_trial_status():
    assert _status("boom", [], 3) == "error"
    assert _status(None, [{"epoch": 1}, {"epoch": 2, "early_stopped": True}], 5) == "early-stopped"
    assert _status(None, [{"epoch": 1}], 3) == "stopped"
    assert _status(None, [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}], 3) == "completed"


def test_leaderboard_table():
    board = [
        {
            "rank": 1,
            "trial": "a_00001",
            "train.lr": 3e-4,
            "val_f1_macro": 0.91234,
            "best_epoch": 3,
            "epochs_run": 3,
            "status": "completed",
            "seconds": 120.0,
            "best_checkpoint": "x",
            "history": [],
        },
        {
            "rank": 2,
            "trial": "a_00000",
            "train.lr": 1e-5,
            "val_f1_macro": None,
            "best_epoch": None,
            "epochs_run": 0,
            "status": "error",
            "seconds": 3.5,
            "best_checkpoint": None,
            "history": [],
        },
    ]
    lines = format_leaderboard([LeaderboardRow.from_json(row) for row in board], "val_f1_macro").splitlines()
    assert lines[0].split() == [
        "rank",
        "trial",
        "train.lr",
        "val_f1_macro",
        "best_epoch",
        "epochs_run",
        "status",
        "seconds",
    ]
    assert lines[2].split() == ["1", "a_00001", "0.0003", "0.9123", "3", "3", "completed", "120"]
    assert lines[3].split()[3] == "-" and "error" in lines[3]


def test_a_trial_ended_before_its_first_report_still_has_a_row(tmp_path):
    # The time budget can end a trial before it reports: Tune's Result then has no metrics
    # and no config, and the leaderboard reads the searched values from params.json.
    import json

    from ray.air.result import Result

    from raybm.storage.results import Results
    from raybm.tune.leaderboard import leaderboard

    cfg = build_config(
        {"storage": {"root": str(tmp_path)}, "tune": {"search_space": {"train.lr": "grid([1e-3, 1e-4])"}}}
    )
    dists = parse_space(cfg.tune.search_space)
    reported, silent, unknown = tmp_path / "t_00000", tmp_path / "t_00001", tmp_path / "t_00002"
    for folder in (reported, silent, unknown):
        folder.mkdir()
    (silent / "params.json").write_text(json.dumps({"train.lr": 1e-4}))
    grid = [
        Result(
            metrics={"trial_id": "t_00000", "config": {"train.lr": 1e-3}, "time_total_s": 4.0},
            checkpoint=None,
            error=None,
            path=str(reported),
        ),
        Result(metrics={}, checkpoint=None, error=None, path=str(silent)),
        Result(metrics={}, checkpoint=None, error=None, path=str(unknown)),
    ]
    board = leaderboard(grid, cfg, dists, Results.from_config(cfg.storage), str(tmp_path))
    rows = {row.trial: row for row in board}
    assert rows["t_00000"].get("train.lr") == 1e-3
    assert rows["t_00001"].get("train.lr") == 1e-4 and rows["t_00001"].status == "stopped"
    assert rows["t_00001"].epochs_run == 0 and rows["t_00001"].best_checkpoint is None
    assert rows["t_00002"].get("train.lr") is None


def test_a_trial_that_ran_its_own_searched_epochs_is_completed(tmp_path):
    # train.epochs in the search space: a 2-epoch trial that ran both is "completed", not
    # "stopped" against the base config's 3; a 4-epoch trial cut after 2 is "stopped".
    import json

    from ray.air.result import Result

    from raybm.storage.results import Results
    from raybm.tune.leaderboard import leaderboard

    cfg = build_config(
        {
            "storage": {"root": str(tmp_path)},
            "train": {"epochs": 3},
            "tune": {"search_space": {"train.epochs": "grid([2, 4])"}},
        }
    )
    two = json.dumps([{"epoch": 1, "val_f1_macro": 0.5}, {"epoch": 2, "val_f1_macro": 0.6}])
    grid = [
        Result(
            metrics={"trial_id": f"t_0000{i}", "config": {"train.epochs": epochs}, "history": two},
            checkpoint=None,
            error=None,
            path=str(tmp_path / f"t_0000{i}"),
        )
        for i, epochs in enumerate((2, 4))
    ]
    board = leaderboard(grid, cfg, parse_space(cfg.tune.search_space), Results.from_config(cfg.storage), str(tmp_path))
    assert {row.get("train.epochs"): row.status for row in board} == {2: "completed", 4: "stopped"}
