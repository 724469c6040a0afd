import pandas as pd
import pytest

from raybm.config import CleanConfig
from raybm.data import cleaning
from raybm.data.cleaning import LabelMapper, clean_batch, clean_text, normalize_raw_label, repair_twitter_mojibake

ALL_OFF = CleanConfig(
    html=False,
    urls=False,
    mentions=False,
    special_chars=False,
    whitespace=False,
    fix_mojibake=False,
    lowercase=False,
    stop_words=False,
)


def only(**on):
    return CleanConfig(**{**ALL_OFF.__dict__, **on})


@pytest.mark.parametrize(
    "step, raw, expected",
    [
        ("html", "<b>great</b> &amp; cheap", " great  & cheap"),
        ("urls", "see https://x.co/a?b=1 and www.example.com now", "see   and   now"),
        ("mentions", "@united thanks @bob_1: ok", "  thanks   ok"),
        ("special_chars", "so good ★★★ #win 😀!", "so good      win  !"),
        ("whitespace", "  a \t b\n\nc  ", "a b c"),
        ("lowercase", "GREAT Film", "great film"),
    ],
)
def test_each_step_alone(step, raw, expected):
    assert clean_text(raw, only(**{step: True})) == expected
    # and switched off, the step leaves the text alone
    assert clean_text(raw, ALL_OFF) == raw


def test_stop_words_keep_content_words():
    out = clean_text("this is the best movie of the year", only(stop_words=True))
    assert out == "best movie year"


def test_special_chars_keep_other_scripts():
    assert clean_text("质量很好！", only(special_chars=True)) == "质量很好 "


def test_mojibake_repair():
    # ftfy: UTF-8 read as Windows-1252
    assert clean_text("cafÃ© is great", only(fix_mojibake=True)) == "café is great"
    # the twitter corpus's own broken sequences
    raw = "I donÕ¢_\x8aÎ_\x86¢t want it Õ¢_\x8aÎ\x81Ð@user: hi Õ¢_\x8aÎë\x9d"
    assert repair_twitter_mojibake(raw) == 'I don\'t want it "@user: hi "'
    assert clean_text("Itäó»s a sad day", only(fix_mojibake=True), twitter_repair=True) == "It's a sad day"
    # emoji remnants go; a lone accented letter stays
    assert repair_twitter_mojibake("nice _ôÖ\x89_ôÖ\x89 café") == "nice   café"


def test_label_mapper():
    m = LabelMapper(["negative", "positive"], {"1": "negative", "5": "positive"}, exclude=["3"])
    assert m.map("1") == (0, "")
    assert m.map("positive") == (1, "")
    assert m.map("3") == (-1, cleaning.EXCLUDED_LABEL)
    assert m.map("7") == (-1, cleaning.UNKNOWN_LABEL)
    assert m.to_json()["id_to_label"] == {"0": "negative", "1": "positive"}


@pytest.mark.parametrize(
    "raw, expected",
    [
        (4, "4"),
        (4.0, "4"),
        ("4", "4"),
        (" pos ", "pos"),
        (None, None),
        (float("nan"), None),
        (pd.NA, None),
        ("", None),
        (2.5, "2.5"),
    ],
)
def test_normalize_raw_label(raw, expected):
    assert normalize_raw_label(raw) == expected


def test_clean_batch_marks_every_drop_reason():
    batch = pd.DataFrame(
        {
            "text": ["good", pd.NA, "fine", "meh", "<br>", "bad", "ok"],
            "label_raw": ["pos", "pos", None, "neutral", "neg", "weird", "neg"],
        }
    )
    m = LabelMapper(["neg", "pos"], exclude=["neutral"])
    out = clean_batch(batch, CleanConfig(), m)
    assert len(out) == len(batch)  # nothing disappears here
    assert out["drop_reason"].tolist() == [
        "",
        cleaning.MISSING_TEXT,
        cleaning.MISSING_LABEL,
        cleaning.EXCLUDED_LABEL,
        cleaning.EMPTY_AFTER_CLEANING,
        cleaning.UNKNOWN_LABEL,
        "",
    ]
    assert out["label"].tolist() == [1, -1, -1, -1, 0, -1, 0]
