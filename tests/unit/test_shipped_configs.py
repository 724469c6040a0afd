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
