"""Loading a job config: a YAML file, plus dotted ``key=value`` overrides from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raybm.config.checks import check_job
from raybm.config.coerce import build_section, merge_raw
from raybm.config.stages import JobConfig
from raybm.errors import ConfigError


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=3e-5", "data.labels=[a,b]"]`` into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write overrides as dotted key=value, e.g. train.lr=3e-5")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: the key is empty or malformed")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except (yaml.YAMLError, ValueError):  # ValueError: an integer of more than 4,300 digits
            value = text
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set twice as a value and a section")
        node[parts[-1]] = value
    return nested


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Validate a raw mapping (plus overrides) into a ``JobConfig``."""
    merged = merge_raw(raw or {}, parse_overrides(overrides or []))
    cfg = build_section(JobConfig, merged, "")
    check_job(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML job config and apply dotted ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; shipped configs are in jobs/configs/")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of more than 4,300 digits
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a config file must be a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, overrides)
