"""Ray's private pieces are used on the Ray version they were written for only; anywhere
else raybm takes Ray Train's public path and says so once."""

import pytest
import ray
from ray.train.torch import TorchConfig, TorchTrainer

from raybm import ray_patches


@pytest.fixture
def patches(monkeypatch):
    monkeypatch.delenv(ray_patches.SWITCH_ENV, raising=False)
    ray_patches.reset()
    yield monkeypatch
    ray_patches.reset()


def test_on_the_pinned_ray_the_shortcuts_apply(patches, capsys):
    assert ray.__version__.startswith(ray_patches.WRITTEN_FOR_RAY) and ray_patches.applies()
    trainer = ray_patches.trainer_class(ray_data=False, autoscaling=False, placement_group_cleaner=False)
    assert trainer is not TorchTrainer and issubclass(trainer, TorchTrainer)
    assert isinstance(ray_patches.process_group_config("gloo"), ray_patches.TorchProcessGroupConfig)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["switched off", "another Ray"])
def test_elsewhere_the_public_path_is_taken_and_said_once(patches, capsys, how):
    if how == "switched off":
        patches.setenv(ray_patches.SWITCH_ENV, "0")
    else:
        patches.setattr(ray, "__version__", "2.61.0")
    for _ in range(3):
        assert (
            ray_patches.trainer_class(ray_data=False, autoscaling=False, placement_group_cleaner=False) is TorchTrainer
        )
        assert type(ray_patches.process_group_config("gloo")) is TorchConfig
    err = capsys.readouterr().err
    assert err.count("public TorchTrainer path") == 1
    assert ("RAYBM_RAY_PATCHES=0" if how == "switched off" else "this is Ray 2.61.0") in err


def test_train_settings_go_to_the_environment_only_here(patches):
    for name in (ray_patches.PLACEMENT_TIMEOUT_ENV, ray_patches.POLL_INTERVAL_ENV, ray_patches.PREEMPTION_WATCHER_ENV):
        patches.delenv(name, raising=False)
    patches.setenv(ray_patches.POLL_INTERVAL_ENV, "3")  # the user's own setting wins
    ray_patches.set_train_env(45, cluster=False)
    import os

    assert os.environ[ray_patches.PLACEMENT_TIMEOUT_ENV] == "45"
    assert os.environ[ray_patches.POLL_INTERVAL_ENV] == "3"
    assert os.environ[ray_patches.PREEMPTION_WATCHER_ENV] == "0"
    patches.delenv(ray_patches.PREEMPTION_WATCHER_ENV)
    patches.setenv(ray_patches.SWITCH_ENV, "0")
    ray_patches.reset()
    ray_patches.set_train_env(30, cluster=False)  # public path: only Ray's documented timeout
    assert os.environ[ray_patches.PLACEMENT_TIMEOUT_ENV] == "30"
    assert ray_patches.PREEMPTION_WATCHER_ENV not in os.environ


def test_no_other_module_reaches_into_ray_s_private_code_or_sets_its_environment():
    import pathlib
    import re

    root = pathlib.Path(ray_patches.__file__).parent
    private = re.compile(r"\bray(\.\w+)*\._(private|internal)\b|from ray\.\S+ import _|\bRAY_TRAIN_\w+|\bTUNE_\w+_S\b")
    found = [
        f"{p.relative_to(root.parent)}:{n}: {line.strip()}"
        for p in root.rglob("*.py")
        if p.name != "ray_patches.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, "\n".join(found)
