"""The pipeline's pieces that need no Ray: the release gate, what is served, the summary
and how the dashboard reads it."""

import pytest

from raybm.config import build_config
from raybm.errors import RaybmError
from raybm.pipeline import _Summary, release_gate, serving_folder
from raybm.storage.layout import SUMMARY_FILE
from raybm.storage.results import Results

TEST = {"accuracy": 0.9, "f1_macro": 0.85}


def test_release_gate_names_every_reason():
    cfg = build_config(overrides=["pipeline.min_test_f1=0.88", "pipeline.max_latency_ms=20"])
    assert release_gate(cfg, {"f1_macro": 0.9}, 12.0) == []
    reasons = release_gate(cfg, TEST, 31.5)
    assert reasons == [
        "test macro-F1 0.8500 < pipeline.min_test_f1 0.88",
        "median latency 31.5 ms > pipeline.max_latency_ms 20.0",
    ]
    assert release_gate(cfg, None, 1.0) == ["no test metrics for this model"]
    assert release_gate(build_config({}), TEST, 999.0) == []  # no gate configured


def test_served_folder_follows_the_backend_and_the_exports():
    state = {"model": "/r/sweeps/s/model", "export": "/r/exports/s"}
    onnx = build_config(overrides=["export.variants=[onnx, onnx-int8]"])
    assert serving_folder(onnx, state) == ("/r/exports/s/onnx-int8", "onnx")
    assert serving_folder(build_config(overrides=["export.variants=[fp16]"]), state) == ("/r/sweeps/s/model", "torch")
    assert serving_folder(build_config(overrides=["serve.backend=int8"]), state) == ("/r/sweeps/s/model", "int8")
    with pytest.raises(RaybmError, match="needs an ONNX export"):
        serving_folder(build_config(overrides=["serve.backend=onnx", "export.variants=[hf]"]), state)


def test_summary_is_written_per_stage_and_read_by_the_dashboard(tmp_path):
    from raybm.dashboard.data import DashboardData, stages_in_brief

    cfg = build_config(overrides=[f"storage.root={tmp_path}", "pipeline.min_test_f1=0.9"])
    results = Results.from_config(cfg.storage)
    summary = _Summary(results, "p1", cfg, ["data", "train", "deploy"])
    summary.stage("data", {"status": "skipped", "seconds": 0.1})
    running = results.read_json(results.join(summary.folder, SUMMARY_FILE))
    assert running["status"] == "running" and list(running["stages"]) == ["data"]
    summary.stage("train", {"status": "done", "seconds": 12.0, "test": TEST})
    summary.stage("deploy", {"status": "held", "seconds": 0.2, "reasons": ["test macro-F1 0.8500 < 0.9"]})
    summary.record.seconds = 90
    summary.finish("succeeded")
    assert results.is_complete(summary.folder)

    frame = DashboardData(str(tmp_path)).pipelines_frame()
    row = frame.iloc[0].to_dict()
    assert row["name"] == "p1" and row["status"] == "succeeded"
    assert row["stages"] == "1 done; skipped: data; held: deploy"
    assert stages_in_brief({k: {"status": "done"} for k in ("data", "train", "deploy")}) == "all 3 done"
    assert row["test macro-F1"] == 0.85 and row["deploy"] == "held"
    assert row["gate"] == "test macro-F1 0.8500 < 0.9" and row["minutes"] == 1.5


@pytest.mark.parametrize("model", ["tiny-bert", "all-minilm-l6-v2", "textcnn"])
def test_the_checks_before_ray_starts_never_import_transformers_modelling_code(tmp_path, model):
    # The checks every command runs first (a job that fails them should fail fast) load the
    # model's tokenizer at most: not transformers' modelling code and raybm's architectures
    # (2-3 s with torch). Tiny and baseline models need not even torch here. A setting that
    # needs the model's layers (here none) is the exception: it builds a skeleton.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from raybm.config import build_config\n"
        "from raybm.preflight import preflight\n"
        f"cfg = build_config(overrides=['storage.root={tmp_path}', 'data.source=twitter-sentiment', "
        f"'model.name={model}'])\n"
        "preflight(cfg, ['data', 'train'])\n"
        "heavy = [m for m in ('transformers.modeling_utils', 'raybm.models.build') if m in sys.modules]\n"
        f"heavy += ['torch'] * ('torch' in sys.modules and {model!r} != 'all-minilm-l6-v2')\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
