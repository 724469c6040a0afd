"""Calling a raybm model server: the one HTTP client of ``raybm serve --send``, the
pipeline's smoke test and the dashboard's Try it page (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from raybm.errors import RaybmError

TEXTS_PER_REQUEST = 64


class ServerUnreachable(RaybmError):
    """No model server answers at the address (nothing listens, a wrong host or port)."""


def post_texts(url: str, texts: list[str], api_key: str | None = None, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The server's predictions for ``texts`` (``POST <url>/predict``, at most
    ``TEXTS_PER_REQUEST`` a request), one ``{"label", "confidence", ...}`` each, in order.
    A RaybmError with the server's own error message when it refuses."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(texts), TEXTS_PER_REQUEST):
        out += _post(url, "predict", texts[i : i + TEXTS_PER_REQUEST], api_key, timeout)["predictions"]
    return out


def explain_text(url: str, text: str, api_key: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """The server's explanation of one text (``POST <url>/explain``): its answer and each
    word's weight toward it."""
    return _post(url, "explain", [text], api_key, timeout)["explanations"][0]


def _post(url: str, route: str, texts: list[str], api_key: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    endpoint = f"{url.rstrip('/')}/{route}"
    req = urllib.request.Request(
        endpoint, data=json.dumps({"texts": texts}).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RaybmError(f"the model server at {url} answered {e.code}: {_error_of(e.read())}") from None
    except urllib.error.URLError as e:
        raise ServerUnreachable(f"cannot reach the model server at {endpoint}: {e.reason}") from None


def get_stats(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The model server's ``GET <url>/stats`` (``raybm.serve.watch.summarize``)."""
    endpoint = f"{url.rstrip('/')}/stats"
    req = urllib.request.Request(endpoint, headers={"X-API-Key": api_key} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RaybmError(f"the model server at {url} answered {e.code}: {_error_of(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnreachable(f"cannot reach the model server at {endpoint}: {getattr(e, 'reason', e)}") from None


def endpoint_ok(url: str | None, timeout: float = 2.0) -> bool:
    """Whether a raybm model server answers at ``url`` (its ``/healthz``)."""
    if not url:
        return False
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _error_of(body: bytes) -> str:
    """The ``error`` of a raybm error body, else the start of the body."""
    text = body.decode("utf-8", "replace")
    try:
        return str(json.loads(text).get("error", text))[:300]
    except (json.JSONDecodeError, AttributeError):
        return text[:300]
