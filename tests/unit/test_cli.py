"""The CLI as a user runs it: a subprocess, exit codes and messages, no tracebacks."""

import subprocess
import sys

import yaml


def run(*args):
    return subprocess.run([sys.executable, "-m", "raybm.cli", *args], capture_output=True, text=True, timeout=120)


def test_config_prints_the_resolved_config():
    out = run("config", "--config", "jobs/configs/demo.yaml", "train.lr=3e-5")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["lr"] == 3e-5 and resolved["data"]["source"] == "twitter-sentiment"


def test_describe_lists_keys_with_docs():
    out = run("config", "--describe")
    assert out.returncode == 0
    assert "data.clean.stop_words = false" in out.stdout and "negations" in out.stdout


def test_bad_override_is_a_one_line_error_without_traceback():
    out = run("data", "--config", "jobs/configs/demo.yaml", "data.max_lenght=64")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "data.max_lenght: unknown key. Did you mean 'data.max_length'?" in out.stderr


def test_missing_source_fails_before_starting_ray(tmp_path):
    out = run("data", f"storage.root={tmp_path}", f"data.source={tmp_path}/nope.csv")
    assert out.returncode == 2 and "no such file or folder" in out.stderr
    assert "Traceback" not in out.stderr
    assert "running on" not in out.stdout  # Ray never started


def test_missing_distillation_teacher_fails_before_starting_ray(tmp_path):
    for command in ("train", "pipeline"):
        out = run(command, f"storage.root={tmp_path}", f"train.distill_from={tmp_path}/teacher")
        assert out.returncode == 2 and f"train.distill_from={tmp_path}/teacher: no model.safetensors" in out.stderr
        assert "running on" not in out.stdout and "Traceback" not in out.stderr
        assert not (tmp_path / "data").exists()  # no data stage either


def test_soup_mistakes_fail_before_starting_ray(tmp_path):
    # Overrides after --models are overrides, not models: storage.root reaches the config.
    out = run("soup", "--data", "reviews", "--name", "s", "--models", "a", "b", f"storage.root={tmp_path}")
    assert out.returncode == 2 and f"no prepared dataset of that name under {tmp_path}/data" in out.stderr
    assert "running on" not in out.stdout and "Traceback" not in out.stderr
    out = run("soup", "--data", "reviews", "--name", "s", "--models", "a", f"storage.root={tmp_path}")
    assert out.returncode == 2 and "at least two models" in out.stderr
    out = run("soup", "--data", "reviews", "--name", "s", "--models", "a", "b", "tune.metric=val_loss")
    assert out.returncode == 2 and "classification score" in out.stderr


def test_config_reference_doc_is_current():
    from pathlib import Path

    from raybm.commands.browse import describe_text

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == describe_text(markdown=True), (
        "regenerate: raybm config --describe --markdown > docs/config.md"
    )


def test_predict_texts_one_json_line_each(tiny_model_dir):
    import json

    out = run(
        "predict", "--model", tiny_model_dir, "--text", "what a lovely day", "--text", "awful", "--max-length", "32"
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(ln) for ln in out.stdout.strip().splitlines()[-2:]]
    assert [ln["text"] for ln in lines] == ["what a lovely day", "awful"]
    assert all(ln["label"] in ("negative", "positive") and 0.5 <= ln["confidence"] <= 1 for ln in lines)
    assert all(ln["answer"].endswith(f"{ln['label']} ({ln['confidence']:.1%})") for ln in lines)
    # --explain: each word's weight toward the answer, and how it was measured
    out = run("predict", "--model", tiny_model_dir, "--text", "what a lovely day", "--explain")
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert [w["word"] for w in line["words"]] == ["what", "a", "lovely", "day"] and "occlusion" in line["method"]
    out = run("predict", "--model", tiny_model_dir, "--input", "x.csv", "--output", "y.csv", "--explain")
    assert out.returncode == 2 and "--explain works with --text" in out.stderr


def test_predict_needs_text_or_files(tiny_model_dir, tmp_path):
    out = run("predict", "--model", tiny_model_dir)
    assert out.returncode == 2 and "give --text" in out.stderr
    out = run("predict", "--model", str(tmp_path), "--text", "hi")
    assert out.returncode == 2 and "not a model folder" in out.stderr and "Traceback" not in out.stderr


def test_predict_takes_a_run_folder_or_a_run_name_like_serve(tiny_model_dir, tmp_path):
    import json
    import shutil

    from raybm.config import build_config
    from raybm.inference.locate import locate_model
    from raybm.inference.predict import predict_texts

    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "r1" / "model")
    cfg = build_config(overrides=[f"storage.root={tmp_path}"])
    assert locate_model(str(tmp_path / "runs" / "r1"), cfg) == str(tmp_path / "runs" / "r1" / "model")
    by_name = run("predict", "--model", "r1", f"storage.root={tmp_path}", "--text", "nice", "--max-length", "32")
    assert by_name.returncode == 0, by_name.stderr
    ((label, confidence),) = predict_texts(tiny_model_dir, ["nice"], max_length=32)
    answer = json.loads(by_name.stdout.strip().splitlines()[-1])
    assert answer["label"] == label and answer["confidence"] == round(confidence, 4)
    out = run("evaluate", "--checkpoint", "r2", "--data", "d", f"storage.root={tmp_path}")
    assert out.returncode == 2 and "--checkpoint 'r2': not a model folder" in out.stderr
    assert f"run/sweep name under {tmp_path}" in out.stderr


def test_serve_refuses_what_it_cannot_do_before_starting_ray(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = run("serve", "--model", str(tmp_path))
    assert out.returncode == 2 and "not a model folder" in out.stderr and "Traceback" not in out.stderr
    out = run("serve", "--model", tiny_model_dir, "--detach")
    assert out.returncode == 2 and "--detach leaves the server running on a Ray cluster" in out.stderr
    monkeypatch.delenv("RAYBM_NO_SUCH_KEY", raising=False)
    out = run("serve", "--model", tiny_model_dir, "serve.api_key_env=RAYBM_NO_SUCH_KEY")
    assert out.returncode == 2 and "set the environment variable RAYBM_NO_SUCH_KEY" in out.stderr
    out = run("serve", "--config", "jobs/configs/demo.yaml", f"storage.root={tmp_path}")
    assert out.returncode == 2 and "run `raybm tune --config ...` first" in out.stderr


def test_evaluate_output_in_a_missing_folder_fails_before_starting_ray(tmp_path, tiny_model_dir):
    out = run(
        "evaluate",
        "--checkpoint",
        tiny_model_dir,
        "--data",
        "twitter-sentiment",
        f"storage.root={tmp_path}",
        "--output",
        f"{tmp_path}/no/metrics.json",
    )
    assert out.returncode == 2 and f"the folder {tmp_path}/no does not exist" in out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stderr
    out = run(
        "evaluate",
        "--checkpoint",
        tiny_model_dir,
        "--data",
        "twitter-sentiment",
        f"storage.root={tmp_path}",
        "--predictions",
        f"{tmp_path}/p.xlsx",
    )
    assert (
        out.returncode == 2 and "--predictions" in out.stderr and "use a .csv, .tsv, .jsonl or .parquet" in out.stderr
    )
    assert "Started a local Ray" not in out.stderr


def test_a_model_that_cannot_load_fails_before_starting_ray(tmp_path):
    import os

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("not a model")
    out = run("train", f"storage.root={tmp_path}", f"model.name={not_a_model}")
    assert out.returncode == 2 and f"no config.json in {not_a_model}" in out.stderr
    assert "running on" not in out.stdout and "Traceback" not in out.stderr
    offline = subprocess.run(
        [
            sys.executable,
            "-m",
            "raybm.cli",
            "pipeline",
            f"storage.root={tmp_path}",
            "model.name=no-such-org/no-such-model",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert offline.returncode == 2, offline.stderr[-2000:]
    assert "cannot load the tokenizer of model 'no-such-org/no-such-model'" in offline.stderr
    assert "built-in model (all-minilm-l6-v2)" in offline.stderr and "Traceback" not in offline.stderr
    assert not (tmp_path / "data").exists()


def test_deploy_alone_without_a_trained_model_fails_before_starting_ray(tmp_path):
    out = run("pipeline", "--stages", "export,deploy", f"storage.root={tmp_path}", "data.source=twitter-sentiment")
    assert out.returncode == 2 and "no finished model for this config" in out.stderr
    assert "add the train stage (--stages train,...)" in out.stderr
    assert "running on" not in out.stdout and "Traceback" not in out.stderr


def test_list_shows_runs_and_sweeps_best_test_score_first(tmp_path):
    import json

    def job(kind, name, f1, done=True):
        folder = tmp_path / kind / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny-bert"}}))
        test = {"accuracy": f1 + 0.01, "f1_macro": f1}
        if kind == "runs":
            (folder / "metrics.json").write_text(json.dumps({"dataset": "d1", "test": test}))
        else:
            (folder / "winner.json").write_text(
                json.dumps({"dataset": "d1", "test": test, "metric": "val_f1_macro", "validation": 0.5})
            )
        if done:
            (folder / "_SUCCESS").write_text("")

    job("runs", "weak", 0.61)
    job("sweeps", "best-sweep", 0.93)
    job("runs", "half-done", 0.0, done=False)
    (tmp_path / "runs" / "half-done" / "metrics.json").unlink()
    out = run("list", "--root", str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.split()[:1] in (["run"], ["sweep"])]
    assert [r[1] for r in rows] == ["best-sweep", "weak", "half-done"]
    assert rows[0][-2:] == ["0.9400", "0.9300"] and rows[2][2] == "incomplete"
    assert run("list", "--root", str(tmp_path / "empty")).stdout.startswith("nothing under")


def test_version_names_raybm_and_the_libraries_it_runs_on():
    from importlib.metadata import version

    import raybm

    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.startswith(f"raybm {raybm.__version__} (ray {version('ray')}, torch {version('torch')}")


def test_the_shipped_streamlit_settings_match_what_raybm_dashboard_passes():
    from pathlib import Path

    import tomllib

    from raybm.dashboard.pages import STREAMLIT_SETTINGS

    shipped = tomllib.loads((Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml").read_text())
    flat = {f"{section}.{key}": value for section, keys in shipped.items() for key, value in keys.items()}
    assert flat == STREAMLIT_SETTINGS
    assert STREAMLIT_SETTINGS["client.showErrorDetails"] == "none" and STREAMLIT_SETTINGS["server.maxUploadSize"] <= 5


# Not installed, as Python sees it: importing them fails, and importlib.util.find_spec
# (what raybm and transformers look with) finds nothing.
BLOCKED_EXTRAS = (
    "import sys\n"
    "for name in ('fastapi', 'streamlit', 'onnx', 'captum', 'prometheus_client'):\n"
    "    sys.modules[name] = None\n"
    "from raybm.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_without_extras(*args):
    """The CLI on an install without the serve, export and dashboard extras."""
    return subprocess.run([sys.executable, "-c", BLOCKED_EXTRAS, *args], capture_output=True, text=True, timeout=120)


def test_a_command_whose_extra_is_not_installed_says_the_pip_line_and_training_needs_none(tmp_path, tiny_model_dir):
    for args, extra in (
        (["serve", "--model", tiny_model_dir], "serve"),
        (["dashboard", "--root", str(tmp_path)], "dashboard"),
        (["export", "--model", tiny_model_dir, "--variants", "onnx-int8", f"storage.root={tmp_path}"], "export"),
        (["predict", "--model", tiny_model_dir, "--text", "great", "--explain"], "serve"),
        (["pipeline", "--config", "jobs/configs/demo.yaml", f"storage.root={tmp_path}"], "serve"),
    ):
        out = run_without_extras(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert f"pip install 'raybm[{extra}]'" in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    out = run_without_extras("predict", "--model", tiny_model_dir, "--text", "great")  # core: no extra needed
    assert out.returncode == 0, out.stderr[-2000:]
    assert run_without_extras("config", "--config", "jobs/configs/demo.yaml").returncode == 0


def test_a_finished_pipeline_says_how_to_use_the_model_it_handed_on():
    from raybm.commands.stages import _next_steps
    from raybm.config import build_config
    from raybm.storage.records import PipelineSummary

    said: list[str] = []
    cfg = build_config(overrides=["storage.root=/r"])
    _next_steps(cfg, PipelineSummary(stages={"tune": {"model": "/r/sweeps/s/model"}}), said.append)
    assert "  raybm serve --model /r/sweeps/s/model" in said and any("--root /r" in line for line in said)
    said.clear()
    _next_steps(cfg, PipelineSummary(stages={"data": {}}), said.append)  # no model: only the dashboard
    assert not any("--model" in line for line in said)
