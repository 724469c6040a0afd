"""Property-based tests (Hypothesis): inputs no one here wrote by hand.

- any dotted override loads or raises raybm's ConfigError, never another exception;
- text cleaning never raises on any Unicode string, whatever steps are on;
- the server's request checks never raise on any JSON value, and answer a 4xx status
  whenever they refuse.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raybm.config import CleanConfig, ServeConfig, build_config, describe
from raybm.errors import ConfigError

ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates too: JSON escapes can carry them
KEYS = [key for key, _, _ in describe()]
# RAYBM_HYPOTHESIS_EXAMPLES=5000 for a longer search than the suite's.
SETTINGS = settings(
    max_examples=int(os.environ.get("RAYBM_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Values as a user types them on a command line: YAML scalars, lists and mappings, numbers
# at the edges, and arbitrary text.
VALUE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "nan",
            ".nan",
            "inf",
            "-inf",
            ".inf",
            "1e309",
            "-1",
            "0",
            "1",
            "true",
            "null",
            "~",
            "[]",
            "{}",
            "[nan, 0.5, 0.5]",
            "[0.8, 0.1, 0.1]",
            "[a, b]",
            "{a: 1}",
            "{a: [1, {b: 2}]}",
            "'",
            '"',
            ":",
            "..",
            "../x",
            "a/b",
            "-",
            "1" * 5000,
            "x" * 300,
            "\x00",
            "\ud800",
            "é",
            "*",
            "&a",
            "!!python/int 1",
        ]
    ),
    st.integers().map(str),
    st.floats().map(repr),
)


@SETTINGS
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=30)), value=VALUE_TEXT)
def test_any_override_loads_or_raises_a_config_error(key, value):
    try:
        cfg = build_config(overrides=[f"{key}={value}"])
    except ConfigError as e:
        assert str(e)  # says what is wrong
        return
    _check_floats_are_finite(cfg.to_dict(), "")


@SETTINGS
@given(items=st.lists(st.text(max_size=60), max_size=4))
def test_any_override_list_loads_or_raises_a_config_error(items):
    try:
        build_config(overrides=items)
    except ConfigError:
        pass


def _check_floats_are_finite(node, where: str) -> None:
    if isinstance(node, float):
        assert math.isfinite(node), f"{where} accepted {node}"
    elif isinstance(node, dict):
        for k, v in node.items():
            _check_floats_are_finite(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_floats_are_finite(v, f"{where}[{i}]")


@pytest.mark.parametrize(
    "override",
    [
        "data.split=[nan,0.5,0.5]",
        "serve.batch_wait_timeout_s=inf",
        "train.lr=nan",
        "train.weight_decay=.inf",
        "tune.time_budget_s=inf",
        "train.worker_resources={accelerator: nan}",
    ],
)
def test_nan_and_infinity_are_refused_for_every_float_key(override):
    with pytest.raises(ConfigError, match="finite"):
        build_config(overrides=[override])


ALL_CLEANING = CleanConfig(
    fix_mojibake=True,
    html=True,
    urls=True,
    mentions=True,
    special_chars=True,
    lowercase=True,
    stop_words=True,
    whitespace=True,
)


@SETTINGS
@given(text=st.text(alphabet=ANY_CHAR, max_size=200), twitter=st.booleans())
def test_cleaning_never_raises_on_any_unicode_string(text, twitter):
    from raybm.data.cleaning import clean_text

    for cfg in (ALL_CLEANING, CleanConfig()):
        out = clean_text(text, cfg, twitter_repair=twitter, stop_words=frozenset({"the"}))
        assert isinstance(out, str)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
# Bodies that look like requests, so the checks get past the first field tests.
REQUEST_LIKE = st.one_of(
    JSON,
    st.fixed_dictionaries({"texts": JSON}),
    st.fixed_dictionaries({"text": JSON}),
    st.fixed_dictionaries({"texts": st.lists(st.one_of(st.text(max_size=30), JSON), max_size=8)}),
    st.fixed_dictionaries({"text": st.text(alphabet=ANY_CHAR, max_size=30)}),
)
SMALL_LIMITS = ServeConfig(max_texts=4, max_text_chars=20)


@SETTINGS
@given(payload=REQUEST_LIKE)
@example(payload={"text": "fine \ud800"})
@example(payload={"texts": ["fine", "\udfff"]})
@example(payload={"texts": [1e308, None]})
def test_request_checks_never_raise_on_any_json_value(payload):
    from raybm.serve.contract import check_texts

    texts, status, message = check_texts(payload, SMALL_LIMITS)
    if texts is None:
        assert 400 <= status < 500 and message
    else:
        assert status == 0 and texts and len(texts) <= SMALL_LIMITS.max_texts
        for t in texts:
            assert isinstance(t, str) and t.strip() and len(t) <= SMALL_LIMITS.max_text_chars
            t.encode("utf-8")  # valid Unicode: it can reach the tokenizer
        json.dumps(texts)
