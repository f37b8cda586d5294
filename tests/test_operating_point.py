"""The operating point of binary classifiers: threshold choice, metrics at it, calibration error."""

import numpy as np
import pytest

from medfed.tasks import classification
from medfed.tasks.classification import SCORE_EDGES, calibration, choose_threshold, classification_metrics
from tests.conftest import tiny_config


def _counts(scores: list[float], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    metrics = classification.ClassificationMetrics(2)
    probs = np.stack([1 - np.asarray(scores), np.asarray(scores)], axis=1)
    metrics._probs, metrics._labels = [probs], [np.asarray(labels)]
    counts = metrics.score_counts()
    bins = len(SCORE_EDGES) + 1
    return np.array([counts[f"score_pos@{i}"] for i in range(bins)]), np.array(
        [counts[f"score_neg@{i}"] for i in range(bins)]
    )


def test_youden_threshold_by_hand() -> None:
    # negatives at 0.1, 0.2, 0.6; positives at 0.4, 0.7, 0.9.
    # Calling positive from just above 0.2: sens 3/3, spec 2/3, J = 2/3.
    # From just above 0.6: sens 2/3, spec 3/3, J = 2/3. From above 0.4: sens 2/3, spec 2/3, J = 1/3.
    # Youden ties between the ranges (0.2, 0.4] and (0.6, 0.7]: the middle edge of the tied ones.
    pos, neg = _counts([0.4, 0.7, 0.9, 0.1, 0.2, 0.6], [1, 1, 1, 0, 0, 0])
    threshold, sens, spec = choose_threshold(pos, neg)
    assert sens + spec == pytest.approx(1 + 2 / 3)
    assert 0.2 < threshold <= 0.4 or 0.6 < threshold <= 0.7
    # a clean case: one best range only
    pos, neg = _counts([0.8, 0.9, 0.95, 0.1, 0.2, 0.3], [1, 1, 1, 0, 0, 0])
    threshold, sens, spec = choose_threshold(pos, neg)
    assert 0.3 < threshold <= 0.8 and sens == 1.0 and spec == 1.0


def test_scores_crowded_in_a_narrow_band_still_separate() -> None:
    """A DP-trained model can put every case within a few tenths of log-odds (the demo at run.seed 0:
    -2.1 to -1.3); classes 0.1 apart in log-odds there still get a threshold between them."""
    logits = np.array([-1.48, -1.45, -1.42, -1.59, -1.57, -1.53])
    pos, neg = _counts((1 / (1 + np.exp(-logits))).tolist(), [1, 1, 1, 0, 0, 0])
    _, sens, spec = choose_threshold(pos, neg)
    assert sens == spec == 1.0


def test_target_sensitivity_takes_the_highest_threshold_reaching_it() -> None:
    pos, neg = _counts([0.3, 0.5, 0.7, 0.9, 0.1, 0.2, 0.6, 0.8], [1, 1, 1, 1, 0, 0, 0, 0])
    threshold, sens, spec = choose_threshold(pos, neg, target_sensitivity=0.75)
    # sensitivity 3/4 holds while the threshold is in (0.3, 0.5]: the highest edge there
    assert 0.3 < threshold <= 0.5 and sens == 0.75 and spec == 0.5
    assert SCORE_EDGES[np.searchsorted(SCORE_EDGES, 0.5, side="right")] > 0.5  # the next edge would lose a case


def test_operating_point_pools_the_sites_and_skips_one_class_data() -> None:
    config = tiny_config()
    pos_a, neg_a = _counts([0.9, 0.1], [1, 0])
    pos_b, neg_b = _counts([0.8, 0.3], [1, 0])
    site = lambda pos, neg: {**{f"score_pos@{i}": v for i, v in enumerate(pos)},  # noqa: E731
                             **{f"score_neg@{i}": v for i, v in enumerate(neg)}}  # fmt: skip
    chosen = classification.operating_point({"a": site(pos_a, neg_a), "b": site(pos_b, neg_b)}, config)
    assert chosen["val_positives"] == 2 and chosen["val_negatives"] == 2
    assert 0.3 < chosen["threshold"] <= 0.8 and chosen["val_sensitivity"] == chosen["val_specificity"] == 1.0
    assert classification.operating_point({"a": site(pos_a, np.zeros_like(neg_a))}, config) == {}


def test_metrics_at_the_threshold() -> None:
    probs1 = np.array([0.35, 0.45, 0.2, 0.9])
    probs = np.stack([1 - probs1, probs1], axis=1)
    labels = np.array([1, 1, 0, 0])
    at_half = classification_metrics(probs, labels, 2)
    assert at_half["sensitivity"] == 0.0 and at_half["specificity"] == 0.5
    at_030 = classification_metrics(probs, labels, 2, threshold=0.3)
    assert at_030["sensitivity"] == 1.0 and at_030["specificity"] == 0.5 and at_030["precision"] == 2 / 3
    assert at_030["threshold"] == 0.3 and at_030["accuracy"] == 0.75
    assert at_030["auroc"] == at_half["auroc"] == 0.5


def test_expected_calibration_error_by_hand() -> None:
    # bins of width 0.1: 0.65 and 0.62 share bin 6 (accuracy 1/2, confidence 0.635),
    # 0.95 alone in bin 9 (accuracy 1): ECE = 2/3 * |0.5 - 0.635| + 1/3 * |1 - 0.95|
    result = calibration(np.array([0.65, 0.62, 0.95]), np.array([1.0, 0.0, 1.0]))
    assert result["ece"] == pytest.approx(2 / 3 * 0.135 + 1 / 3 * 0.05)
    assert result["calibration_n@6"] == 2 and result["calibration_acc@6"] == 0.5
    assert result["calibration_conf@6"] == pytest.approx(0.635) and result["calibration_n@0"] == 0
    assert "calibration_acc@0" not in result  # an empty bin has no accuracy


def test_small_structures_are_removed_before_counting() -> None:
    from medfed.evaluation.quantify import remove_small_structures, structure_count

    labels = np.zeros((12, 12), dtype=np.int64)
    labels[1:5, 1:5] = 1  # 16 pixels
    labels[8, 8] = 2  # a 1-pixel speck
    labels[9:11, 1:3] = 1  # 4 pixels
    cleaned = remove_small_structures(labels, 5)
    assert structure_count(cleaned) == 1 and cleaned[1:5, 1:5].sum() == 16 and cleaned[8, 8] == 0
    assert structure_count(remove_small_structures(labels, 4)) == 2
    assert remove_small_structures(labels, 0) is labels
