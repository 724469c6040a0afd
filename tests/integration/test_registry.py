"""MLflow's Model Registry with a real `mlflow server` (SQLite store, artifacts in a local
folder): registering a model folder with its export variants, and `models:/...` as the
model of raybm's commands. No Ray: registering and fetching are the driver's work."""

import json
import shutil

import numpy as np
import pytest

from raybm.cli import main
from raybm.config import build_config
from raybm.errors import RaybmError
from raybm.inference.loading import load_predictor
from raybm.inference.locate import locate_model
from raybm.tracking import mlflow_client
from raybm.tracking.registry import register_model, registered_name

pytestmark = pytest.mark.integration
TEXTS = ["what a lovely day", "the worst service ever"]


@pytest.fixture(scope="module")
def registry(mlflow_server, tiny_model_dir, tmp_path_factory):
    """A config on the test server, a results root, and the tiny model registered twice:
    version 1 with an export variant beside it, version 2 another folder."""
    root = tmp_path_factory.mktemp("registry-results")
    cfg = build_config(
        overrides=[
            f"storage.root={root}",
            f"tracking.mlflow_uri={mlflow_server}",
            "tracking.experiment=registry-tests",
            "model.name=tiny-bert",
        ]
    )
    run = root / "runs" / "tiny-run"
    shutil.copytree(tiny_model_dir, run / "model")
    variant = root / "exports" / "tiny-run" / "fp16"
    shutil.copytree(tiny_model_dir, variant)
    test = {"accuracy": 0.75, "f1_macro": 0.7, "per_class": {}}
    first = register_model(
        cfg,
        "tiny-classifier",
        str(run / "model"),
        str(run),
        test,
        {"fp16": str(variant)},
        tags={"raybm.dataset": "reviews-1234"},
    )
    other = root / "runs" / "other-run"
    shutil.copytree(tiny_model_dir, other / "model")
    second = register_model(cfg, "tiny-classifier", str(other / "model"), str(other), {"accuracy": 0.5})
    return cfg, root, run, first, second


def test_a_registered_version_holds_the_model_its_metrics_and_its_export_variants(registry):
    cfg, root, run, first, second = registry
    assert (first["version"], first["uri"], first["new"]) == (1, "models:/tiny-classifier/1", True)
    assert second["version"] == 2
    client = mlflow_client(cfg.tracking)
    version = client.get_model_version("tiny-classifier", "1")
    assert version.tags["test_f1_macro"] == "0.7" and version.tags["test_accuracy"] == "0.75"
    assert version.tags["raybm.dataset"] == "reviews-1234" and version.tags["raybm.base_model"] == "tiny-bert"
    assert version.tags["raybm.exports"] == "fp16" and version.tags["raybm.model"] == f"{run}/model"
    assert "test accuracy 0.7500, f1_macro 0.7000" in version.description
    files = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {"model/config.json", "model/label_map.json", "model/model.safetensors"} <= files
    assert "exports/fp16/model.safetensors" in {a.path for a in client.list_artifacts(version.run_id, "exports/fp16")}
    # No MLflow run recorded this folder (it was not trained with tracking on): one is made for it.
    run_info = client.get_run(version.run_id)
    assert run_info.data.tags["raybm.results"] == str(run) and run_info.data.tags["raybm.kind"] == "model"
    # The same folder again is the version it already has, not a new one.
    again = register_model(cfg, "tiny-classifier", str(run / "model"), str(run), {"accuracy": 0.75})
    assert (again["version"], again["new"]) == (1, False)
    assert len(client.search_model_versions("name = 'tiny-classifier'")) == 2


def test_models_uris_are_models_every_command_can_take(registry, tiny_model_dir, capsys):
    cfg, root, _, _, _ = registry
    located = locate_model("models:/tiny-classifier/1", cfg)
    assert located == str(root / "registry" / "tiny-classifier-v1" / "model")
    assert (root / "registry" / "tiny-classifier-v1" / "model" / "_SUCCESS").exists()
    want = load_predictor(tiny_model_dir).predict(TEXTS)
    np.testing.assert_allclose(load_predictor(located).predict(TEXTS), want, atol=1e-6)
    assert locate_model("models:/tiny-classifier/1", cfg, shared=True) == located  # as export, serve, soup ask
    assert locate_model("models:/tiny-classifier/latest", cfg).endswith("tiny-classifier-v2/model")
    client = mlflow_client(cfg.tracking)
    client.set_registered_model_alias("tiny-classifier", "champion", "1")
    assert locate_model("models:/tiny-classifier@champion", cfg) == located
    # The CLI: predict with the registered model (fetched once: the folder is reused).
    overrides = [f"storage.root={root}", f"tracking.mlflow_uri={cfg.tracking.mlflow_uri}"]
    assert main(["predict", "--model", "models:/tiny-classifier/1", "--text", TEXTS[0], *overrides]) == 0
    printed = capsys.readouterr().out
    assert TEXTS[0] in printed and any(label in printed for label in ("negative", "positive"))


def test_a_registered_model_that_is_not_there_is_a_clear_error(registry, tmp_path):
    cfg, root, _, _, _ = registry
    with pytest.raises(RaybmError, match="has versions 1, 2"):
        locate_model("models:/tiny-classifier/7", cfg)
    with pytest.raises(RaybmError, match="no registered model 'nobody'"):
        locate_model("models:/nobody/1", cfg)
    with pytest.raises(RaybmError, match="name a registered model as models:/<name>/<version>"):
        locate_model("models:/tiny-classifier/one", cfg)
    with pytest.raises(RaybmError, match="needs MLflow: set tracking.mlflow_uri"):
        locate_model("models:/tiny-classifier/1", build_config(overrides=[f"storage.root={root}"]))
    assert not (root / "registry" / "tiny-classifier-v7").exists()


def test_the_registered_name_is_the_setting_or_the_data_source_s(registry):
    cfg, *_ = registry
    assert registered_name(cfg, "twitter") == "twitter-classifier"
    assert registered_name(build_config(overrides=["data.name=my-reviews"]), "csv") == "my-reviews"
    assert registered_name(build_config(overrides=["tracking.registered_model=sentiment"]), "x") == "sentiment"
    with pytest.raises(RaybmError, match="registered model name 'a/b'"):
        registered_name(build_config(overrides=["tracking.registered_model=a/b"]), "x")
    assert json.loads(json.dumps(cfg.to_dict()))["tracking"]["register"] is True
