"""Export variants of a tiny trained model; each loads and predicts like the reference."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from raybm.config import build_config
from raybm.errors import RaybmError
from raybm.export.trained import sparsity
from raybm.export.variants import run_export
from raybm.inference.loading import load_predictor
from raybm.train.driver import run_training
from tests.helpers import make_frame

pytestmark = pytest.mark.integration

# In the training rows' own two templates (make_frame), with item numbers the training never saw:
# the tiny reference learns those templates, not English, so a probe worded otherwise ("avoid it"
# at the end) was once labelled at random, and CI failed on the reference, not on an export.
PROBES = [
    text
    for i in range(101, 105)
    for text in (f"I really liked item number {i}, great stuff", f"Item {i} was a disappointment, avoid")
]
PROBE_LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


def quiet(_):
    pass


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-results")
    data = root / "reviews.csv"
    make_frame(60).to_csv(data, index=False)
    # Batches of 4 (24 steps an epoch): with 16 (6 steps an epoch) the reference once learned
    # too little to be sure of the probes, and the approximate variants then disagreed with it.
    cfg = build_config(
        overrides=[
            f"storage.root={root}",
            f"data.source={data}",
            "data.text_column=body",
            "data.label_column=sentiment",
            "data.max_length=16",
            "model.name=tiny-bert",
            "train.batch_size=4",
            "train.lr=0.003",
            "train.epochs=3",
            "train.warmup_ratio=0",
            "train.log_every_steps=100",
            "name=tiny",
        ]
    )
    result = run_training(cfg, log=quiet)
    return cfg, result


@pytest.fixture(scope="module")
def exported(trained):
    """Every variant of the trained model, exported once for the tests below: (export
    result, the reference's probabilities on the probes, its labels)."""
    cfg, result = trained
    cfg = build_config(
        {
            **cfg.to_dict(),
            "export": {
                "prune_sparsity": 0.5,
                "distill_layers": 1,
                "distill_epochs": 2,
                "distill_lr": 0.003,
                "prune_lr": 0.003,
                "latency_samples": 10,
            },
        }
    )
    out = run_export(cfg, "tiny", ["hf", "onnx", "int8", "onnx-int8", "fp16", "pruned", "distilled"], log=quiet)
    reference = load_predictor(result.model_dir).predict(PROBES)
    return out, reference, reference.argmax(1)


def test_every_variant_loads_and_predicts_like_the_reference(exported):
    out, reference, ref_labels = exported
    # The reference learned the probes (label 1 is "pos"): agreement with it then means something.
    assert ref_labels.tolist() == PROBE_LABELS, reference
    folder = out.folder
    assert sorted(os.listdir(folder)) == sorted(
        ["hf", "onnx", "int8", "onnx-int8", "fp16", "pruned", "distilled", "mobile", "summary.json"]
    )
    # Exact variants: the same labels, and ONNX fp32 the same probabilities.
    for variant in ("hf", "onnx", "fp16"):
        probs = load_predictor(os.path.join(folder, variant), "auto").predict(PROBES)
        assert (probs.argmax(1) == ref_labels).all(), variant
    onnx = load_predictor(os.path.join(folder, "onnx"), "auto")
    assert onnx.backend == "onnx"
    np.testing.assert_allclose(onnx.predict(PROBES), reference, atol=1e-4)
    assert out.manifests["onnx"].settings["max_relative_logit_error"] <= 1e-4
    # Approximate variants (quantized, pruned and retrained, distilled): at least 7 of the 8
    # probe labels agree, and at least 10 of the 12 test-split labels.
    for variant in ("int8", "onnx-int8", "pruned", "distilled"):
        p = load_predictor(os.path.join(folder, variant), "auto")
        assert (p.predict(PROBES).argmax(1) == ref_labels).mean() >= 7 / 8, variant
        assert out.manifests[variant].measured["agreement_with_reference"] >= 10 / 12, variant
    assert load_predictor(os.path.join(folder, "int8"), "auto").backend == "int8"


def test_sizes_and_methods_are_real_and_every_variant_is_measured(exported):
    # int8 ONNX is smaller, fp16 is half, pruning reached its target, the student is shallower.
    from raybm.inference.loading import load_model_folder

    out, _, _ = exported
    folder, m = out.folder, out.manifests
    assert m["onnx-int8"].model_bytes < 0.5 * m["onnx"].model_bytes
    assert m["fp16"].model_bytes < 0.6 * m["hf"].model_bytes
    assert sparsity(load_model_folder(os.path.join(folder, "pruned"))[0]) >= 0.49
    assert m["pruned"].settings["sparsity_reached"] >= 0.49
    student = load_model_folder(os.path.join(folder, "distilled"))[0]
    assert student.config.num_hidden_layers == 1
    for manifest in m.values():
        assert {"version", "variant", "backend", "source", "settings", "model_bytes", "measured"} <= set(
            manifest.to_json()
        )
        assert manifest.measured["examples"] == 12 and manifest.measured["latency_p50_ms"] > 0
    with open(os.path.join(folder, "summary.json")) as f:
        assert json.load(f)["reference"]["examples"] == 12


def test_the_mobile_bundle_runs_without_raybm_transformers_or_torch(exported):
    import subprocess

    out, _, _ = exported
    mobile = os.path.join(out.folder, "mobile")
    with open(os.path.join(mobile, "manifest.json")) as f:
        manifest = json.load(f)
    source_variant = manifest["from_variant"]
    assert not os.path.isabs(manifest["source"]) and manifest["source"].endswith("/model")  # no local path
    assert source_variant in ("onnx", "onnx-int8")
    code = (
        "import runpy, sys; [sys.modules.__setitem__(m, None) for m in ('raybm', 'transformers', 'torch')]; "
        f"sys.argv = ['predict.py', *{PROBES!r}]; runpy.run_path({os.path.join(mobile, 'predict.py')!r}, "
        "run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    labels = [json.loads(line)["label"] for line in run.stdout.splitlines()]
    p = load_predictor(os.path.join(out.folder, source_variant), "auto")
    assert labels == [p.labels[i] for i in p.predict(PROBES).argmax(1)]


def test_a_corrupt_or_missing_source_is_a_clear_error_and_leaves_nothing(trained, tmp_path):
    cfg, result = trained
    broken = tmp_path / "broken-run" / "model"
    shutil.copytree(result.model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    exports = os.path.join(cfg.storage.root, "exports")
    before = sorted(os.listdir(exports)) if os.path.isdir(exports) else []
    with pytest.raises(RaybmError, match="cannot load the model .*incomplete or corrupt"):
        run_export(cfg, str(broken), ["onnx", "onnx-int8"], log=quiet)
    with pytest.raises(RaybmError, match="not a model folder"):
        run_export(cfg, str(tmp_path / "nowhere"), ["onnx"], log=quiet)
    after = sorted(os.listdir(exports)) if os.path.isdir(exports) else []
    assert after == before  # no variant, staging or summary left behind
