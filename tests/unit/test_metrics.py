import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_cm

from raybm.metrics import confusion_matrix, flat, metrics_from_confusion


def test_matches_scikit_learn_including_a_never_predicted_class():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 2, 200))  # class 2 rarely predicted
    y_pred[y_pred == 2] = 0  # never predicted
    cm = confusion_matrix(y_true, y_pred, 3)
    assert (cm == sk_cm(y_true, y_pred, labels=[0, 1, 2])).all()
    m = metrics_from_confusion(cm, ["a", "b", "c"], loss=0.5)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    assert np.isclose(m["accuracy"], accuracy_score(y_true, y_pred))
    assert np.isclose(m["precision_macro"], p.mean()) and np.isclose(m["recall_macro"], r.mean())
    assert np.isclose(m["f1_macro"], f.mean())
    assert m["per_class"]["c"]["precision"] == 0.0 and m["per_class"]["c"]["support"] == s[2]
    assert flat(m, "val_") == {
        "val_loss": 0.5,
        "val_accuracy": m["accuracy"],
        "val_precision_macro": m["precision_macro"],
        "val_recall_macro": m["recall_macro"],
        "val_f1_macro": m["f1_macro"],
    }


def test_temperature_scaling_recovers_an_overconfident_models_scale_and_lowers_its_calibration_error():
    from raybm.metrics import calibration, expected_calibration_error, fit_temperature, served_calibration, softmax

    rng = np.random.default_rng(0)
    odds = rng.normal(0, 2, 5000)  # true log-odds of class 1
    labels = (rng.random(5000) < 1 / (1 + np.exp(-odds))).astype(int)
    logits = np.stack([np.zeros(5000), 3 * odds], 1)  # three times too sure
    found = calibration(logits, labels)
    assert found["temperature"] == pytest.approx(3, rel=0.1)
    assert found["ece"] > 0.1 and found["ece_calibrated"] < 0.03
    assert fit_temperature(logits / 3, labels) == pytest.approx(1, rel=0.1)  # a calibrated model stays as it is
    # The same numbers from probabilities served through the temperature (a scored split).
    served = served_calibration(softmax(logits, found["temperature"]), labels, found["temperature"])
    assert served == pytest.approx(found)
    assert fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 1.0
    # ECE by hand: two bins, 0.9 confident and right half the time, 0.6 confident and always right.
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    assert expected_calibration_error(conf, np.array([1, 0, 1, 1])) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_predictors_divide_the_logits_by_the_folders_temperature(tiny_model_dir, tmp_path):
    import json
    import shutil

    import torch

    from raybm.errors import RaybmError
    from raybm.export.onnx import export_onnx
    from raybm.inference.loading import load_model_folder, load_onnx, load_predictor, read_calibration

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    texts = ["a fine day", "the worst"]
    model, tokenizer, _ = load_model_folder(str(folder))
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    assert read_calibration(str(folder)) == {"temperature": 1.0}
    (folder / "calibration.json").write_text(json.dumps({"temperature": 0.25}))
    want = np.exp(logits / 0.25) / np.exp(logits / 0.25).sum(-1, keepdims=True)
    assert np.allclose(load_predictor(str(folder)).predict(texts), want, atol=1e-5)
    export_onnx(str(folder), str(tmp_path / "onnx"))  # the side files carry the temperature
    assert np.allclose(load_onnx(str(tmp_path / "onnx")).predict(texts), want, atol=1e-4)
    (folder / "calibration.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(RaybmError, match="no usable temperature"):
        load_predictor(str(folder))
