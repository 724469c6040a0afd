"""A real browser against the real dashboard: `raybm dashboard` on a free loopback port,
headless Chromium (driven by Playwright) opens the Try it page, submits a sentence, reads
the prediction and saves a screenshot.

Runs from `make e2e` (it needs Debian's chromium and the playwright package); `make test`
skips it when either is missing.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make e2e)")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make e2e installs it)")]
SHOTS = os.environ.get("RAYBM_E2E_ARTIFACTS", os.path.join(os.getcwd(), "e2e-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dashboard(tmp_path, tiny_model_dir):
    run = tmp_path / "runs" / "browser-run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.yaml").write_text("model:\n  name: tiny-bert\n")
    (run / "metrics.json").write_text(json.dumps({"dataset": None, "test": None}))
    (run / "_SUCCESS").write_text("")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "raybm.cli", "dashboard", "--root", str(tmp_path),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the dashboard did not start: {proc.stdout.read().decode()[-2000:]}")
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
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_text("Try it", exact=True).click()
        page.get_by_label("One text per line").fill(sentence)
        page.get_by_role("button", name="Predict").click()
        answer = page.get_by_text("Answer:")
        answer.wait_for(timeout=60_000)
        text = answer.inner_text()
        page.screenshot(path=os.path.join(SHOTS, "try-it.png"), full_page=True)
        browser.close()
    assert text.startswith("Answer: ") and f" {want} (" in text and text.endswith("%)")
