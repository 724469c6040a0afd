"""/explain must not starve /predict: a replica's /predict latency alone, then beside
--explainers clients that ask /explain without pause.

    .venv/bin/python bench/explain_load.py [--model FOLDER] [--explainers 12] [--requests 200]

One run, one replica (1 torch thread, 1 CPU), the same model and texts throughout:
1. /predict alone: one client, --requests single-tweet requests one after another: p50, p95;
2. the same /predict client while --explainers clients each send /explain of one tweet,
   again and again, until it is done.
All load comes from a second process (its own GIL). Targets (the hardening issue): /predict
p50 under the explainers at most 2x its p50 alone; no 5xx at all, /explain included.
The default model is all-MiniLM-L6-v2 with a new head at max length 64 (bench/serve_load.py).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.abspath(__file__)


async def _load(url: str, texts: list[str], requests: int, explainers: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    codes: dict[str, dict[str, int]] = {"predict": {}, "explain": {}}
    done = asyncio.Event()

    def count(route: str, status) -> None:
        codes[route][str(status)] = codes[route].get(str(status), 0) + 1

    async def predictor(session):
        for i in range(requests):
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/predict", json={"texts": [texts[i % len(texts)]]}) as r:
                    await r.read()
                    count("predict", r.status)
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
            except aiohttp.ClientError as e:
                count("predict", type(e).__name__)
        done.set()

    async def explainer(session, k: int):
        i = k
        while not done.is_set():
            try:
                async with session.post(f"{url}/explain", json={"text": texts[i % len(texts)]}) as r:
                    await r.read()
                    count("explain", r.status)
            except aiohttp.ClientError as e:
                count("explain", type(e).__name__)
            i += explainers

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=explainers + 1), timeout=timeout) as s:
        await asyncio.gather(predictor(s), *(explainer(s, k) for k in range(explainers)))
    lat = sorted(latencies)

    def pct(q):
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    return {"explainers": explainers, "predict_p50_ms": pct(0.5), "predict_p95_ms": pct(0.95), "codes": codes}


def run_load(url: str, texts_file: str, requests: int, explainers: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            HERE,
            "--client",
            url,
            "--texts-file",
            texts_file,
            "--requests",
            str(requests),
            "--explainers",
            str(explainers),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a raybm model folder (default: MiniLM with a new head)")
    parser.add_argument("--explainers", type=int, default=12)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more settings, e.g. serve.inline_call_max_s=0"
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:  # the load-generating second process
        with open(args.texts_file) as f:
            texts = json.load(f)
        print(json.dumps(asyncio.run(_load(args.client, texts, args.requests, args.explainers))))
        return 0

    from serve_load import default_model, sample_texts

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="raybm-explain-bench-")
    model_dir = args.model or default_model(os.path.join(work, "model"))
    texts = [t[:280] for t in sample_texts(400)]  # tweets
    texts_file = os.path.join(work, "texts.json")
    with open(texts_file, "w") as f:
        json.dump(texts, f)

    import ray
    from ray import serve

    from raybm.config import build_config
    from raybm.serve.deploy import deploy

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    cfg = build_config(
        overrides=[
            f"serve.port={args.port}",
            "serve.torch_threads=1",
            "serve.cpus_per_replica=1",
            "serve.app_name=explained",
            *args.set,
        ]
    )
    url = deploy(cfg, model_dir)
    run_load(url, texts_file, 20, 0)  # warm-up
    alone = run_load(url, texts_file, args.requests, 0)
    loaded = run_load(url, texts_file, args.requests, args.explainers)
    serve.shutdown()
    ray.shutdown()

    ratio = loaded["predict_p50_ms"] / alone["predict_p50_ms"]
    fivexx = sum(
        n for route in loaded["codes"].values() for code, n in route.items() if not code.isdigit() or int(code) >= 500
    )
    print(json.dumps({"alone": alone, "loaded": loaded}))
    print(
        f"\n/predict p50 alone {alone['predict_p50_ms']} ms (p95 {alone['predict_p95_ms']}); beside "
        f"{args.explainers} /explain clients {loaded['predict_p50_ms']} ms (p95 {loaded['predict_p95_ms']}): "
        f"ratio {ratio:.2f} (target <= 2)"
    )
    print(f"answers under load: {loaded['codes']}; 5xx and connection errors: {fivexx} (target 0)")
    return 0 if ratio <= 2 and fivexx == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
