"""The dashboard, driven by Streamlit's own test harness over a results folder written by
a real tiny sweep (two trials, one stopped by ASHA) and a real export."""

import json
import os

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from raybm.config import build_config
from raybm.export.variants import run_export
from raybm.inference.loading import load_predictor
from raybm.inference.predict import in_words
from raybm.tune.sweep import run_sweep
from tests.helpers import make_frame

pytestmark = pytest.mark.integration

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dashboards", "app.py")


@pytest.fixture(scope="module")
def results(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("dash-results")
    data = root / "reviews.csv"
    make_frame(60).to_csv(data, index=False)
    cfg = build_config(
        overrides=[
            f"storage.root={root}",
            f"data.source={data}",
            "data.text_column=body",
            "data.label_column=sentiment",
            "data.max_length=16",
            "model.name=tiny-bert",
            "train.batch_size=16",
            "train.warmup_ratio=0",
            "train.log_every_steps=100",
            "train.cpus_per_worker=0.5",
            "train.epochs=2",
            "tune.max_concurrent_trials=1",
            "tune.num_samples=1",
            "tune.grace_period=1",
            "name=dash-sweep",
            "tune.soup=uniform",
            "tune.max_latency_ms=1000",
            "tune.search_space={train.lr: 'grid([3e-3, 1e-12])'}",
        ]
    )
    sweep = run_sweep(cfg, log=lambda _: None)
    run_export(cfg, "dash-sweep", ["onnx-int8"], log=lambda _: None)
    return {"root": str(root), "sweep": sweep}


def app(monkeypatch, root, page, serve_url=None):
    monkeypatch.setenv("RAYBM_RESULTS", root)
    if serve_url:
        monkeypatch.setenv("RAYBM_SERVE_URL", serve_url)
    else:
        monkeypatch.delenv("RAYBM_SERVE_URL", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.sidebar.radio[0].set_value(page).run()
    assert not at.exception, at.exception
    return at


def test_jobs_sweep_and_model_pages_show_the_run(monkeypatch, results):
    at = app(monkeypatch, results["root"], "Runs and sweeps")
    jobs = at.dataframe[0].value
    assert list(jobs["name"]) == ["dash-sweep"] and jobs["status"][0] == "complete"
    assert list(jobs.columns[:4]) == ["name", "test accuracy", "test macro-F1", "best validation"]  # scores first
    winner = results["sweep"].winner
    assert jobs["test accuracy"][0] == pytest.approx(winner.test["accuracy"])

    at.button(key="open_sweep").click().run()  # the list links into the sweep's page
    assert at.sidebar.radio[0].value == "Sweep" and at.selectbox(key="sweep").value == ("sweeps", "dash-sweep")
    board = at.dataframe[0].value
    assert len(board) == 2 and set(board["train.lr"]) == {3e-3, 1e-12}
    assert any("uniform soup" in i.value and "2 trial(s)" in i.value for i in at.info)  # what was handed on
    assert len(at.get("vega_lite_chart")) == 4  # cost vs metric, lr vs metric, metric curves, loss curves
    assert any(h.value.startswith("Serving cost against") for h in at.subheader)
    assert results["sweep"].winner.latency_budget["met"]  # a tiny model is far within 1 s
    assert any("Latency budget 1000.0 ms" in c.value and "best of the 2 trial(s)" in c.value for c in at.caption)
    statuses = dict(zip(board["train.lr"], board["status"]))
    assert statuses[3e-3] == "completed"
    stopped = at.dataframe[1].value if statuses[1e-12] == "stopped" else None
    if stopped is not None:  # ASHA stopped the lr=1e-12 trial after its first epoch
        assert list(stopped["epochs_run"]) == [1]

    at.sidebar.radio[0].set_value("Model").run()
    assert any("uniform model soup" in c.value for c in at.caption)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["accuracy"] == f"{winner.test['accuracy']:.4f}"
    assert metrics["macro-F1"] == f"{winner.test['f1_macro']:.4f}"
    per_class = at.dataframe[0].value
    assert list(per_class["class"]) == ["neg", "pos"]
    assert len(at.get("vega_lite_chart")) == 2  # confusion matrix, label distribution
    tables = [d.value for d in at.dataframe]
    assert any("onnx-int8" in list(t.get("variant", [])) for t in tables)  # export variants
    tokens = next(t for t in tables if "statistic" in t)  # the data report's token lengths
    assert "p95" in list(tokens["statistic"])


def test_errors_page_filters_and_moves_the_threshold(monkeypatch, results):
    at = app(monkeypatch, results["root"], "Errors")
    preds = pd.read_parquet(os.path.join(results["root"], "sweeps", "dash-sweep", "test_predictions.parquet"))
    wrong = int((preds["label"] != preds["pred"]).sum())
    assert at.markdown[0].value == f"{wrong} of {len(preds)} test examples misclassified."
    metrics = {m.label: float(m.value) for m in at.metric}
    y, p = preds["label"].to_numpy(), preds["prob_1"].to_numpy()
    assert metrics["recall"] == pytest.approx(((p >= 0.5) & (y == 1)).sum() / (y == 1).sum(), abs=1e-3)
    at.slider(key="threshold").set_value(0.95).run()
    high = {m.label: float(m.value) for m in at.metric}
    assert high["recall"] <= metrics["recall"]
    assert high["recall"] == pytest.approx(((p >= 0.95) & (y == 1)).sum() / (y == 1).sum(), abs=1e-3)


def test_try_it_predicts_typed_and_uploaded_text_and_explains_bad_input(monkeypatch, results):
    # A configured server that does not answer: the page says so and uses the model itself.
    at = app(monkeypatch, results["root"], "Try it", serve_url="http://127.0.0.1:9")
    assert "does not answer" in at.warning[0].value
    # Models by what they do and how good they are; the technical name beside.
    titles = at.selectbox(key="try_model").options
    assert all("2 classes, " in t and "% right on held-out test texts (" in t for t in titles), titles
    at.selectbox(key="try_model").set_value("dash-sweep (sweep)").run()
    assert "Technical name: dash-sweep (sweep)" in [c.value for c in at.caption]
    typed = ["I really liked item number 3, great stuff", "Item 4 was a disappointment, avoid"]
    at.text_area(key="try_text").set_value("\n".join(typed))
    at.button(key="try_go").click().run()
    out = at.dataframe[0].value
    model = load_predictor(os.path.join(results["root"], "sweeps", "dash-sweep", "model"))
    probs = model.predict(typed)
    assert list(out["label"]) == [model.labels[i] for i in probs.argmax(1)]
    assert list(out["confidence"]) == pytest.approx(probs.max(1).tolist(), abs=1e-5)
    assert list(out["answer"]) == [in_words(model.labels[i], float(p.max())) for i, p in zip(probs.argmax(1), probs)]
    knows = f"This model knows only {model.labels[0]} and {model.labels[1]}: every text gets one of them"
    assert any(c.value.startswith(knows) for c in at.caption), [c.value for c in at.caption]

    # One text: the answer in words, and why (its words highlighted by their weight).
    at.text_area(key="try_text").set_value(typed[0])
    at.button(key="try_go").click().run()
    assert at.success[-1].value == f"Answer: {list(out['answer'])[0]}"
    assert any(m.value.startswith("**Why:**") for m in at.markdown)
    assert any('<span style="background: rgba(' in m.value and ">liked</span>" in m.value for m in at.markdown)

    at.button(key="try_go").run()  # nothing typed is a hint, not an error
    at.text_area(key="try_text").set_value("   ").run()
    at.button(key="try_go").click().run()
    assert "Type at least one line" in at.warning[-1].value

    csv = 'id,review\n1,"I really liked item number 8, great stuff"\n2,"Item 9 was a disappointment, avoid"\n'
    at.file_uploader(key="try_file").set_value(("reviews.csv", csv.encode(), "text/csv")).run()
    at.selectbox(key="try_column").set_value("review").run()
    at.button(key="try_file_go").click().run()
    labelled = at.dataframe[-1].value
    uploaded = ["I really liked item number 8, great stuff", "Item 9 was a disappointment, avoid"]
    assert list(labelled["text"]) == uploaded
    assert list(labelled["label"]) == [model.labels[i] for i in model.predict(uploaded).argmax(1)]
    assert at.get("download_button")

    at.file_uploader(key="try_file").set_value(("empty.csv", b"text\n", "text/csv")).run()
    assert "empty.csv has no rows" in at.error[-1].value
    gaps = 'text\nI really liked item number 8\n""\nItem 9 was a disappointment\n'
    at.file_uploader(key="try_file").set_value(("gaps.csv", gaps.encode(), "text/csv")).run()
    at.button(key="try_file_go").click().run()
    assert "empty on line(s) [3]" in at.error[-1].value
    at.file_uploader(key="try_file").set_value(("bad.jsonl", b"{not json\n", "application/json")).run()
    assert "could not be read as JSONL" in at.error[-1].value
    big = "text\n" + "\n".join(f"line {i}" for i in range(5001))
    at.file_uploader(key="try_file").set_value(("big.csv", big.encode(), "text/csv")).run()
    assert "more than 5000 rows; the limit here is 5000 rows" in at.error[-1].value
    huge = b"text\n" + b"x" * (5 * 1024 * 1024)  # over the size cap, whatever Streamlit's own setting
    at.file_uploader(key="try_file").set_value(("huge.csv", huge, "text/csv")).run()
    assert "huge.csv is 5.0 MB; the limit here is 5000 rows and 5 MB" in at.error[-1].value
    long = "text\nshort and fine\n" + "y" * 2001 + "\n"
    at.file_uploader(key="try_file").set_value(("long.csv", long.encode(), "text/csv")).run()
    at.button(key="try_file_go").click().run()
    assert "texts over 2000 characters on line(s) [3]" in at.error[-1].value
    assert not at.exception


def test_a_page_that_fails_shows_one_line_and_no_traceback(monkeypatch, results):
    from raybm.dashboard import data as dashboard_data

    def broken(self):
        raise KeyError("/secret/path/in/the/message")

    monkeypatch.setattr(dashboard_data.DashboardData, "models", broken)
    at = app(monkeypatch, results["root"], "Try it")
    assert not at.exception  # nothing reaches Streamlit's own error display
    assert at.error[-1].value.startswith("This page could not be shown (KeyError)")
    assert "/secret/path" not in at.error[-1].value


def test_only_listed_names_are_read(results):
    from raybm.dashboard.data import DashboardData
    from raybm.errors import RaybmError

    data = DashboardData(results["root"])
    assert data.names("sweeps") == ["dash-sweep"]
    for bad in ("../../etc", "/etc", "dash-sweep/../../x"):
        with pytest.raises(RaybmError, match="no sweep named"):
            data.sweep(bad)
    assert json.dumps(data.exports("dash-sweep")["variants"]["onnx-int8"]["backend"]) == '"onnx"'


def test_the_dashboard_reads_a_results_root_on_s3(monkeypatch, results, s3_server):
    import boto3
    import pyarrow.fs as pafs

    from raybm.config import StorageConfig
    from raybm.dashboard.data import DashboardData
    from raybm.storage.fs import s3_filesystem

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="dash-bucket")
    storage = StorageConfig(root="s3://dash-bucket/results", s3_endpoint_url=s3_server)
    pafs.copy_files(
        results["root"],
        "dash-bucket/results",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=s3_filesystem(storage),
    )
    data = DashboardData(storage.root, storage)
    assert data.names("sweeps") == ["dash-sweep"]
    assert len(data.sweep("dash-sweep")["leaderboard"]) == 2
    assert len(data.predictions("sweeps", "dash-sweep")) == 12

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # how the app finds the S3 endpoint
    at = app(monkeypatch, "s3://dash-bucket/results", "Runs and sweeps")
    assert list(at.dataframe[0].value["name"]) == ["dash-sweep"]
    at.sidebar.radio[0].set_value("Model").run()
    assert {m.label for m in at.metric} >= {"accuracy", "macro-F1"}


@pytest.fixture
def stats_server():
    """A real HTTP server on loopback answering GET /stats as a model server does, from
    recorded traffic: half the texts 'positive' against a training split of 90% 'negative'."""
    import http.server
    import threading
    import time

    from raybm.metrics import drift_reference
    from raybm.serve.watch import Minutes, summarize

    minutes = Minutes()
    now = time.time()
    for i in range(40):
        minutes.record(
            500 if i == 0 else 200,
            5.0 + i % 10,
            [("positive" if i % 2 else "negative", 0.55 + i / 100)],
            [i % 5],
            now=now - 120 + i,
        )
    reference = drift_reference(
        "reviews-1", {"negative": 90, "positive": 10}, {"p50": 10, "p90": 20, "p95": 25, "p99": 40}
    )
    body = json.dumps({"model": "dash-sweep", **summarize(minutes.export(), reference)}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/stats" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_live_page_shows_traffic_latency_errors_and_drift(monkeypatch, results, stats_server):
    at = app(monkeypatch, results["root"], "Live", serve_url=stats_server)
    shown = {m.label: m.value for m in at.metric}
    assert shown["Error rate"] == "2.5%" and shown["Latency p50"].endswith(" ms")
    assert float(shown["Requests per second"]) == pytest.approx(40 / 300, abs=0.01)
    assert "Drift: today's texts do not look like the training data (reviews-1)" in at.error[0].value
    assert len(at.get("vega_lite_chart")) == 4  # traffic, latency, label mix, low confidence

    quiet = app(monkeypatch, results["root"], "Live")
    assert "--serve-url" in quiet.info[0].value
    down = app(monkeypatch, results["root"], "Live", serve_url="http://127.0.0.1:9")  # nothing listens there
    assert "No model server answers at http://127.0.0.1:9" in down.info[0].value and "raybm serve" in down.info[0].value
    assert not down.warning and "Errno" not in down.info[0].value


def test_raybm_dashboards_own_script_shows_the_pages(monkeypatch, results):
    # `raybm dashboard` runs raybm/dashboard/pages.py itself (not dashboards/app.py): it must
    # draw the pages too, not just define them.
    import raybm.dashboard.pages as pages

    monkeypatch.setenv("RAYBM_RESULTS", results["root"])
    monkeypatch.delenv("RAYBM_SERVE_URL", raising=False)
    at = AppTest.from_file(pages.__file__, default_timeout=60)
    at.run()
    assert not at.exception and at.title[0].value == "Runs and sweeps"
