"""Search spaces written in the job YAML, next to the config they search.

``tune.search_space`` maps a dotted config key (the same keys as command-line overrides)
to a distribution written as a call::

    tune:
      search_space:
        train.lr: loguniform(1e-5, 1e-3)
        train.weight_decay: uniform(0, 0.1)
        train.batch_size: choice([16, 32])
        train.optimizer: grid([adamw, momentum])

Distributions: ``uniform(lo, hi)``, ``loguniform(lo, hi)``, ``quniform(lo, hi, q)``,
``randint(lo, hi)`` (hi excluded), ``lograndint(lo, hi)``, ``choice([...])`` (sampled) and
``grid([...])`` (every value, times ``tune.num_samples``). Arguments are literals; bare
words in a list are strings. Nothing here imports Ray: the space is parsed and checked
against the config when the config loads, before any trial starts.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from raybm.errors import ConfigError

CONTINUOUS = {"uniform": 2, "loguniform": 2, "quniform": 3}
INTEGER = {"randint": 2, "lograndint": 2}
LISTS = ("choice", "grid")
KINDS = (*CONTINUOUS, *INTEGER, *LISTS)
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Distribution:
    """One searched key: its kind (``loguniform``, ``choice`` ...) and arguments, as written in the YAML."""

    key: str  # dotted config key
    kind: str
    args: tuple

    def extremes(self) -> list[Any]:
        """The values that must be valid for every sample to be valid."""
        if self.kind in LISTS:
            return list(self.args[0])
        if self.kind in INTEGER:
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self) -> Any:
        """The Ray Tune domain for this distribution."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args[0]))
        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)

    def __str__(self) -> str:
        if self.kind in LISTS:
            return f"{self.kind}({list(self.args[0])})"
        return f"{self.kind}({', '.join(f'{a:g}' for a in self.args)})"


def _literal(text: str, key: str, raw: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:  # bare words: [adamw, sgd]
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"tune.search_space.{key}: cannot read the arguments of {raw!r}") from None


def parse_distribution(key: str, raw: Any) -> Distribution:
    """Parse one ``kind(args)`` string; a malformed one is a ``ConfigError``."""
    usage = "write e.g. loguniform(1e-5, 1e-3), uniform(0, 0.1), randint(1, 4), choice([16, 32]) or grid([adamw, sgd])"
    if not isinstance(raw, str):
        raise ConfigError(f"tune.search_space.{key}: expected a distribution, got {raw!r}; {usage}")
    m = _CALL.match(raw)
    if not m or m.group(1) not in KINDS:
        name = m.group(1) if m else raw
        raise ConfigError(f"tune.search_space.{key}: {name!r} is not a distribution ({', '.join(KINDS)}); {usage}")
    kind, inner = m.group(1), m.group(2).strip()
    if kind in LISTS:
        values = _literal(inner, key, raw)
        if isinstance(values, tuple):
            values = list(values)
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"tune.search_space.{key}: {kind} takes one non-empty list, e.g. {kind}([16, 32]); got {raw!r}"
            )
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"tune.search_space.{key}: {raw!r} lists a value twice")
        return Distribution(key, kind, (tuple(values),))
    args = _literal(f"({inner},)" if inner else "()", key, raw)
    want = CONTINUOUS.get(kind) or INTEGER[kind]
    if (
        not isinstance(args, tuple)
        or len(args) != want
        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    ):
        raise ConfigError(f"tune.search_space.{key}: {kind} takes {want} numbers; got {raw!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"tune.search_space.{key}: the lower bound must be below the upper one in {raw!r}")
    if kind.startswith("log") and lo <= 0:
        raise ConfigError(f"tune.search_space.{key}: {kind} needs bounds above 0; got {raw!r}")
    if kind in INTEGER and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"tune.search_space.{key}: {kind} takes whole numbers; got {raw!r}")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"tune.search_space.{key}: the step of quniform must be > 0; got {raw!r}")
    return Distribution(key, kind, tuple(args))


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-4}`` -> ``{"train": {"lr": 1e-4}}``."""
    out: dict[str, Any] = {}
    for dotted, value in values.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def parse_space(
    space: dict[str, Any], check: Callable[[str, Any, Distribution], None] | None = None
) -> list[Distribution]:
    """Parse every entry of ``tune.search_space``.

    ``check(dotted_key, value)`` validates one value against the config (raising
    ``ConfigError``); it is called with each distribution's extreme values, so a typo in a
    key or a value the config refuses fails here, before any trial starts.
    """
    dists = []
    for key, raw in space.items():
        if key.startswith("tune.") or key in ("name", "storage", "ray") or key.split(".")[0] in ("storage", "ray"):
            raise ConfigError(
                f"tune.search_space.{key}: only job settings (data, model, train, ...) "
                f"can be searched, not where or how the sweep runs"
            )
        dist = parse_distribution(key, raw)
        if check is not None:
            for value in dist.extremes():
                check(key, value, dist)
        dists.append(dist)
    return dists


def grid_size(dists: list[Distribution]) -> int:
    """How many trials one pass over the grid values makes (1 without grid entries)."""
    n = 1
    for d in dists:
        if d.kind == "grid":
            n *= len(d.args[0])
    return n
