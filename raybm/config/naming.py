"""Names of what a job writes: checked folder names, and run and sweep names derived from the config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from raybm.errors import ConfigError

if TYPE_CHECKING:
    from raybm.config.stages import JobConfig


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def check_name(name: str, what: str) -> str:
    """``name`` if it is safe as one folder name under the results root (letters, digits,
    ``.``, ``_`` and ``-``, not starting with ``.``, at most 200 characters), else a
    ConfigError naming ``what`` (the key or flag it came from)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what}={name!r}: a name may hold only letters, digits, '.', '_' and '-', may not "
            f"start with '.', and has at most 200 characters (it names a folder in the results)"
        )
    return name


def safe_name(text: str) -> str:
    """A name derived from free text (a file or model name) made safe for ``check_name``:
    every other character becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:200] or "_"


def config_hash(section: Any) -> str:
    """Short stable hash of a config section (names prepared datasets and runs)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def derived_name(cfg: JobConfig, dataset: str, sections: tuple[str, ...], kind: str = "") -> str:
    """``cfg.name``, or a name made of the dataset, the model and a hash of the given config
    sections (rerunning the same config reuses, and resumes, the same run)."""
    if cfg.name:
        return cfg.name
    blob = json.dumps({s: dataclasses.asdict(getattr(cfg, s)) for s in sections}, sort_keys=True, ensure_ascii=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return safe_name(f"{dataset}-{cfg.model.name.replace('/', '_')}-{kind + '-' if kind else ''}{digest}")


def run_name_for(cfg: JobConfig, dataset: str) -> str:
    """The name of the training run this config makes on ``dataset``."""
    return derived_name(cfg, dataset, ("model", "train"))


def sweep_name_for(cfg: JobConfig, dataset: str) -> str:
    """The name of the sweep this config makes on ``dataset``."""
    return derived_name(cfg, dataset, ("model", "train", "tune"), "sweep")
