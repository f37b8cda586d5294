import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medfed.tasks.classification import ClassificationMetrics, classification_metrics


def test_binary_metrics_match_sklearn_and_hand_counts() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    p1 = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(probs, labels, 2)
    pred = probs.argmax(1)
    tp, tn = np.sum((pred == 1) & (labels == 1)), np.sum((pred == 0) & (labels == 0))
    fp, fn = np.sum((pred == 1) & (labels == 0)), np.sum((pred == 0) & (labels == 1))
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["accuracy"] == pytest.approx((tp + tn) / 200)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))


def test_multiclass_macro_auroc_matches_sklearn_ovr() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[labels] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(probs, labels, 3)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert {"auroc_class_2", "sensitivity_class_2"} <= set(m)


def test_one_class_split_gives_nan_auroc_not_an_error() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    m = classification_metrics(probs, np.array([1, 1]), 2)
    assert math.isnan(m["auroc"]) and m["accuracy"] == 0.5


def test_accumulator_over_batches_equals_one_shot() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 64)
    probs = rng.dirichlet([1, 1], 64)
    acc = ClassificationMetrics(2)
    for i in range(0, 64, 10):
        acc.update(torch.tensor(probs[i : i + 10]), {"label": torch.tensor(labels[i : i + 10])})
    assert acc.compute() == pytest.approx(classification_metrics(probs, labels, 2), nan_ok=True)
