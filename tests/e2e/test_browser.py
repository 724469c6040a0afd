"""A real browser against the real dashboard: `raybm dashboard` on a free loopback port,
headless Chromium (driven by Playwright) opens the Try it page, submits a sentence, reads
the answer and saves a screenshot; opens the Live page of a real `raybm serve` after
traffic; and checks that the first page's tables (runs, pipelines) fit a 1,400-pixel window.

Runs from `make e2e` (it needs Debian's chromium and the playwright package); `make test`
skips it when either is missing.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make e2e)")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make e2e installs it)"),
]
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SHOTS = os.environ.get("RAYBM_E2E_ARTIFACTS", os.path.join(os.getcwd(), "e2e-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(root, *flags: str):
    """`raybm dashboard` over ``root`` on a free loopback port, once it answers: (process, URL)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "raybm.cli", "dashboard", "--root", str(root), "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    answers(proc, f"{url}/_stcore/health", "the dashboard", 60)
    return proc, url


def answers(proc, url: str, what: str, timeout: float) -> None:
    """Wait until ``url`` answers 200; fail with ``proc``'s output when it does not in time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"{what} did not start: {proc.stdout.read().decode()[-2000:]}")


@contextlib.contextmanager
def browser_page(url: str, width: int = 1400, height: int = 900):
    """A headless Chromium page open at ``url``."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()


@pytest.fixture
def dashboard(tmp_path, tiny_model_dir):
    run = tmp_path / "runs" / "browser-run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.yaml").write_text("model:\n  name: tiny-bert\n")
    (run / "metrics.json").write_text(json.dumps({"dataset": None, "test": None}))
    (run / "_SUCCESS").write_text("")
    # A pipeline as make demo leaves it (its summary, long URLs and all): the first page's
    # second table.
    summary = json.loads(open(os.path.join(ASSETS, "pipeline_summary.json")).read())
    pipeline = tmp_path / "pipelines" / summary["name"]
    pipeline.mkdir(parents=True)
    (pipeline / "summary.json").write_text(json.dumps(summary))
    (pipeline / "_SUCCESS").write_text("")
    proc, url = start_dashboard(tmp_path)
    yield url, run / "model"
    proc.terminate()
    proc.wait(timeout=30)


def test_try_it_in_a_real_browser(dashboard):
    from raybm.inference.loading import load_predictor

    url, model_dir = dashboard
    sentence = "what a wonderful, kind and helpful crew"
    model = load_predictor(str(model_dir))
    want = model.labels[int(model.predict([sentence])[0].argmax())]
    os.makedirs(SHOTS, exist_ok=True)
    with browser_page(url, 1280) as page:
        page.get_by_text("Try it", exact=True).click()
        page.get_by_label("One text per line").fill(sentence)
        page.get_by_role("button", name="Predict").click()
        answer = page.get_by_text("Answer:")
        answer.wait_for(timeout=60_000)
        text = answer.inner_text()
        page.screenshot(path=os.path.join(SHOTS, "try-it.png"), full_page=True)
    assert text.startswith("Answer: ") and f" {want} (" in text and text.endswith("%)")


@pytest.fixture
def served(tiny_model_dir, tmp_path):
    """`raybm serve` of the tiny model on a free loopback port (its own local Ray), with
    traffic sent to it: 20 requests of 3 texts and one a client gets wrong."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raybm.cli",
            "serve",
            "--model",
            tiny_model_dir,
            f"serve.port={port}",
            "serve.cpus_per_replica=0.25",
            "serve.app_name=tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}/tiny"
    answers(proc, f"{url}/healthz", "the model server", 180)

    def post(body: bytes) -> None:
        req = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30).read()
        except urllib.error.HTTPError:
            pass

    for i in range(20):
        post(json.dumps({"texts": [f"a fine day {i}", "the worst service", "ok"]}).encode())
    post(b'{"texts": []}')
    time.sleep(2)  # the counts reach the app's stats deployment
    yield url
    proc.send_signal(signal.SIGINT)  # as Ctrl-C: the server shuts Serve and its Ray down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_the_live_page_shows_the_traffic_a_real_server_got(tmp_path, served):
    proc, url = start_dashboard(tmp_path, "--serve-url", served)
    try:
        os.makedirs(SHOTS, exist_ok=True)
        with browser_page(url, 1400, 1000) as page:
            page.get_by_text("Live", exact=True).click()
            page.get_by_text("Requests per second", exact=True).wait_for(timeout=60_000)
            page.get_by_text("Traffic (requests per second)").wait_for(timeout=60_000)
            shown = page.locator('[data-testid="stMetricValue"]').all_inner_texts()
            page.screenshot(path=os.path.join(SHOTS, "live.png"), full_page=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(shown) == 5 and float(shown[0]) > 0, shown  # requests per second
    assert shown[1].endswith(" ms") and shown[3] == "0.0%", shown  # p50 latency; no server errors


def test_the_first_page_s_tables_fit_a_1400_pixel_window(dashboard):
    url, _ = dashboard
    with browser_page(url) as page:
        tables = page.locator('[data-testid="stDataFrame"]')
        tables.nth(1).wait_for(timeout=60_000)  # the runs and the pipelines
        boxes = [tables.nth(i).bounding_box() for i in range(tables.count())]
        overflow = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stDataFrame"] .dvn-scroller')]
                                    .map(e => e.scrollWidth - e.clientWidth)""")
        page.screenshot(path=os.path.join(SHOTS, "runs.png"), full_page=True)
    assert len(boxes) >= 2 and all(b["x"] + b["width"] <= 1400 for b in boxes), boxes
    assert len(overflow) >= 2 and max(overflow) <= 16, overflow  # no column out of sight (a scrollbar's width of slack)
