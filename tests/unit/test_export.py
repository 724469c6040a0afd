import json

import numpy as np
import pytest

from raybm.commands.models import format_exports
from raybm.config import build_config
from raybm.errors import RaybmError
from raybm.export.onnx import export_onnx, quantize_onnx
from raybm.export.trained import prune_model, pruning_targets, sparsity
from raybm.export.variants import run_export
from raybm.inference.loading import load_model_folder, load_predictor
from raybm.storage.records import ExportManifest

TEXTS = ["one", "two words", "a somewhat longer text with more tokens in it", "ok then"]


def test_pruning_reaches_the_target_on_the_encoder_and_spares_the_head(tiny_model_dir, tmp_path):
    reached = prune_model(tiny_model_dir, str(tmp_path / "pruned"), 0.6)
    model = load_model_folder(str(tmp_path / "pruned"))[0]
    assert reached == pytest.approx(0.6, abs=0.01) and sparsity(model) == pytest.approx(reached)
    assert all(m is not model.classifier for m in pruning_targets(model))
    assert float((model.classifier.weight == 0).float().mean()) < 0.05
    assert (tmp_path / "pruned" / "label_map.json").exists()


def test_a_mean_pooled_model_exports_to_onnx_and_quantizes(tmp_path):
    from raybm.models.build import build_classifier, load_tokenizer

    folder = tmp_path / "pooled"
    cfg = build_config(overrides=["model.name=tiny-bert", "model.pooling=mean"])
    build_classifier(cfg.model, ["a", "b", "c"], seed=3).save_pretrained(folder, safe_serialization=True)
    load_tokenizer("tiny-bert").save_pretrained(folder)
    (folder / "label_map.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
    info = export_onnx(str(folder), str(tmp_path / "onnx"))
    assert info["max_relative_logit_error"] <= 1e-4
    assert (tmp_path / "onnx" / "pooled.py").is_file()  # the architecture's code travels with its config
    ref = load_predictor(str(folder)).predict(TEXTS)
    np.testing.assert_allclose(load_predictor(str(tmp_path / "onnx"), "auto").predict(TEXTS), ref, atol=1e-4)
    quantize_onnx(str(tmp_path / "onnx"), str(tmp_path / "q"))
    q = load_predictor(str(tmp_path / "q"), "onnx").predict(TEXTS)
    assert q.shape == ref.shape and np.allclose(q.sum(1), 1, atol=1e-4)


def test_unknown_variants_and_local_models_for_remote_roots_are_refused(tiny_model_dir, tmp_path):
    cfg = build_config(overrides=[f"storage.root={tmp_path}"])
    with pytest.raises(RaybmError, match="unknown variant"):
        run_export(cfg, tiny_model_dir, ["tflite"], log=lambda _: None)
    with pytest.raises(RaybmError, match="with an S3 storage.root .* give an s3:// model folder"):
        run_export(build_config(overrides=["storage.root=s3://bucket/x"]), tiny_model_dir, ["onnx"])
    assert not (tmp_path / "exports").exists()


def test_the_exports_table_lists_every_variant():
    table = format_exports(
        {"model_bytes": 90e6, "accuracy": 0.91, "f1_macro": 0.89, "latency_p50_ms": 10.0},
        {
            "onnx-int8": ExportManifest(
                model_bytes=23_000_000,
                measured={"accuracy": 0.905, "f1_macro": 0.88, "agreement_with_reference": 0.98, "latency_p50_ms": 1.9},
            ),
            "fp16": ExportManifest(model_bytes=45_000_000),
        },
    )
    lines = table.splitlines()
    assert len(lines) == 4 and "onnx-int8" in lines[2] and "23.0" in lines[2] and "0.980" in lines[2]
    assert lines[3].split()[:3] == ["fp16", "45.0", "-"]
