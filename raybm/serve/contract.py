"""The model server's HTTP contract: what a request must be, what every answer looks like,
and the checks that give each client mistake a 4xx saying what is wrong. The OpenAPI
schema the server publishes is built from the same definitions, so the documented and the
checked contract are one."""

# No `from __future__ import annotations`: FastAPI reads the handlers' real annotations.

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from raybm.config import ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

# A character that is not white space, the same in Python and in a JSON schema (ECMA-262)
# pattern: every character either language counts as space is listed, so the server's
# check and the documented schema agree on which texts are empty.
NOT_SPACE = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
_HAS_TEXT = re.compile(NOT_SPACE)


def predict_request_schema(s: ServeConfig) -> dict[str, Any]:
    """The JSON schema of a /predict body under the limits ``s``, as the server checks it
    (OpenAPI documents it, and generated clients test against it)."""
    text = {
        "type": "string",
        "minLength": 1,
        "maxLength": s.max_text_chars,
        "pattern": NOT_SPACE,
        "description": f"a text with at least one non-space character, at most {s.max_text_chars} characters "
        f"of valid Unicode",
    }
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["texts"],
                "additionalProperties": False,
                "properties": {
                    "texts": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": s.max_texts,
                        "items": text,
                        "description": 'texts to classify, answered as "predictions" in the same order',
                    }
                },
            },
            {
                "type": "object",
                "required": ["text"],
                "additionalProperties": False,
                "properties": {"text": {**text, "description": 'one text, answered as a single "prediction"'}},
            },
        ],
        "example": {"texts": ["what a great day", "this is the worst service ever"]},
    }


_PREDICTION_SCHEMA = {
    "type": "object",
    "required": ["label", "confidence", "probabilities", "uncertain"],
    "properties": {
        "label": {
            "type": "string",
            "description": "one of the model's labels (GET /metadata): every text gets one, a text "
            "that is none of them too, and then a low confidence",
        },
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
        "uncertain": {
            "type": "boolean",
            "description": "the confidence is below serve.min_confidence (the abstain band)",
        },
    },
}
PREDICT_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["model", "backend"],
    "properties": {
        "predictions": {"type": "array", "items": _PREDICTION_SCHEMA},
        "prediction": _PREDICTION_SCHEMA,
        "model": {"type": "string"},
        "backend": {"type": "string"},
    },
}
_EXPLANATION_SCHEMA = {
    "type": "object",
    "required": ["label", "confidence", "uncertain", "words"],
    "properties": {
        "label": {
            "type": "string",
            "description": "one of the model's labels (GET /metadata): every text gets one, a text "
            "that is none of them too, and then a low confidence",
        },
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "uncertain": {"type": "boolean"},
        "words": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["word", "start", "end", "weight"],
                "properties": {
                    "word": {"type": "string"},
                    "start": {"type": "integer"},
                    "end": {"type": "integer"},
                    "weight": {
                        "type": "number",
                        "description": "how much the answer's "
                        "log-odds drop without this word (negative: it pulled "
                        "the other way)",
                    },
                },
            },
        },
    },
}
EXPLAIN_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["method", "model", "backend"],
    "properties": {
        "explanations": {"type": "array", "items": _EXPLANATION_SCHEMA},
        "explanation": _EXPLANATION_SCHEMA,
        "method": {"type": "string"},
        "model": {"type": "string"},
        "backend": {"type": "string"},
    },
}
EXPLAIN_MAX_TEXTS = 8  # each text costs a model call of (its words + 2) rows


class BodyTooLarge(Exception):
    """A request body over ``serve.max_body_bytes``."""

    pass


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> "JSONResponse":
    """A ``{"error": message}`` JSON answer with this status."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_ERROR_CONTENT = {"application/json": {"schema": ERROR_SCHEMA}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong API key (when the server has one)", "content": _ERROR_CONTENT},
    403: {
        "description": "a server without a key answers requests whose Host is this machine only",
        "content": _ERROR_CONTENT,
    },
    500: {"description": "the model failed; the body never holds a traceback or a path", "content": _ERROR_CONTENT},
}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'one prediction per text, in order ("prediction" for a single "text")',
        "content": {"application/json": {"schema": PREDICT_RESPONSE_SCHEMA}},
    },
    **ERROR_RESPONSES,
    400: {"description": "the body is not valid JSON", "content": _ERROR_CONTENT},
    413: {"description": "a body over the size limit", "content": _ERROR_CONTENT},
    415: {"description": "the body is not sent as application/json", "content": _ERROR_CONTENT},
    422: {
        "description": "valid JSON that is not a request: wrong fields or types, too many texts, empty, "
        "over-long or invalid Unicode texts",
        "content": _ERROR_CONTENT,
    },
    503: {
        "description": "overloaded: more requests waiting than the server queues; retry later",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
}
EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PREDICT_RESPONSES,
    200: {
        "description": "each text's answer and every word's weight toward it, in order (\"explanation\" for a "
        'single "text")',
        "content": {"application/json": {"schema": EXPLAIN_RESPONSE_SCHEMA}},
    },
    422: {
        "description": f"as for /predict; also more than {EXPLAIN_MAX_TEXTS} texts (or serve.max_texts), or "
        f"texts whose explanation would cost more than serve.explain_max_cost",
        "content": _ERROR_CONTENT,
    },
}


def add_error_handlers(app: "FastAPI") -> None:
    """Every error the framework raises (an unknown route, a wrong method, an exception in a
    handler) answers in the documented ``{"error": "..."}`` form, without a traceback or a path."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    async def http_error(request: Request, exc: HTTPException) -> "JSONResponse":
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError) -> "JSONResponse":
        return error_response(422, "the request does not match the API; see /docs")

    async def server_error(request: Request, exc: Exception) -> "JSONResponse":
        return error_response(500, "internal error in the model server; the replica's log has the details")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def is_json_content_type(value: str | None) -> bool:
    """Whether a Content-Type header says JSON (``application/json``, any parameters)."""
    return (value or "").split(";", 1)[0].strip().lower() == "application/json"


def predict_each(predict: Callable[[list[str]], Any], texts: list[str]) -> list[Any]:
    """``predict(texts)`` as a list, one row per text. When the batch fails, each text is
    tried alone, so one bad text fails only its own request: a text that still fails gets
    its exception in its place, and so does a row that is not probabilities (NaN or
    infinity: fp16 overflow), which JSON could not carry."""
    try:
        return _finite(predict(texts))
    except Exception as e:
        logging.getLogger("ray.serve").exception("the model failed on a batch of %d text(s)", len(texts))
        if len(texts) == 1:
            return [e]
    out: list[Any] = []
    for t in texts:
        try:
            out.extend(_finite(predict([t])))
        except Exception as e:  # noqa: BLE001 - reported to that text's request only
            out.append(e)
    return out


def _finite(rows: Any) -> list[Any]:
    return [row if np.isfinite(np.asarray(row, dtype=np.float64)).all() else NonFiniteAnswer() for row in rows]


class NonFiniteAnswer(ValueError):
    """The model answered NaN or infinite probabilities for a text."""

    def __init__(self) -> None:
        super().__init__("the model gave NaN or infinite probabilities (overflow in its precision?)")
        logging.getLogger("ray.serve").error("the model gave NaN or infinite probabilities for a text")


def prediction(labels: list[str], probs: Any, min_confidence: float = 0.0) -> dict[str, Any]:
    """One text's answer: the top label, its probability, every class's, and whether it
    falls in the abstain band (below ``min_confidence``)."""
    best = int(probs.argmax())
    return {
        "label": labels[best],
        "confidence": float(probs[best]),
        "probabilities": {lab: float(v) for lab, v in zip(labels, probs)},
        "uncertain": bool(probs[best] < min_confidence),
    }


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _check_text(t: Any, name: str, s: ServeConfig) -> str:
    """ "" for a good text, else what is wrong with it."""
    if not isinstance(t, str):
        return f"{name} must be a string, got {_type_name(t)}"
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, sent as a JSON escape such as "\ud800"
        return (
            f"{name} is not valid Unicode: it holds a lone surrogate (\\u{ord(t[e.start]):04x}) at "
            f"character {e.start}; send UTF-8 text"
        )
    if not _HAS_TEXT.search(t):
        return f"{name} is empty"
    if len(t) > s.max_text_chars:
        return f"{name} is {len(t)} characters long, the limit is {s.max_text_chars}"
    return ""


_SEND = 'send {"text": "..."} or {"texts": ["...", ...]}'


def check_texts(payload: Any, s: ServeConfig) -> tuple[list[str] | None, int, str]:
    """(texts, 0, "") for a valid request body, else (None, status, message). A body is
    ``{"texts": [...]}`` (one or many) or ``{"text": "..."}`` (one; answered with a single
    ``prediction``)."""
    if not isinstance(payload, dict):
        return None, 422, f"the body must be a JSON object, got {_type_name(payload)}; {_SEND}"
    fields = {"text", "texts"} & set(payload)
    unknown = sorted(set(payload) - {"text", "texts"})
    if not fields:
        hint = f" (unknown field(s): {', '.join(unknown)})" if unknown else ""
        return None, 422, f'missing field "texts" (or "text"): {_SEND}{hint}'
    if len(fields) == 2:
        return None, 422, 'send either "text" or "texts", not both'
    if unknown:
        return None, 422, f"unknown field(s): {', '.join(unknown)}; {_SEND}"
    if "text" in payload:
        problem = _check_text(payload["text"], '"text"', s)
        if isinstance(payload["text"], list):
            problem += '; for several texts send {"texts": [...]}'
        return (None, 422, problem) if problem else ([payload["text"]], 0, "")
    texts = payload["texts"]
    if isinstance(texts, str):
        return (
            None,
            422,
            '"texts" must be a list of strings; wrap a single text: {"texts": ["..."]}, or send {"text": "..."}',
        )
    if not isinstance(texts, list):
        return None, 422, f'"texts" must be a list of strings, got {_type_name(texts)}'
    if not texts:
        return None, 422, '"texts" is empty: send at least one text'
    if len(texts) > s.max_texts:
        return None, 422, f"too many texts: {len(texts)} in one request, the limit is {s.max_texts}; split the request"
    for i, t in enumerate(texts):
        problem = _check_text(t, f"texts[{i}]", s)
        if problem:
            return None, 422, problem
    return texts, 0, ""
