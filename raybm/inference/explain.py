"""Why a text got its label: the words that pushed the answer, by occlusion.

Each word of the text (all its tokens together) is replaced by the tokenizer's mask token
(its unknown or pad token when it has none) and the text scored again; a word's weight is
how much the answer's log-odds (ln p / (1 - p) of the answered label) drop without it
(negative: the word pulled the other way). Log-odds, not the probability itself: a model
99% sure of an answer barely moves its probability when one of several supporting words
goes (0.99 to 0.98), but its log-odds fall by 0.7, so the words still rank and show. This
is Captum's ``FeatureAblation`` with one feature per word. It is
faithful by construction (it measures the model's own answer with and without each word)
and costs (words + 2) rows scored, ``ROWS_PER_PASS`` a model call, a few milliseconds on CPU for a
tweet; it needs only the model's probabilities, so it works the same on the PyTorch, int8
and ONNX backends. Integrated gradients would need gradients (PyTorch only) and 20 to 50
passes per text.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from raybm.errors import RaybmError
from raybm.inference.loading import tokenize

if TYPE_CHECKING:
    from transformers import BatchEncoding

    from raybm.inference.loading import TextClassifier

METHOD = (
    "occlusion: each word masked in turn (Captum FeatureAblation); weight = how much the answer's log-odds "
    "drop without it"
)


ROWS_PER_PASS = 32  # texts with one word masked scored per model call: bounds an explanation's memory


class ExplainTimeout(Exception):
    """An explanation ran past its deadline (its request timed out): it stops at the next model call."""


def _encode(predictor: TextClassifier, text: str) -> BatchEncoding:
    tok = predictor.tokenizer
    if not getattr(tok, "is_fast", False):
        raise RaybmError("explanations need a fast tokenizer (one with a tokenizer.json)")
    return tokenize(tok, text, truncation=True, max_length=predictor.max_length, return_offsets_mapping=True)


def explain_cost(predictor: TextClassifier, text: str) -> int:
    """What explaining ``text`` costs, in token positions scored: (words + 1) x tokens."""
    enc = _encode(predictor, text)
    return (len({w for w in enc.word_ids() if w is not None}) + 1) * len(enc["input_ids"])


def explain(predictor: TextClassifier, text: str, deadline: float | None = None) -> dict[str, Any]:
    """The answer for ``text`` and each word's weight toward it: ``label``, ``confidence``,
    ``words`` (``word``, ``start``, ``end``: its place in the text, ``weight``), ``method``.
    Scored ``ROWS_PER_PASS`` rows per model call; past ``deadline`` (``time.monotonic``) it
    stops with ExplainTimeout before the next call."""
    import torch
    from captum.attr import FeatureAblation

    tok = predictor.tokenizer
    enc = _encode(predictor, text)
    ids = np.asarray([enc["input_ids"]], dtype=np.int64)
    mask = np.asarray([enc["attention_mask"]], dtype=np.int64)
    word_of = enc.word_ids()
    words = sorted({w for w in word_of if w is not None})
    probs = predictor.probabilities(ids, mask)[0]
    best = int(probs.argmax())
    answer = {"label": predictor.labels[best], "confidence": float(probs[best]), "words": [], "method": METHOD}
    if not words:  # only characters the tokenizer drops (zero-width spaces ...): an answer, no words
        return answer
    # One feature per word; special tokens ([CLS], [SEP], ...) share one more, left out below.
    groups = torch.tensor([[words.index(w) if w is not None else len(words) for w in word_of]])
    baseline = next(t for t in (tok.mask_token_id, tok.unk_token_id, tok.pad_token_id) if t is not None)

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        if deadline is not None and time.monotonic() > deadline:
            raise ExplainTimeout
        rows = input_ids.shape[0]
        return torch.from_numpy(log_odds(predictor.probabilities(input_ids.numpy(), np.repeat(mask, rows, 0))))

    weights = FeatureAblation(forward).attribute(
        torch.from_numpy(ids),
        baselines=baseline,
        target=best,
        feature_mask=groups,
        perturbations_per_eval=min(len(words) + 1, ROWS_PER_PASS),
    )[0]
    out = []
    for w in words:
        spans = [enc["offset_mapping"][k] for k, wid in enumerate(word_of) if wid == w]
        start, end = spans[0][0], spans[-1][1]
        first = word_of.index(w)
        out.append({"word": text[start:end], "start": int(start), "end": int(end), "weight": float(weights[first])})
    return {**answer, "words": out}


def explain_within(
    predictor: TextClassifier, texts: list[str], max_cost: int, deadline: float | None = None
) -> list[dict[str, Any]]:
    """``explain`` of each text, refused (RaybmError) before any model call when together
    they cost more than ``max_cost`` token positions (``explain_cost``)."""
    cost = sum(explain_cost(predictor, t) for t in texts)
    if cost > max_cost:
        raise RaybmError(
            f"explaining {'this text' if len(texts) == 1 else f'these {len(texts)} texts'} would score "
            f"{cost:,} token positions ((words + 1) x tokens), over this server's limit of {max_cost:,} "
            f"(serve.explain_max_cost); send fewer or shorter texts"
        )
    return [explain(predictor, t, deadline) for t in texts]


def log_odds(probs: np.ndarray) -> np.ndarray:
    """ln(p / (1 - p)) of every class's probability (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def strongest(explained: dict[str, Any], n: int = 3) -> list[str]:
    """The ``n`` words that pushed the answer most (positive weight), strongest first."""
    pushed = sorted((w for w in explained["words"] if w["weight"] > 0), key=lambda w: -w["weight"])
    return [w["word"] for w in pushed[:n]]
