"""Hosting a model on Ray Serve behind an HTTP API.

    POST /predict   {"texts": ["...", ...]}  -> labels and per-class probabilities, in order
                    {"text": "..."}          -> the same for one text, as "prediction"
    GET  /healthz   the replica is up and its model loaded
    GET  /metadata  model name, labels, source run or sweep, its test metrics, backend, limits
    GET  /docs      OpenAPI (FastAPI ingress)

Each text of a request is one item of the replica's ``Batcher``, so texts from concurrent
requests share model calls of up to ``serve.max_batch_size`` texts (and a text that finds
the model idle runs at once). Requests are read and checked
here, not by FastAPI's model binding, so every client mistake (bad JSON, wrong types, an
empty list, empty or over-long texts, too many texts, a body over the size limit) gets a
4xx that says what is wrong, and a body is never read past its limit. Overload is shed by
the replica: beyond ``max_ongoing_requests`` + ``max_queued_requests`` requests in hand a
request gets 503 with Retry-After, counted like any other answer. Each replica also answers
on a port of its own when Serve runs with direct ingress (``raybm.serve.ingress``).
Serve calls ``check_health`` on each replica, which runs the model unless it answered a
request since the last check; a replica whose model fails is replaced.

The deployment takes its model loader as an import path (``module:function``), so tests
and benchmarks can put a tiny or deliberately slow model behind the same server.
``build_app`` is the Serve application builder: ``serve run raybm.serve.app:build_app
model=PATH [config=FILE] [key=value ...]`` (keys are ``serve.*`` settings).
"""

# No `from __future__ import annotations`: Serve's ingress reads the handlers' real annotations.

import asyncio
import dataclasses
import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from starlette.responses import Response

from raybm.config import ServeConfig, StorageConfig, is_loopback, load_config
from raybm.errors import RaybmError
from raybm.inference.explain import METHOD, ExplainTimeout, explain_within
from raybm.inference.loading import check_model_files, model_info
from raybm.inference.locate import locate_model, model_name
from raybm.runtime import TOKENIZER_ENV
from raybm.serve.batching import Batcher
from raybm.serve.contract import (
    ERROR_RESPONSES,
    EXPLAIN_MAX_TEXTS,
    EXPLAIN_RESPONSES,
    PREDICT_RESPONSES,
    BodyTooLarge,
    add_error_handlers,
    check_texts,
    error_response,
    is_json_content_type,
    predict_each,
    predict_request_schema,
    prediction,
)
from raybm.serve.ingress import replica_env
from raybm.serve.watch import LOW_CONFIDENCE, ProxyCounts, Watch, make_stats_class, summarize
from raybm.storage.fs import resolve_uri
from raybm.storage.layout import EXPORTS
from raybm.storage.model_cache import fetch_model

if TYPE_CHECKING:
    from ray.serve import Application, Deployment
    from ray.serve.handle import DeploymentHandle

DEFAULT_LOADER = "raybm.inference.loading:load_predictor"
TIMED_OUT = 408  # what Serve answers a request cancelled at serve.request_timeout_s
logger = logging.getLogger("ray.serve")  # a replica's log
HEALTH_PROBE = "raybm health check"


def import_object(spec: str | Callable) -> Callable:
    """``module:attribute`` -> the object (a callable passes through)."""
    if callable(spec):
        return spec
    module, _, name = spec.partition(":")
    if not module or not name:
        raise RaybmError(f"model loader {spec!r}: write it as module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RaybmError(f"model loader {spec!r}: {e}") from None


MIN_API_KEY_CHARS = 16


def api_key_digest(key: str, salt: str) -> str:
    """The HMAC-SHA-256 of an API key under a random ``salt`` (hex): what replicas compare,
    so the key itself never leaves the process that read it."""
    return hmac.new(bytes.fromhex(salt), key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def replica_threads(s: ServeConfig) -> int:
    """Torch threads of one replica: its CPUs, at least one."""
    return s.torch_threads or max(1, int(s.cpus_per_replica))


def load_replica(
    model_dir: str, s: ServeConfig, loader: str | Callable, storage: dict[str, Any] | None
) -> tuple[Any, dict[str, Any]]:
    """(predictor, model card) of one replica: an ``s3://`` model is fetched into the node's
    model cache first (one copy per node and model version)."""
    source = model_dir
    storage_cfg = StorageConfig(**(storage or {}))
    if model_dir.startswith("s3://"):
        model_dir = fetch_model(model_dir, storage_cfg)
    device = "cuda" if s.gpus_per_replica > 0 else "cpu"
    started = time.time()
    predictor = import_object(loader)(model_dir, backend=s.backend, threads=replica_threads(s), device=device)
    card = model_info(model_dir, source=source, storage=storage_cfg)
    card.update(
        backend=getattr(predictor, "backend", s.backend),
        device=device,
        torch_threads=replica_threads(s),
        load_seconds=round(time.time() - started, 2),
    )
    return predictor, card


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def foreign_host(request: Request) -> bool:
    """Whether a request to a keyless loopback server names another host than this machine
    in its Host header: a web page that rebinds its own name to 127.0.0.1 (DNS rebinding)
    could otherwise use the server from the visitor's browser."""
    host = (request.headers.get("host") or "").strip().lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") and host.count(":") == 1 else host
    name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else name
    return name not in LOOPBACK_NAMES


def unauthorized(request: Request, api_key: dict[str, str] | None, s: ServeConfig) -> Response | None:
    """None when the request may pass (no key is set, or it sends the right one), else the
    401 answer. The key comes in ``X-API-Key`` or as ``Authorization: Bearer <key>``.
    Without a key, a loopback server's request must name this machine as its Host (403)."""
    if not api_key:
        if is_loopback(s.host) and foreign_host(request):
            return error_response(403, "this server answers requests to 127.0.0.1 or localhost only (Host header)")
        return None
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given and hmac.compare_digest(api_key_digest(given, api_key["salt"]), api_key["hmac"]):
        return None
    return error_response(
        401,
        "missing or wrong API key: send it in the X-API-Key header (or Authorization: Bearer <key>)",
        {"WWW-Authenticate": "Bearer"},
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, never read past ``limit`` bytes (BodyTooLarge beyond)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


async def read_predict_request(
    request: Request, s: ServeConfig, api_key: dict[str, str] | None
) -> tuple[Any, list[str] | None]:
    """(payload, texts) of a /predict request that passes every check, else (the 4xx
    answer, None): the key, the content type, the size, JSON, the texts themselves."""
    denied = unauthorized(request, api_key, s)
    if denied is not None:
        return denied, None
    if not is_json_content_type(request.headers.get("content-type")):
        return error_response(
            415,
            f"send the body as JSON with the header Content-Type: application/json "
            f"(got {request.headers.get('content-type') or 'none'})",
        ), None
    try:
        body = await read_body(request, s.max_body_bytes)
    except BodyTooLarge:
        return error_response(
            413, f"request body over {s.max_body_bytes} bytes; send fewer or shorter texts per request"
        ), None
    try:
        payload = json.loads(body.decode("utf-8"))  # UTF-8 only (json.loads of bytes would take UTF-16 and 32)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, an int over 4,300 digits
        return error_response(400, f'the body is not valid JSON ({str(e)[:200]}); send {{"texts": ["..."]}}'), None
    texts, status, message = check_texts(payload, s)
    if texts is None:
        return error_response(status, message), None
    return payload, texts


class Replica(Protocol):
    """What the request handlers below use of a model replica (``make_server_class``)."""

    settings: ServeConfig
    api_key: dict[str, str] | None
    predictor: Any
    card: dict[str, Any]
    labels: list[str]
    backend: str
    batcher: Batcher
    watch: Watch
    proxy_counts: ProxyCounts
    in_hand: int
    capacity: int
    explain_pool: ThreadPoolExecutor
    explain_slot: asyncio.Lock
    explain_waiting: int


Answer = tuple[Any, list[str], list[tuple[str, float]]]  # (the answer, its texts, (label, confidence) per text)


async def watched(
    server: Replica, route: str, answer: Callable[[Replica, Request], Awaitable[Answer]], request: Request
) -> Any:
    """``answer(server, request)`` -> (response, texts, answers), counted by the replica's
    watch (the stats deployment and Ray's metrics)."""
    started = time.perf_counter()
    if server.in_hand >= server.capacity:  # shed here, where it is counted, whichever way it came in
        server.watch.observe(route, 503, started, [], [])
        return error_response(
            503,
            f"the server has {server.in_hand} requests in hand, its most "
            f"(serve.max_ongoing_requests + serve.max_queued_requests); retry shortly",
            {"Retry-After": "1"},
        )
    server.in_hand += 1
    try:
        response, texts, answers = await answer(server, request)
    except asyncio.CancelledError:  # Serve's request timeout (the client got 408) or the client left
        server.watch.observe(route, TIMED_OUT, started, [], [])
        raise
    finally:
        server.in_hand -= 1
    status = getattr(response, "status_code", 200)
    server.watch.observe(route, status, started, answers, texts)
    return response


async def predict_answers(server: Replica, request: Request) -> Answer:
    """A /predict request: (the answer, its texts, (label, confidence) per answered text)."""
    payload, texts = await read_predict_request(request, server.settings, server.api_key)
    if texts is None:
        return payload, [], []  # the error answer
    probs = await asyncio.gather(*(server.batcher(t) for t in texts))
    failed = [i for i, p in enumerate(probs) if isinstance(p, Exception)]
    if failed:
        return (
            error_response(
                500,
                f"the model failed on {len(failed)} of {len(texts)} text(s) (first: "
                f"{type(probs[failed[0]]).__name__}); other requests are not affected. "
                f"The replica's log has the details",
            ),
            texts,
            [],
        )
    predictions = [prediction(server.labels, p, server.settings.min_confidence) for p in probs]
    body = {"prediction": predictions[0]} if "text" in payload else {"predictions": predictions}
    return (
        {**body, "model": server.card["name"], "backend": server.backend},
        texts,
        [(p["label"], p["confidence"]) for p in predictions],
    )


async def stats_answer(server: Replica, request: Request) -> Any:
    """A /stats request: the app's counts summed up (``raybm.serve.watch.summarize``)."""
    denied = unauthorized(request, server.api_key, server.settings)
    if denied is not None:
        return denied
    minutes = await server.watch.stats.export.remote() if server.watch.stats is not None else []
    try:  # every request, those Serve answered itself (503, 408) included: its proxies' own counts
        proxies = await server.proxy_counts.get()
    except Exception:
        logger.exception("could not read Serve's request counts")
        proxies = None
    return {"model": server.card["name"], **summarize(minutes, server.card.get("drift_reference")), "serve": proxies}


async def explain_answers(server: Replica, request: Request) -> Answer:
    """A /explain request answered by ``server`` (a replica): its texts checked as for
    /predict, at most EXPLAIN_MAX_TEXTS of them, each explained in a thread; as
    ``predict_answers``, (the answer, its texts, the answers' labels and confidences)."""
    payload, texts = await read_predict_request(request, server.settings, server.api_key)
    if texts is None:
        return payload, [], []  # the error answer
    if len(texts) > EXPLAIN_MAX_TEXTS:
        return (
            error_response(422, f"{len(texts)} texts: /explain takes at most {EXPLAIN_MAX_TEXTS} per request"),
            [],
            [],
        )
    s = server.settings
    if server.explain_waiting > s.explain_max_queued:
        return (
            error_response(503, "too many explanations waiting on this replica; retry later", {"Retry-After": "1"}),
            texts,
            [],
        )
    deadline = time.monotonic() + s.request_timeout_s  # the thread stops by itself once the request has timed out
    server.explain_waiting += 1
    try:
        async with server.explain_slot:  # one explanation at a time, in a thread apart from /predict and health
            found = await asyncio.get_running_loop().run_in_executor(
                server.explain_pool, explain_within, server.predictor, texts, s.explain_max_cost, deadline
            )
    except RaybmError as e:
        return error_response(422, str(e)), texts, []
    except ExplainTimeout:
        return (
            error_response(
                503,
                f"the explanation took longer than serve.request_timeout_s "
                f"({s.request_timeout_s:g} s); send shorter or fewer texts",
            ),
            texts,
            [],
        )
    except Exception as e:
        logger.exception("/explain failed")
        return (
            error_response(500, f"the model failed to explain ({type(e).__name__}); the replica's log has the details"),
            texts,
            [],
        )
    finally:
        server.explain_waiting -= 1
    answers = [
        {
            "label": f["label"],
            "confidence": f["confidence"],
            "words": f["words"],
            "uncertain": f["confidence"] < server.settings.min_confidence,
        }
        for f in found
    ]
    body = {"explanation": answers[0]} if "text" in payload else {"explanations": answers}
    return (
        {**body, "method": METHOD, "model": server.card["name"], "backend": server.backend},
        texts,
        [(a["label"], a["confidence"]) for a in answers],
    )


def make_server_class() -> "Deployment":
    """The FastAPI app and the Serve deployment class (built on first use, so importing
    this module does not import Ray Serve)."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI(
        title="raybm model server", version="1", description="Text classification with a model fine-tuned by raybm."
    )
    add_error_handlers(app)

    @serve.deployment(name="ModelServer")
    @serve.ingress(app)
    class ModelServer:
        def __init__(
            self,
            model_dir: str,
            settings: dict[str, Any],
            loader: str | Callable = DEFAULT_LOADER,
            api_key: dict[str, str] | None = None,
            storage: dict[str, Any] | None = None,
            stats: "DeploymentHandle | None" = None,
        ) -> None:
            self.settings = s = ServeConfig(**settings)
            try:
                self.replica = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001 - built outside Serve (tests of the class)
                self.replica = None
            self.predictor, self.card = load_replica(model_dir, s, loader, storage)
            self.labels, self.backend = list(self.predictor.labels), self.card["backend"]
            self.api_key = api_key
            # Explanations one at a time, in a thread apart from /predict's and health checks'.
            self.explain_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raybm-explain")
            self.explain_slot, self.explain_waiting = asyncio.Lock(), 0
            self.watch = Watch(
                stats, self.card.get("drift_reference"), getattr(self.predictor, "tokenizer", None), s.app_name
            )
            self.proxy_counts = ProxyCounts(s.app_name)
            self.in_hand, self.capacity = 0, s.max_ongoing_requests + s.max_queued_requests
            # The documented request body carries this server's own limits.
            paths = app.openapi()["paths"]
            paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"] = predict_request_schema(
                s
            )
            paths["/explain"]["post"]["requestBody"]["content"]["application/json"]["schema"] = predict_request_schema(
                dataclasses.replace(s, max_texts=min(s.max_texts, EXPLAIN_MAX_TEXTS))
            )
            self.batcher = Batcher(
                lambda texts: predict_each(self.predictor.predict, texts),
                s.max_batch_size,
                s.batch_wait_timeout_s,
                s.inline_call_max_s,
            )

        async def check_health(self) -> None:
            if self.batcher.answered_within(self.settings.health_check_period_s):
                return  # the model answered a request since the last check: no probe beside the traffic
            probs = await asyncio.to_thread(self.predictor.predict, [HEALTH_PROBE])
            if len(probs) != 1 or not abs(float(sum(probs[0])) - 1.0) <= 1e-3:  # NaN fails too
                raise RuntimeError(f"model health check returned {probs!r}")

        @app.post(
            "/predict",
            response_model=None,  # the handlers build their answers: no model read off the return type
            summary="Classify texts",
            responses=PREDICT_RESPONSES,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": predict_request_schema(ServeConfig())}},
                }
            },
        )
        async def predict(self, request: Request) -> Any:
            return await watched(self, "predict", predict_answers, request)

        @app.post(
            "/explain",
            response_model=None,  # the handlers build their answers: no model read off the return type
            summary="Classify texts and weigh each word's part in the answer",
            responses=EXPLAIN_RESPONSES,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": predict_request_schema(ServeConfig())}},
                }
            },
        )
        async def explain(self, request: Request) -> Any:
            return await watched(self, "explain", explain_answers, request)

        @app.get("/healthz", summary="Liveness: the replica is up and its model loaded")
        async def healthz(self):
            # Which replica answered: a load balancer's or an operator's view of the pool.
            return {"status": "ok", "model": self.card["name"], "backend": self.backend, "replica": self.replica}

        @app.get(
            "/metadata",
            summary="The model being served and the server's limits",
            responses=ERROR_RESPONSES,
            response_model=None,
        )
        async def metadata(self, request: Request) -> Any:
            denied = unauthorized(request, self.api_key, self.settings)
            if denied is not None:
                return denied
            s = self.settings
            limits = {
                "max_texts": s.max_texts,
                "max_text_chars": s.max_text_chars,
                "max_body_bytes": s.max_body_bytes,
                "max_batch_size": s.max_batch_size,
            }
            return {**self.card, "limits": limits, "min_confidence": s.min_confidence}

        @app.get(
            "/stats",
            response_model=None,
            summary="How the served model is doing: traffic, latency, errors, answers, drift",
            responses=ERROR_RESPONSES,
        )
        async def stats(self, request: Request) -> Any:
            return await stats_answer(self, request)

    return ModelServer


SHED_HEADROOM = 256  # requests Serve hands a full replica at once, for it to answer 503 itself


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    """The Serve deployment options for the settings ``s``: replicas or autoscaling, resources, queue limits."""
    opts: dict[str, Any] = {
        # The replica sheds beyond its capacity itself (``watched``: counted, whether the
        # request came through a proxy or straight to the replica, where a 503 of Serve's
        # own is counted nowhere), so Serve lets every request in: one being shed is in
        # hand for microseconds, and serve.request_timeout_s bounds any wait.
        "max_ongoing_requests": s.max_ongoing_requests + s.max_queued_requests + SHED_HEADROOM,
        "max_queued_requests": -1,
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        "ray_actor_options": {
            "num_cpus": s.cpus_per_replica,
            "num_gpus": s.gpus_per_replica,
            "runtime_env": {"env_vars": {**TOKENIZER_ENV, "OMP_NUM_THREADS": str(replica_threads(s)), **replica_env()}},
        },
        "max_constructor_retry_count": 3,
    }
    if s.max_replicas is not None:
        opts["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "initial_replicas": max(s.min_replicas, 1),
            "target_ongoing_requests": s.target_ongoing_requests,
        }
        opts["num_replicas"] = "auto"
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def read_api_key(s: ServeConfig) -> dict[str, str] | None:
    """``{"salt", "hmac"}``: the API key's HMAC under a fresh random salt (the key itself never
    leaves this process), or None when the server has no key."""
    if not s.api_key_env:
        return None
    key = os.environ.get(s.api_key_env, "").strip()
    if not key:
        raise RaybmError(
            f"serve.api_key_env={s.api_key_env}: set the environment variable {s.api_key_env} to "
            f"the API key, or unset serve.api_key_env to serve without one"
        )
    if len(key) < MIN_API_KEY_CHARS:
        raise RaybmError(
            f"the API key in {s.api_key_env} has {len(key)} characters; use at least "
            f"{MIN_API_KEY_CHARS} (for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    salt = secrets.token_hex(16)
    return {"salt": salt, "hmac": api_key_digest(key, salt)}


def app_name_for(model_dir: str) -> str:
    """The Serve application name of a model folder: its run or sweep name, or an export's
    name and variant (``exports/<name>/<variant>``), as a URL path segment."""
    parts = model_dir.rstrip("/").replace(os.sep, "/").split("/")
    name = f"{parts[-2]}-{parts[-1]}" if len(parts) > 2 and parts[-3] == EXPORTS else model_name(model_dir)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def for_model(s: ServeConfig, model_dir: str) -> ServeConfig:
    """``s`` with its application name and route prefix filled in: by default the model's
    own name, and ``/<name>``."""
    name = s.app_name or app_name_for(model_dir)
    return dataclasses.replace(s, app_name=name, route_prefix=s.route_prefix or f"/{name}")


def build_application(
    model_dir: str, s: ServeConfig, loader: str | Callable = DEFAULT_LOADER, storage: StorageConfig | None = None
) -> "Application":
    """A Serve application for ``model_dir`` (a local folder, or an s3:// one with the
    ``storage`` settings to reach it) with the settings ``s``."""
    if model_dir.startswith("s3://"):
        fs, path = resolve_uri(model_dir, storage or StorageConfig())
        if fs.get_file_info(f"{path}/label_map.json").type == 0:  # pyarrow FileType.NotFound
            raise RaybmError(f"{model_dir}: not a model folder (no label_map.json)")
        target = model_dir
    else:
        check_model_files(model_dir, s.backend)  # a clear error now, not a replica failing to start
        target = os.path.abspath(model_dir)
    server = make_server_class().options(**deployment_options(s))
    stats = make_stats_class().bind(max(LOW_CONFIDENCE, s.min_confidence))  # the app's per-minute counts
    return server.bind(target, asdict(s), loader, read_api_key(s), asdict(storage) if storage else None, stats)


def build_app(args: dict[str, str]) -> "Application":
    """Serve application builder: ``serve run raybm.serve.app:build_app model=PATH
    [config=FILE] [loader=module:function] [key=value ...]`` (keys are serve.* settings)."""
    args = dict(args)
    if "model" not in args:
        raise RaybmError("build_app: pass model=<model folder>")
    model, config, loader = args.pop("model"), args.pop("config", None), args.pop("loader", DEFAULT_LOADER)
    cfg = load_config(config, [f"serve.{k}={v}" for k, v in args.items()])
    located = locate_model(model, cfg, flag="model=")
    return build_application(
        located, for_model(cfg.serve, located), loader, storage=cfg.storage if located.startswith("s3://") else None
    )
