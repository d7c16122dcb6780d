from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from scdlkit.training.metrics import (
    classification_metrics,
    confusion_matrix,
    json_safe,
    per_class_metrics,
)

KEYS = {"accuracy", "macro_f1", "balanced_accuracy", "weighted_f1", "auroc_ovr", "n_cells"}


def _one_hot(codes: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[codes]


def test_perfect_predictions():
    y = np.array([0, 1, 2, 2, 1, 0])
    m = classification_metrics(y, _one_hot(y, 3))
    assert set(m) == KEYS
    assert m["n_cells"] == 6
    for key in KEYS - {"n_cells"}:
        assert m[key] == pytest.approx(1.0)


def test_matches_sklearn_and_ignores_unlabelled():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    p = rng.dirichlet(np.ones(4), size=200)
    y_masked = y.copy()
    y_masked[:50] = -1
    m = classification_metrics(y_masked, p)
    yt, pt = y[50:], p[50:]
    pred = pt.argmax(1)
    assert m["n_cells"] == 150
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(yt, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(yt, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(yt, pred, average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(yt, pred))
    # all four classes present: our macro OvR equals sklearn's
    assert m["auroc_ovr"] == pytest.approx(skm.roc_auc_score(yt, pt, multi_class="ovr"))


def test_unnormalised_probabilities_are_renormalised():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=60)
    p = rng.dirichlet(np.ones(3), size=60)
    scaled = p * rng.uniform(0.5, 20.0, size=(60, 1))
    assert classification_metrics(y, scaled) == pytest.approx(classification_metrics(y, p))
    zero_row = p.copy()
    zero_row[0] = 0.0
    assert all(v is None or math.isfinite(v) for v in classification_metrics(y, zero_row).values())


def test_auroc_finite_for_trained_model_with_absent_class():
    # A softmax regression trained on 4 classes, evaluated on a split where class 3 is absent:
    # the situation in which naive OvR AUROC comes out NaN.
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(4, 5))
    y_train = np.arange(400) % 4
    x_train = centres[y_train] + rng.normal(size=(400, 5))
    y_test = rng.choice([0, 1, 2], size=90)
    x_test = centres[y_test] + rng.normal(size=(90, 5))
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    xt, yt = torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor(x_test, dtype=torch.float32)), 1).numpy()

    m = classification_metrics(y_test, p)
    assert m["auroc_ovr"] is not None
    assert math.isfinite(m["auroc_ovr"])
    expected = np.mean([skm.roc_auc_score(y_test == c, p[:, c]) for c in (0, 1, 2)])
    assert m["auroc_ovr"] == pytest.approx(expected)
    assert m["accuracy"] > 0.8
    json.dumps(json_safe(m), allow_nan=False)


def test_single_class_and_no_labels_give_none():
    p = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    single = classification_metrics(np.array([0, 0, 0]), p)
    assert single["auroc_ovr"] is None
    assert single["accuracy"] == pytest.approx(2 / 3)
    empty = classification_metrics(np.array([-1, -1, -1]), p)
    assert empty["n_cells"] == 0
    assert all(empty[k] is None for k in KEYS - {"n_cells"})
    json.dumps(empty, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "p", "kwargs", "match"),
    [
        ([0, 1], [[0.5, 0.5]], {}, "rows"),
        ([0, 3], [[0.5, 0.5], [0.5, 0.5]], {}, "code 3"),
        ([0, -2], [[0.5, 0.5], [0.5, 0.5]], {}, "-1 for unlabelled"),
        ([0, 1], [[-0.5, 1.5], [0.5, 0.5]], {}, "non-negative"),
        ([0, 1], [[np.nan, 1.0], [0.5, 0.5]], {}, "finite"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], {"n_classes": 3}, "n_classes"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], {}, "integer"),
    ],
)
def test_classification_metrics_bad_input(y, p, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.asarray(y), np.asarray(p, dtype=float), **kwargs)


def test_per_class_metrics():
    y = np.array([0, 0, 1, 1, 2, -1])
    pred = np.array([0, 1, 1, 1, 0, 2])
    df = per_class_metrics(y, pred, labels=["B", "T", "NK", "Mono"])
    assert list(df.columns) == ["label", "precision", "recall", "f1", "support"]
    assert df["label"].tolist() == ["B", "T", "NK", "Mono"]
    assert df["support"].tolist() == [2, 2, 1, 0]
    assert df["support"].dtype == np.int64
    np.testing.assert_allclose(df["precision"], [0.5, 2 / 3, 0.0, 0.0])
    np.testing.assert_allclose(df["recall"], [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(df["f1"], [0.5, 0.8, 0.0, 0.0])
    assert not df.isna().any().any()


def test_confusion_matrix():
    y = np.array([0, 0, 1, 2, 2, -1])
    pred = np.array([0, 1, 1, 2, 0, 1])
    cm = confusion_matrix(y, pred, n_classes=4)
    expected = skm.confusion_matrix(y[:-1], pred[:-1], labels=range(4))
    np.testing.assert_array_equal(cm, expected)
    assert cm.shape == (4, 4)
    assert cm.sum() == 5
    with pytest.raises(ValueError, match="n_classes"):
        confusion_matrix(y, pred, n_classes=2)
    with pytest.raises(ValueError, match="n_classes"):
        confusion_matrix(y, pred, n_classes=0)


def test_json_safe_strict_json():
    obj = {
        "nan": float("nan"),
        "inf": -math.inf,
        np.int64(3): np.float32(0.5),
        "np_nan": np.float64("nan"),
        "array": np.array([1.0, np.nan, np.inf]),
        "ints": np.arange(3, dtype=np.int32),
        "bool": np.bool_(True),
        "tuple": (1, np.float16(2.0)),
        "frame": pd.DataFrame({"a": [1.0, np.nan], "b": ["x", "y"]}),
        "path": Path("/tmp/run"),
        "tensor": torch.tensor([1.0, float("nan")]),
        "nested": {"deep": [{"x": np.float64("inf")}]},
        None: 1,
    }
    safe = json_safe(obj)
    text = json.dumps(safe, allow_nan=False)
    back = json.loads(text)
    assert back["nan"] is None
    assert back["inf"] is None
    assert back["3"] == 0.5
    assert back["array"] == [1.0, None, None]
    assert back["ints"] == [0, 1, 2]
    assert back["bool"] is True
    assert back["tuple"] == [1, 2.0]
    assert back["frame"] == [{"a": 1.0, "b": "x"}, {"a": None, "b": "y"}]
    assert back["path"] == "/tmp/run"
    assert back["tensor"] == [1.0, None]
    assert back["nested"] == {"deep": [{"x": None}]}
    assert back["null"] == 1
    with pytest.raises(TypeError, match="object"):
        json_safe(object())
