"""Every config key with its default and documentation, for ``raybm config --describe`` and docs/config.md."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing

from raybm.config.stages import JobConfig


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every config key as (dotted key, default, doc), for help output and docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = getattr(default_obj, f.name)
        rows.append((key, json.dumps(default, ensure_ascii=False), docs.get(f.name, "")))
    return rows
