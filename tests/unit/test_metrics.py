import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix as sk_cm, precision_recall_fscore_support

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
    assert flat(m, "val_") == {"val_loss": 0.5, "val_accuracy": m["accuracy"], "val_precision_macro": m["precision_macro"],
                               "val_recall_macro": m["recall_macro"], "val_f1_macro": m["f1_macro"]}
