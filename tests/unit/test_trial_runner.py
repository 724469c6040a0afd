"""Where a sweep's trials train: in their own process where they can, else in a Ray Train
worker group (raybm.tune.trial.trial_runner). No Ray needed: a local, not a cluster."""

import pytest

from raybm.config import build_config
from raybm.config.search_space import parse_space
from raybm.errors import RaybmError
from raybm.tune.trial import IN_TRIAL, RAY_TRAIN, trial_runner


def decide(*overrides, tokenizes=False, whole=True, runner="auto"):
    cfg = build_config(
        overrides=["tune.search_space={train.lr: 'grid([1e-3, 1e-4])'}", f"tune.trial_runner={runner}", *overrides]
    )
    return trial_runner(cfg, parse_space(cfg.tune.search_space), tokenizes, whole)


def test_a_trial_of_one_worker_reading_whole_splits_trains_in_its_own_process():
    assert decide() == IN_TRIAL
    assert decide("train.cpus_per_worker=2", "train.torch_threads=2") == IN_TRIAL


@pytest.mark.parametrize(
    "overrides, tokenizes, whole, reason",
    [
        (["train.num_workers=2"], False, True, "train.num_workers=2"),
        (["train.parallelism=fsdp"], False, True, "train.parallelism=fsdp"),
        ([], True, False, "each trial tokenizes its data"),
        ([], False, False, "the splits stream through Ray Data"),
        (
            ["tune.search_space={train.cpus_per_worker: 'grid([1, 2])'}"],
            False,
            True,
            "the search changes train.cpus_per_worker",
        ),
    ],
)
def test_trials_that_need_a_worker_group_get_one_and_in_trial_says_why(overrides, tokenizes, whole, reason):
    assert decide(*overrides, tokenizes=tokenizes, whole=whole) == RAY_TRAIN
    with pytest.raises(RaybmError, match=f"tune.trial_runner=in_trial cannot .*{reason}"):
        decide(*overrides, tokenizes=tokenizes, whole=whole, runner="in_trial")


def test_ray_train_is_taken_as_asked():
    assert decide(runner="ray_train") == RAY_TRAIN
