"""Text cleaning and label mapping: plain functions on pandas batches, no Ray.

``clean_batch`` never drops a row itself: it marks each row with a ``drop_reason``
(empty string for rows kept), so the pipeline can count every dropped row by reason.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pandas as pd

from raybm.config import CleanConfig

# Reasons a row is dropped; the data report counts each.
MISSING_TEXT = "missing_text"
MISSING_LABEL = "missing_label"
EXCLUDED_LABEL = "excluded_label"
UNKNOWN_LABEL = "unknown_label"
EMPTY_AFTER_CLEANING = "empty_after_cleaning"
DUPLICATE = "duplicate"
SAMPLED_OUT = "over_max_rows"
DROP_REASONS = (
    MISSING_TEXT,
    MISSING_LABEL,
    EXCLUDED_LABEL,
    UNKNOWN_LABEL,
    EMPTY_AFTER_CLEANING,
    DUPLICATE,
    SAMPLED_OUT,
)

_HTML_TAG = re.compile(r"<[^>]{1,200}>")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_MENTION = re.compile(r"(?<![\w@])@\w+:?")
# Keep letters and digits of any script, whitespace and sentence punctuation.
_SPECIAL = re.compile(r"[^\w\s.,!?;:'\"()\-]|_")
_WHITESPACE = re.compile(r"\s+")
# All that ftfy.fix_text can change in an ASCII text: HTML entities, line breaks (\r) and
# control characters. Printable ASCII, tabs and newlines without "&" come back unchanged
# (checked on 150k tweets and random strings), so such texts skip it: ftfy was most of
# cleaning's time (14k texts/s a core).
_FTFY_NEEDED_IN_ASCII = re.compile(r"[^\t\n\x20-\x7e]|&")

# The twitter corpus was stored through a broken double conversion: curly quotes,
# apostrophes, dashes and ellipses became fixed byte runs (the bytes are lost, so no
# decoder can undo it). These are its most frequent runs, mapped to what they stood for
# (read from context); the remaining runs are emoji remnants and are removed.
_TWITTER_MOJIBAKE = {
    "Õ¢_\x8aÎ_\x86¢": "'",
    "Õ¢_\x8aÎ\x81Ð": '"',
    "Õ¢_\x8aÎë\x9d": '"',
    "Õ¢_\x8aÎë_": "...",
    "Õ¢_\x8aÎ_Ñ\x9d": " - ",
    "Õ¢_\x8aÎ_ÑÒ": " - ",
    "äó»": "'",
    "äóÖ": "'",
    "äóì": '"',
    "äó\x9d": '"',
    "äó_": "...",
    "äóñ": " - ",
    "\x8a\x97È": "'",
    "\x8a\x97\x85": '"',
    "\x8a\x97\x93": '"',
    "\x8a\x97\x9d": '"',
}
_TWITTER_MOJIBAKE_RE = re.compile("|".join(re.escape(k) for k in sorted(_TWITTER_MOJIBAKE, key=len, reverse=True)))
# Runs of Latin-1 garbage: two or more high characters (underscores may sit between),
# or any C1 control character. A lone accented letter ("café") is left alone.
_MOJIBAKE_RUN = re.compile(r"_?[\x80-\xff][_\x80-\xff]*[\x80-\xff]_?|[\x80-\x9f]")


def repair_twitter_mojibake(text: str) -> str:
    """A tweet of the twitter corpus with its double-encoded UTF-8 repaired."""
    text = _TWITTER_MOJIBAKE_RE.sub(lambda m: _TWITTER_MOJIBAKE[m.group(0)], text)
    return _MOJIBAKE_RUN.sub(" ", text)


def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def clean_text(
    text: str, cfg: CleanConfig, *, twitter_repair: bool = False, stop_words: frozenset[str] | None = None
) -> str:
    """Apply the enabled cleaning steps to one text, in a fixed order."""
    if cfg.fix_mojibake:
        import ftfy

        if twitter_repair:
            text = repair_twitter_mojibake(text)
        if not text.isascii() or _FTFY_NEEDED_IN_ASCII.search(text):
            text = ftfy.fix_text(text)
    if cfg.html:
        text = html.unescape(_HTML_TAG.sub(" ", text))
    if cfg.urls:
        text = _URL.sub(" ", text)
    if cfg.mentions:
        text = _MENTION.sub(" ", text)
    if cfg.special_chars:
        text = _SPECIAL.sub(" ", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.stop_words:
        words = stop_words if stop_words is not None else _stop_words()
        text = " ".join(w for w in text.split() if w.lower() not in words)
    if cfg.whitespace:
        text = _WHITESPACE.sub(" ", text).strip()
    return text


@dataclass
class LabelMapper:
    """Raw label values -> class ids, decided once for the whole dataset."""

    labels: list[str]
    label_values: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.label_to_id = {name: i for i, name in enumerate(self.labels)}
        self._exclude = set(self.exclude)

    def map(self, raw: str) -> tuple[int, str]:
        """(class id, drop reason) for one raw value; id is -1 when dropped."""
        if raw in self._exclude:
            return -1, EXCLUDED_LABEL
        name = self.label_values.get(raw, raw)
        if name in self._exclude:
            return -1, EXCLUDED_LABEL
        if name in self.label_to_id:
            return self.label_to_id[name], ""
        return -1, UNKNOWN_LABEL

    def to_json(self) -> dict:
        """The label map as written to ``label_map.json``."""
        return {
            "labels": self.labels,
            "label_to_id": self.label_to_id,
            "id_to_label": {str(i): n for n, i in self.label_to_id.items()},
            "label_values": self.label_values,
            "excluded": sorted(self._exclude),
        }


def normalize_raw_label(value: object) -> str | None:
    """Raw labels as strings (``4``, ``4.0`` and ``"4"`` are the same label)."""
    if value is None or (not isinstance(value, (str, bytes)) and pd.isna(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text if text else None


def clean_batch(
    batch: pd.DataFrame, cfg: CleanConfig, mapper: LabelMapper, *, twitter_repair: bool = False
) -> pd.DataFrame:
    """Clean a batch with columns ``text`` and ``label_raw``.

    Returns columns text (cleaned), label (id or -1), label_raw and drop_reason.
    """
    words = _stop_words() if cfg.stop_words else None
    texts, labels, raws, reasons = [], [], [], []
    for text, raw_value in zip(batch["text"].tolist(), batch["label_raw"].tolist()):
        raw = normalize_raw_label(raw_value)
        reason = ""
        label = -1
        if text is None or (not isinstance(text, str) and pd.isna(text)) or not str(text).strip():
            reason, text = MISSING_TEXT, ""
        elif raw is None:
            reason = MISSING_LABEL
        else:
            label, reason = mapper.map(raw)
        if not reason:
            text = clean_text(str(text), cfg, twitter_repair=twitter_repair, stop_words=words)
            if not text:
                reason = EMPTY_AFTER_CLEANING
        texts.append(str(text))
        labels.append(label)
        raws.append(raw if raw is not None else "")
        reasons.append(reason)
    return pd.DataFrame(
        {"text": texts, "label": pd.array(labels, dtype="int64"), "label_raw": raws, "drop_reason": reasons}
    )
