"""A served model, watched: every request counted by minute (route, status, latency, the
answers' labels and confidences, the texts' token lengths), kept for the last hour by one
small Serve deployment beside the model's replicas, and summed up for ``GET /stats`` and
the dashboard's Live page: requests per second, p50 and p95 latency, error rate, the label
mix and the low-confidence share over time, and drift against the training data (the
population stability index of the label mix and of the input lengths)."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from raybm.inference.loading import tokenize
from raybm.metrics import LENGTH_SHARES, PSI_ALERT, length_bin, population_stability_index

if TYPE_CHECKING:
    from ray.serve import Deployment
    from ray.serve.handle import DeploymentHandle
    from transformers import PreTrainedTokenizerBase

WINDOW_MINUTES = 60  # minutes of history kept
LATENCY_SAMPLES = 2000  # latencies kept per minute for the quantiles (a uniform sample beyond)
RECENT_MINUTES = 5  # the "now" figures: requests per second, latency, errors, drift
LOW_CONFIDENCE = 0.6  # an answer below this (or below serve.min_confidence, when higher) is a low-confidence one


def new_minute(minute: int) -> dict[str, Any]:
    """An empty minute of counts."""
    return {
        "minute": minute,
        "requests": 0,
        "errors": 0,
        "refused": 0,
        "latencies_ms": [],
        "labels": {},
        "answers": 0,
        "low_confidence": 0,
        "lengths": {},
    }


class Minutes:
    """The per-minute counts of the last ``WINDOW_MINUTES`` minutes."""

    def __init__(self, low_confidence: float = LOW_CONFIDENCE) -> None:
        self.low = low_confidence
        self.minutes: deque[dict[str, Any]] = deque(maxlen=WINDOW_MINUTES)
        self.seen = 0  # latencies offered to the current minute (sampling beyond LATENCY_SAMPLES)

    def _now(self, now: float) -> dict[str, Any]:
        minute = int(now // 60)
        if not self.minutes or self.minutes[-1]["minute"] != minute:
            self.minutes.append(new_minute(minute))
            self.seen = 0
        return self.minutes[-1]

    def record(
        self,
        status: int,
        latency_ms: float,
        answers: list[tuple[str, float]],
        length_bins: list[int],
        now: float | None = None,
    ) -> None:
        """One request: its status, latency, (label, confidence) answers and texts' length bins."""
        m = self._now(time.time() if now is None else now)
        m["requests"] += 1
        m["errors"] += status >= 500 or status == 408  # the server's failures, timeouts included
        m["refused"] += 400 <= status < 500 and status != 408  # clients' mistakes
        self.seen += 1
        if len(m["latencies_ms"]) < LATENCY_SAMPLES:
            m["latencies_ms"].append(latency_ms)
        elif np.random.randint(self.seen) < LATENCY_SAMPLES:
            m["latencies_ms"][np.random.randint(LATENCY_SAMPLES)] = latency_ms
        for label, confidence in answers:
            m["labels"][label] = m["labels"].get(label, 0) + 1
            m["answers"] += 1
            m["low_confidence"] += confidence < self.low
        for b in length_bins:
            m["lengths"][str(b)] = m["lengths"].get(str(b), 0) + 1

    def export(self) -> list[dict[str, Any]]:
        """The minutes, oldest first (plain data: it crosses processes)."""
        return [dict(m) for m in self.minutes]


def summarize(
    minutes: list[dict[str, Any]], reference: dict[str, Any] | None, now: float | None = None
) -> dict[str, Any]:
    """``GET /stats``: totals over the hour, the last ``RECENT_MINUTES`` minutes' figures, a
    series per minute, and drift of the recent label mix and input lengths from ``reference``
    (``raybm.metrics.drift_reference``; None: no drift figures)."""
    now = time.time() if now is None else now
    recent = [m for m in minutes if m["minute"] > now // 60 - RECENT_MINUTES]
    return {
        "window_minutes": WINDOW_MINUTES,
        "recent_minutes": RECENT_MINUTES,
        "total": _figures(minutes, span_s=max(60.0, 60.0 * len(minutes))),
        "recent": _figures(recent, span_s=60.0 * RECENT_MINUTES),
        "series": [{"minute": int(m["minute"] * 60), **_figures([m], span_s=60.0)} for m in minutes],
        "drift": _drift(recent, reference),
    }


def _figures(minutes: list[dict[str, Any]], span_s: float) -> dict[str, Any]:
    requests = sum(m["requests"] for m in minutes)
    errors = sum(m["errors"] for m in minutes)
    refused = sum(m.get("refused", 0) for m in minutes)
    answers = sum(m["answers"] for m in minutes)
    latencies = [x for m in minutes for x in m["latencies_ms"]]
    labels: dict[str, int] = {}
    for m in minutes:
        for lab, n in m["labels"].items():
            labels[lab] = labels.get(lab, 0) + n
    return {
        "requests": requests,
        "requests_per_s": requests / span_s,
        "errors": errors,
        "refused": refused,
        "error_rate": errors / requests if requests else 0.0,
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies else None,
        "answers": answers,
        "labels": labels,
        "low_confidence_share": sum(m["low_confidence"] for m in minutes) / answers if answers else None,
    }


def _drift(minutes: list[dict[str, Any]], reference: dict[str, Any] | None) -> dict[str, Any] | None:
    if not reference:
        return None
    names = list(reference["labels"])
    labels = [sum(m["labels"].get(lab, 0) for m in minutes) for lab in names]
    out: dict[str, Any] = {
        "reference": reference.get("dataset"),
        "threshold": PSI_ALERT,
        "labels_psi": population_stability_index([reference["labels"][n] for n in names], labels),
    }
    if reference.get("length_edges"):
        bins = [sum(m["lengths"].get(str(b), 0) for m in minutes) for b in range(len(LENGTH_SHARES))]
        out["lengths_psi"] = population_stability_index(list(LENGTH_SHARES), bins)
    else:
        out["lengths_psi"] = None
    out["alert"] = any(v is not None and v > PSI_ALERT for v in (out["labels_psi"], out["lengths_psi"]))
    return out


def length_bins(
    tokenizer: PreTrainedTokenizerBase | None, texts: list[str], reference: dict[str, Any] | None
) -> list[int]:
    """Each text's token-length bin against the reference's edges ([] without them)."""
    if not reference or not reference.get("length_edges") or tokenizer is None or not texts:
        return []
    lengths = [len(ids) for ids in tokenize(tokenizer, texts, truncation=False)["input_ids"]]
    return [length_bin(n, reference["length_edges"]) for n in lengths]


FLUSH_INTERVAL_S = 1.0  # how often a replica hands its counts on: /stats trails by at most this


class Watch:
    """A replica's side of the watching. A request only notes what happened (a list append,
    on the request path); once a second the replica hands the notes on, off the request
    path: to the app's stats deployment, one call for all of them, with the texts' length
    bins (the tokenizer runs then, in a thread, all texts at once), and to Ray's metrics
    (``ray.util.metrics``: Prometheus and Grafana see them on a cluster)."""

    def __init__(
        self,
        stats: DeploymentHandle | None,
        reference: dict[str, Any] | None,
        tokenizer: PreTrainedTokenizerBase | None,
        app: str,
    ) -> None:
        from ray.util.metrics import Counter, Histogram

        self.stats, self.reference, self.tokenizer = stats, reference, tokenizer
        self.notes: list[tuple[str, int, float, list[tuple[str, float]], list[str]]] = []
        self._flusher: asyncio.Task | None = None
        tags = {"app": app}
        self.requests = Counter(
            "raybm_requests", "requests answered, by route and status", tag_keys=("app", "route", "status")
        )
        self.latency = Histogram(
            "raybm_request_latency_ms",
            "time to answer a request (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("app", "route"),
        )
        self.answers = Counter("raybm_answers", "answers given, by label", tag_keys=("app", "label"))
        self.confidence = Histogram(
            "raybm_answer_confidence",
            "the answers' calibrated confidence",
            boundaries=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
            tag_keys=("app",),
        )
        for metric in (self.requests, self.latency, self.answers, self.confidence):
            metric.set_default_tags(tags)

    def observe(
        self, route: str, status: int, started: float, answers: list[tuple[str, float]], texts: list[str]
    ) -> None:
        """Note one request answered ``status`` after starting at ``started`` (perf_counter).
        Called on the replica's event loop, which also runs the hand-over."""
        latency_ms = (time.perf_counter() - started) * 1000
        self.notes.append((route, status, latency_ms, answers, texts if answers else []))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except Exception:
                logging.getLogger("ray.serve").exception("could not hand on the request counts")

    async def flush(self) -> None:
        """Hand the notes taken since the last call to Ray's metrics and the stats deployment."""
        notes, self.notes = self.notes, []
        if not notes:
            return
        counts: dict[tuple[str, int], int] = {}
        labels: dict[str, int] = {}
        for route, status, latency_ms, answers, _ in notes:
            counts[route, status] = counts.get((route, status), 0) + 1
            self.latency.observe(latency_ms, tags={"route": route})
            for label, confidence in answers:
                labels[label] = labels.get(label, 0) + 1
                self.confidence.observe(confidence)
        for (route, status), n in counts.items():
            self.requests.inc(n, tags={"route": route, "status": str(status)})
        for label, n in labels.items():
            self.answers.inc(n, tags={"label": label})
        if self.stats is None:
            return
        try:
            bins = await asyncio.to_thread(self._length_bins, [note[4] for note in notes])
        except Exception:  # noqa: BLE001 - watching never fails: the counts go on without lengths
            bins = [[] for _ in notes]
        self.stats.record_many.remote(
            [(status, latency_ms, answers, b) for (_, status, latency_ms, answers, _), b in zip(notes, bins)]
        )

    def _length_bins(self, texts_per_request: list[list[str]]) -> list[list[int]]:
        """Each request's texts' length bins, the tokenizer called once for all of them."""
        flat = length_bins(self.tokenizer, [t for texts in texts_per_request for t in texts], self.reference)
        if not flat:
            return [[] for _ in texts_per_request]
        out, at = [], 0
        for texts in texts_per_request:
            out.append(flat[at : at + len(texts)])
            at += len(texts)
        return out


SERVE_REQUESTS_METRIC = "ray_serve_num_http_requests"  # Serve's proxies count every request, by status


def serve_counts(app: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """What Serve's own HTTP proxies counted for the application ``app`` since they started,
    summed over every node's metrics agent: every request by status, those Serve answered
    itself included (503 when shedding load, 408 at its request timeout), which never reach
    a replica. Ray exports the counts every few seconds, so they trail a moment behind. None
    when no node's metrics could be read."""
    import ray

    by_status: dict[str, int] = {}
    by_method: dict[str, dict[str, int]] = {}
    read = False
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        try:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                text = r.read().decode("utf-8", "replace")
        except OSError:
            continue
        read = True
        for family in text_string_to_metric_families(text):
            if family.name != SERVE_REQUESTS_METRIC:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("application") == app:
                    code, method = sample.labels.get("status_code", "?"), sample.labels.get("method", "?")
                    by_status[code] = by_status.get(code, 0) + int(sample.value)
                    counts = by_method.setdefault(method, {})
                    counts[code] = counts.get(code, 0) + int(sample.value)
    if not read:
        return None
    return {
        "requests": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_method": {m: dict(sorted(c.items())) for m, c in sorted(by_method.items())},
        "shed": by_status.get("503", 0),
        "timed_out": by_status.get("408", 0),
    }


PROXY_COUNTS_TTL_S = 5.0  # Ray exports the proxies' counts every few seconds: reading them more often finds the same


class ProxyCounts:
    """``serve_counts`` of one application, read at most once every ``PROXY_COUNTS_TTL_S``
    (a read scrapes every node's metrics: about a second), whatever the rate of /stats calls."""

    def __init__(self, app: str) -> None:
        self.app, self.read_at = app, float("-inf")
        self.value: dict[str, Any] | None = None
        self.lock = asyncio.Lock()

    async def get(self) -> dict[str, Any] | None:
        """The counts, read again when the last read is older than the TTL (concurrent
        callers share one read)."""
        async with self.lock:
            if time.monotonic() - self.read_at >= PROXY_COUNTS_TTL_S:
                self.value = await asyncio.to_thread(serve_counts, self.app)
                self.read_at = time.monotonic()
        return self.value


def make_stats_class() -> Deployment:
    """The Serve deployment that keeps an app's per-minute counts (one replica, no CPU of its
    own; built on first use so that importing this module does not import Ray Serve)."""
    from ray import serve

    @serve.deployment(
        name="Stats", num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"log_level": "WARNING"}
    )  # not a line per request in the logs
    class StatsKeeper:
        def __init__(self, low_confidence: float = LOW_CONFIDENCE) -> None:
            self.minutes = Minutes(low_confidence)

        def record_many(self, requests: list[tuple[int, float, list, list[int]]]) -> None:
            """Count requests: (status, latency in ms, (label, confidence) answers, length bins) each."""
            for status, latency_ms, answers, bins in requests:
                self.minutes.record(status, latency_ms, [tuple(a) for a in answers], bins)

        def export(self) -> list[dict[str, Any]]:
            return self.minutes.export()

    return StatsKeeper
