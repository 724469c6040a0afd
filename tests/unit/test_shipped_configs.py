"""Every shipped config loads, and opens with the exact command that runs it."""

from pathlib import Path

import pytest

from raybm.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and f"--config jobs/configs/{path.name}" in first, first
    assert cfg.data.source


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_opens_with_its_ray_job_submit_line(path):
    import json
    import re
    import shlex

    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ray job submit "), first
    words = shlex.split(first[2:].split(" -- ", 1)[0])
    env = json.loads(words[words.index("--runtime-env-json") + 1])
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    entry = first.split(" -- ", 1)[1]
    m = re.match(r"python (jobs/\w+\.py) --config (jobs/configs/[\w.-]+\.yaml)", entry)
    assert m, entry
    root = Path(__file__).resolve().parents[2]
    assert (root / m.group(1)).is_file()
    assert m.group(2) == f"jobs/configs/{path.name}"
