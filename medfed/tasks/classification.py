"""Image classification, binary, multi-class or multi-label.

Samples: ``{"image": (C, *spatial) float, "label": long}``. Predictions: class probabilities.
Metrics: macro AUROC (the primary metric), accuracy, balanced accuracy, sensitivity,
specificity, precision (macro over classes for more than two classes), per-class AUROC and
sensitivity, and the expected calibration error (ECE) with its reliability bins. A metric that is
undefined on the data (AUROC with one class present) is NaN.

A site that labels only some classes (its label map, :mod:`medfed.data.label_map`) trains with
the softmax over those classes and reports metrics over them, the others n/a.

Binary tasks call a case positive when its probability of class 1 reaches the operating threshold
(``evaluation.threshold``; 0.5 until one is chosen). :func:`operating_point` chooses it at the end
of a run from the sites' validation splits: each site sends only counts of its cases per score bin
(:data:`SCORE_EDGES`), never a score of its own.

Multi-label (``data.multi-label``): a label is a multi-hot vector ``(num_classes,)`` (any number of
findings per image); each finding has its own sigmoid output and binary cross-entropy, its own
AUROC (``auroc_class_k``; ``auroc`` is their mean) and its own threshold
(``evaluation.label-thresholds``, chosen per finding like the binary one), at which its
sensitivity and specificity are reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.transforms import RandAffine
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F

from medfed.config import Config, require
from medfed.data import synthetic
from medfed.data.arrays import SiteArrays
from medfed.models.zoo import build_network

__all__ = [
    "NAME",
    "PRIMARY_METRIC",
    "PRIMARY_METRIC_PER_IMAGE",
    "SAMPLE_KEYS",
    "SPATIAL_DIMS",
    "TARGET",
    "ClassificationMetrics",
    "LogitAdjustment",
    "MultiLabelMetrics",
    "RandomShiftRotate",
    "build_model",
    "check_config",
    "calls",
    "loss",
    "masked_cross_entropy",
    "decode",
    "explain_layer",
    "infer",
    "label_thresholds",
    "metrics",
    "operating_point",
    "operating_threshold",
    "pooled_metrics",
    "synthetic_site",
    "train_transform",
]

NAME = "classification"
PRIMARY_METRIC = "auroc"
PRIMARY_METRIC_PER_IMAGE = False  # AUROC is computed over the whole split
TARGET = "label"  # the sample key (and manifest column) of what the task learns
SAMPLE_KEYS = ("image", TARGET)
SPATIAL_DIMS = (2, 3)  # the image dimensions the task works in
# The layer whose activations Grad-CAM explains, per network (its last feature maps)
EXPLAIN_LAYERS = {
    "cnn": "features",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "seresnet50": "layer4",
    "densenet121": "features",
    "efficientnet-b0": "_conv_head",
}


def explain_layer(config: Config) -> str:
    """The name of the layer Grad-CAM explains in the configured network."""
    return EXPLAIN_LAYERS[config.model.name]


def check_config(config: Config) -> None:
    """The settings classification needs: two classes or more, random views to average over, and
    logit adjustment only without DP."""
    require(config.data.num_classes >= 2, "data.num-classes", config.data.num_classes, "an integer >= 2")
    if config.data.multi_label:
        _check_multi_label(config)
    else:
        require(not config.evaluation.label_thresholds, "evaluation.label-thresholds",
                list(config.evaluation.label_thresholds), "[] unless data.multi-label = true")  # fmt: skip
    require(
        config.train.augmentations == 1 or config.train.augment,
        "train.augmentations",
        config.train.augmentations,
        "1 unless the views differ: set train.augment = true",
    )
    require(
        not (config.train.logit_adjust and config.privacy.sample_level),
        "train.logit-adjust",
        True,
        "false with DP-SGD at the sites (privacy.enabled = true, privacy.level 'sample' or 'sample+site'): "
        "the class counts it uses are not covered by the sites' privacy accounting",
    )


def _check_multi_label(config: Config) -> None:
    """What several labels per image need: data that can hold them, one threshold per label, and
    no logit adjustment (it adjusts one softmax over classes)."""
    require(config.data.source in ("synthetic", "sites"), "data.source", config.data.source,
            "'synthetic' or 'sites' with data.multi-label = true (the other sources hold one label per image)")  # fmt: skip
    thresholds = config.evaluation.label_thresholds
    require(not thresholds or len(thresholds) == config.data.num_classes, "evaluation.label-thresholds",
            list(thresholds), f"[] or one threshold per label: data.num-classes = {config.data.num_classes}")  # fmt: skip
    require(not config.train.logit_adjust, "train.logit-adjust", True, "false with data.multi-label = true")
    require("none" not in config.data.class_names, "data.class-names", list(config.data.class_names),
            "names other than 'none' with data.multi-label = true (a label cell 'none' means no finding)")  # fmt: skip
    require(config.data.source != "synthetic" or config.data.spatial_dims == 2, "data.spatial-dims",
            config.data.spatial_dims, "2 for synthetic multi-label sites (data.source = 'synthetic')")  # fmt: skip


def build_model(config: Config) -> nn.Module:
    """The ``model.name`` classifier of the model zoo (default: :class:`medfed.models.ConvClassifier`)
    for ``data.channels``-channel images or volumes (``data.spatial-dims``)."""
    return build_network(NAME, config)


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy, mean over the batch (each term depends on one sample only, as DP requires);
    for multi-hot labels ``(B, num_classes)`` (multi-label) binary cross-entropy per label, mean
    over the batch and the labels.

    A ``logit_offset`` in the batch (``train.logit-adjust``: the site's log class frequencies, see
    :class:`LogitAdjustment`) is added to the logits first, at training time only. At a site that
    labels only some classes (``labelled`` in the batch, from its label map) the softmax runs over
    those classes only (:func:`masked_cross_entropy`)."""
    if batch["label"].ndim == 2:
        return F.binary_cross_entropy_with_logits(outputs, batch["label"].to(outputs.dtype))
    offset = batch.get("logit_offset")
    logits = outputs if offset is None else outputs + offset
    labelled = batch.get("labelled")
    if labelled is not None:
        return masked_cross_entropy(logits, batch["label"], labelled)
    return F.cross_entropy(logits, batch["label"])


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over each sample's ``labelled`` classes ``(B, K)`` only, mean over the batch:
    the classes a site does not label are left out of its softmax, so its cases never teach the
    model that they are not those classes (they may be: the site does not say)."""
    return F.cross_entropy(logits.masked_fill(~labelled.bool(), float("-inf")), labels)


class LogitAdjustment:
    """Adds a site's log class frequencies to every training sample, as ``logit_offset``, after the
    training ``transform``. Trained through :func:`loss`, the model's own logits then estimate
    class-balanced scores (logit adjustment, Menon et al. 2021; FedLC, Zhang et al. 2022), so a
    site with few patients of one class does not drag the federated model to its majority."""

    def __init__(self, transform: Any, labels: np.ndarray, num_classes: int) -> None:
        self._transform = transform
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]
        self.offset = torch.log(torch.as_tensor((counts + 1.0) / (counts.sum() + num_classes), dtype=torch.float32))

    def set_random_state(self, seed: int) -> None:
        """Seed the wrapped transform, if it is random."""
        if hasattr(self._transform, "set_random_state"):
            self._transform.set_random_state(seed)

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sample = self._transform(sample) if self._transform is not None else sample
        return {**sample, "logit_offset": self.offset}


def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Class logits ``(B, num_classes)``."""
    return model(images)


def decode(outputs: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """Class probabilities ``(B, num_classes)``: a softmax, or each label's sigmoid (multi-label)."""
    if config is not None and config.data.multi_label:
        return torch.sigmoid(outputs)
    return torch.softmax(outputs, dim=1)


def train_transform(config: Config) -> RandomShiftRotate | None:
    """Whole images as they are, or (``train.augment``) randomly shifted and rotated a little."""
    return RandomShiftRotate(config.data.image_size, config.data.spatial_dims) if config.train.augment else None


class RandomShiftRotate:
    """A random shift of up to 6 % of the image size and rotation of up to 10 degrees, borders
    repeated: a patient positioned a little differently. No flips, since left and right differ in
    anatomy (a heart on the right side is a finding)."""

    def __init__(self, image_size: int, spatial_dims: int) -> None:
        self._affine = RandAffine(
            prob=1.0,
            rotate_range=(0.17,) * (1 if spatial_dims == 2 else 3),
            translate_range=(0.06 * image_size,) * spatial_dims,
            padding_mode="border",
        )

    def set_random_state(self, seed: int) -> None:
        """Make the views repeatable (the site seeds each round's training)."""
        self._affine.set_random_state(seed=seed % 2**32)

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = torch.as_tensor(self._affine(sample["image"])).as_subclass(torch.Tensor).contiguous()
        return {**sample, "image": image}


DEFAULT_THRESHOLD = 0.5
CALIBRATION_BINS = 10
# Score bins for choosing a threshold: 481 edges evenly spaced in log-odds over [-12, 12] (a step of
# 0.05), so that well-separated models, whose probabilities crowd near 0 and 1, keep their resolution,
# and so do models trained under DP, whose scores can crowd in a narrow band: the demo at run.seed 0
# put every validation case of its sites between log-odds -2.1 and -1.3, classes about 0.3 apart;
# at a step of 0.2 no threshold between bins kept site-2's sensitivity above 0.74 (test AUROC 0.996)
SCORE_EDGES = 1.0 / (1.0 + np.exp(-np.linspace(-12.0, 12.0, 481)))


def operating_threshold(config: Config) -> float:
    """The threshold binary calls are made at: ``evaluation.threshold``, else 0.5 (none chosen yet)."""
    return config.evaluation.threshold or DEFAULT_THRESHOLD


def calls(probs: np.ndarray, num_classes: int, threshold: float) -> np.ndarray:
    """The class called for each row of ``(N, K)`` probabilities: class 1 when its probability
    reaches ``threshold`` (binary tasks), else the most probable class."""
    return (probs[:, 1] >= threshold).astype(int) if num_classes == 2 else probs.argmax(axis=1)


def label_thresholds(config: Config) -> np.ndarray:
    """Multi-label: each label's threshold, ``evaluation.label-thresholds``, else 0.5 (none chosen yet)."""
    chosen = config.evaluation.label_thresholds
    return np.asarray(chosen if chosen else [DEFAULT_THRESHOLD] * config.data.num_classes, dtype=float)


def metrics(config: Config) -> ClassificationMetrics | MultiLabelMetrics:
    """The accumulator at the run's operating threshold (:func:`operating_threshold`), or at each
    label's (:func:`label_thresholds`, multi-label)."""
    if config.data.multi_label:
        return MultiLabelMetrics(config.data.num_classes, label_thresholds(config))
    return ClassificationMetrics(config.data.num_classes, operating_threshold(config))


def operating_point(val_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """The threshold for binary tasks, chosen on the sites' validation splits pooled: Youden's J at
    its highest or, with ``evaluation.target-sensitivity``, the highest threshold reaching that
    sensitivity. ``val_metrics`` holds each site's score-bin counts; {} for other tasks or when the
    validation data hold only one class."""
    if config.data.multi_label:
        return _label_operating_points(val_metrics, config)
    counts = _summed_counts(val_metrics)
    if config.data.num_classes != 2 or counts is None:
        return {}
    pos, neg = counts
    threshold, sensitivity, specificity = choose_threshold(pos, neg, config.evaluation.target_sensitivity)
    return {
        "threshold": threshold,
        "val_sensitivity": sensitivity,
        "val_specificity": specificity,
        "val_positives": float(pos.sum()),
        "val_negatives": float(neg.sum()),
    }


def pooled_metrics(test_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Binary tasks: AUROC, sensitivity and specificity over all sites' cases together, from the
    counts of cases per score bin that each site sent, each site's cases called at the threshold it
    reported using (exact at a threshold on a bin edge, as a chosen one is; AUROC counts two cases
    in one bin as a tie). In a simulation of one dataset split
    into sites, that is the whole dataset's test split: the figure the literature reports."""
    if config.data.multi_label:
        return _pooled_label_metrics(test_metrics, config)
    if config.data.num_classes != 2:
        return {}
    return _pooled_binary(test_metrics, "", "threshold", operating_threshold(config))


def _pooled_binary(
    test_metrics: dict[str, dict[str, float]], label: str, threshold_key: str, default_threshold: float
) -> dict[str, float]:
    """:func:`pooled_metrics` of one binary outcome (``label``: its score-count key suffix), each
    site's cases called at the threshold it reported under ``threshold_key``; {} unless both occur."""
    counts = _summed_counts(test_metrics, label)
    if counts is None:
        return {}
    pos, neg = counts
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    true_pos = true_neg = 0.0
    for values in test_metrics.values():  # each site's cases called at the threshold it used
        site_pos, site_neg = _counts_per_bin({"": values}, label)
        site_true_pos, site_true_neg = _true_calls(site_pos, site_neg, values.get(threshold_key, default_threshold))
        true_pos += site_true_pos
        true_neg += site_true_neg
    return {
        "auroc": float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum())),
        "sensitivity": float(true_pos / pos.sum()),
        "specificity": float(true_neg / neg.sum()),
        "positives": float(pos.sum()),
        "negatives": float(neg.sum()),
    }


def _pooled_label_metrics(test_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Multi-label :func:`pooled_metrics`: each label's pooled AUROC, sensitivity and specificity
    (``auroc_class_k``, ...) and their means over the labels where both outcomes occur."""
    out: dict[str, float] = {}
    found = []
    for k, default in enumerate(label_thresholds(config)):
        pooled = _pooled_binary(test_metrics, f"_class_{k}", f"threshold_class_{k}", float(default))
        out.update({f"{name}_class_{k}": value for name, value in pooled.items()})
        if pooled:
            found.append(pooled)
    if not found:
        return {}
    for name in ("auroc", "sensitivity", "specificity"):
        out[name] = float(np.mean([p[name] for p in found]))
    return out


def _label_operating_points(val_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, Any]:
    """Multi-label :func:`operating_point`: each label's threshold chosen like the binary one from
    its own score-bin counts (0.5 for a label whose validation cases hold one outcome only), as
    ``label_thresholds``; {} when no label holds both outcomes."""
    thresholds: list[float] = []
    out: dict[str, Any] = {}
    for k in range(config.data.num_classes):
        counts = _summed_counts(val_metrics, f"_class_{k}")
        if counts is None:
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        threshold, sensitivity, specificity = choose_threshold(*counts, config.evaluation.target_sensitivity)
        thresholds.append(threshold)
        out[f"val_sensitivity_class_{k}"], out[f"val_specificity_class_{k}"] = sensitivity, specificity
    return {"label_thresholds": thresholds, **out} if out else {}


def _summed_counts(site_metrics: dict[str, dict[str, float]], label: str = "") -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_counts_per_bin`, or None unless both classes occur."""
    pos, neg = _counts_per_bin(site_metrics, label)
    return (pos, neg) if pos.sum() > 0 and neg.sum() > 0 else None


def _counts_per_bin(site_metrics: dict[str, dict[str, float]], label: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative cases per score bin summed over sites (``label``: ``_class_k`` for label
    k of a multi-label task, "" for the binary task's class 1)."""
    bins = len(SCORE_EDGES) + 1
    pos, neg = np.zeros(bins), np.zeros(bins)
    for values in site_metrics.values():
        pos += [values.get(f"score_pos{label}@{i}", 0.0) for i in range(bins)]
        neg += [values.get(f"score_neg{label}@{i}", 0.0) for i in range(bins)]
    return pos, neg


def choose_threshold(pos: np.ndarray, neg: np.ndarray, target_sensitivity: float = 0.0) -> tuple[float, float, float]:
    """``(threshold, sensitivity, specificity)`` from counts of positive and negative cases per score
    bin (bin ``i`` holds scores in ``[SCORE_EDGES[i-1], SCORE_EDGES[i])``; a case is called positive
    when its score >= the threshold, one of :data:`SCORE_EDGES`). Youden's J when
    ``target_sensitivity`` is 0 (ties: the middle of the best range), else the highest threshold
    whose sensitivity reaches the target."""
    true_calls = np.array([_true_calls(pos, neg, edge) for edge in SCORE_EDGES])
    sensitivity, specificity = true_calls[:, 0] / pos.sum(), true_calls[:, 1] / neg.sum()
    if target_sensitivity > 0:
        reaching = np.flatnonzero(sensitivity >= target_sensitivity)
        k = int(reaching[-1]) if len(reaching) else 0
    else:
        youden = sensitivity + specificity
        best = np.flatnonzero(np.isclose(youden, youden.max()))
        k = int(best[len(best) // 2])
    return float(SCORE_EDGES[k]), float(sensitivity[k]), float(specificity[k])


def _true_calls(pos: np.ndarray, neg: np.ndarray, threshold: float) -> tuple[float, float]:
    """True positives and true negatives among cases counted per score bin, called positive at
    ``threshold`` (exact when it is one of :data:`SCORE_EDGES`: bins above it are called positive)."""
    first_positive_bin = int(np.searchsorted(SCORE_EDGES, threshold, side="left")) + 1
    return float(pos[first_positive_bin:].sum()), float(neg[:first_positive_bin].sum())


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, float]:
    """Expected calibration error of top-label ``confidence`` against ``correct`` (0/1), over ``bins``
    equal-width bins of confidence (Guo et al. 2017): sum over bins of (cases in bin / cases) times
    |accuracy - mean confidence| in the bin; plus each bin's count, accuracy and mean confidence
    (``calibration_n@b``, ``calibration_acc@b``, ``calibration_conf@b``) for a reliability plot."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    out, ece = {}, 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out[f"calibration_n@{b}"] = float(count)
        if count:
            accuracy, mean_confidence = float(correct[members].mean()), float(confidence[members].mean())
            out[f"calibration_acc@{b}"], out[f"calibration_conf@{b}"] = accuracy, mean_confidence
            ece += count / len(confidence) * abs(accuracy - mean_confidence)
    out["ece"] = ece
    return out


class ClassificationMetrics:
    """Accumulates probabilities and labels over a split; computes the metrics at the end."""

    def __init__(self, num_classes: int, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.num_classes = num_classes
        self.threshold = threshold
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.labelled: np.ndarray | None = None  # the classes the site labels, when not all

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self._probs.append(predictions.detach().cpu().double().numpy())
        self._labels.append(batch["label"].detach().cpu().numpy())
        if "labelled" in batch:
            self.labelled = batch["labelled"][0].detach().cpu().numpy().astype(bool)

    def resampled(self, indices: np.ndarray) -> ClassificationMetrics:
        """These metrics as if updated with the cases at ``indices`` (repeats allowed): a bootstrap draw."""
        other = ClassificationMetrics(self.num_classes, self.threshold)
        other._probs = [np.concatenate(self._probs)[indices]]
        other._labels = [np.concatenate(self._labels)[indices]]
        other.labelled = self.labelled
        return other

    def compute(self) -> dict[str, float]:
        """The metrics; at a site that labels only some classes, over those (probabilities
        renormalised over them), per-class metrics of the others NaN (n/a), plus
        ``labelled_class_k`` (1 or 0) for every class."""
        if not self._labels:
            return {}
        probs = np.concatenate(self._probs)
        labels = np.concatenate(self._labels)
        if self.labelled is None:
            return classification_metrics(probs, labels, self.num_classes, self.threshold)
        probs = np.where(self.labelled, probs, 0.0)
        probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-300)
        out = classification_metrics(probs, labels, self.num_classes, self.threshold, self.labelled)
        return out | {f"labelled_class_{k}": float(self.labelled[k]) for k in range(self.num_classes)}

    def score_counts(self) -> dict[str, float]:
        """Binary tasks: positive and negative cases per score bin (``score_pos@i``, ``score_neg@i``,
        bins between :data:`SCORE_EDGES`), what :func:`operating_point` sums over sites; {} otherwise."""
        if self.num_classes != 2 or not self._labels:
            return {}
        return _score_bin_counts(np.concatenate(self._probs)[:, 1], np.concatenate(self._labels) == 1)


def _score_bin_counts(scores: np.ndarray, positive: np.ndarray, label: str = "") -> dict[str, float]:
    """Cases per score bin (:data:`SCORE_EDGES`), positive and negative: ``score_pos{label}@i``, ``score_neg{label}@i``."""
    bins = np.searchsorted(SCORE_EDGES, scores, side="right")
    out = {}
    for i in range(len(SCORE_EDGES) + 1):
        out[f"score_pos{label}@{i}"] = float(np.sum((bins == i) & positive))
        out[f"score_neg{label}@{i}"] = float(np.sum((bins == i) & ~positive))
    return out


class MultiLabelMetrics:
    """Multi-label: accumulates each label's probability and 0/1 truth over a split; computes per
    label AUROC, sensitivity and specificity at the label's threshold, and their means."""

    def __init__(self, num_labels: int, thresholds: np.ndarray) -> None:
        self.num_labels = num_labels
        self.thresholds = np.asarray(thresholds, dtype=float)
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self._probs.append(predictions.detach().cpu().double().numpy())
        self._labels.append(batch["label"].detach().cpu().numpy().astype(bool))

    def resampled(self, indices: np.ndarray) -> MultiLabelMetrics:
        """These metrics as if updated with the cases at ``indices`` (repeats allowed): a bootstrap draw."""
        other = MultiLabelMetrics(self.num_labels, self.thresholds)
        other._probs = [np.concatenate(self._probs)[indices]]
        other._labels = [np.concatenate(self._labels)[indices]]
        return other

    def compute(self) -> dict[str, float]:
        if not self._labels:
            return {}
        return multilabel_metrics(np.concatenate(self._probs), np.concatenate(self._labels), self.thresholds)

    def score_counts(self) -> dict[str, float]:
        """Each label's positive and negative cases per score bin (``score_pos_class_k@i``, ...)."""
        if not self._labels:
            return {}
        probs, labels = np.concatenate(self._probs), np.concatenate(self._labels)
        out = {}
        for k in range(self.num_labels):
            out.update(_score_bin_counts(probs[:, k], labels[:, k], f"_class_{k}"))
        return out


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """Multi-label metrics from ``(N, K)`` probabilities, ``(N, K)`` 0/1 truth and one threshold per
    label: per label (``_class_k``) AUROC, sensitivity, specificity, prevalence and threshold; their
    means over labels (``auroc``, the primary metric, over labels whose AUROC is defined); accuracy
    over all (case, label) calls and the share of cases with every label right (``exact_match``)."""
    truth = labels.astype(bool)
    called = probs >= np.asarray(thresholds)[None]
    out: dict[str, float] = {}
    aucs, sens, spec = [], [], []
    for k in range(truth.shape[1]):
        t, c = truth[:, k], called[:, k]
        aucs.append(_auroc(t, probs[:, k]))
        sens.append(_ratio(float(np.sum(t & c)), float(np.sum(t))))
        spec.append(_ratio(float(np.sum(~t & ~c)), float(np.sum(~t))))
        out[f"auroc_class_{k}"], out[f"sensitivity_class_{k}"] = aucs[-1], sens[-1]
        out[f"specificity_class_{k}"], out[f"prevalence_class_{k}"] = spec[-1], float(t.mean())
        out[f"threshold_class_{k}"] = float(thresholds[k])
    out.update(
        auroc=_nanmean(aucs),
        sensitivity=_nanmean(sens),
        specificity=_nanmean(spec),
        balanced_accuracy=_nanmean([(a + b) / 2 for a, b in zip(sens, spec, strict=True)]),
        accuracy=float(np.mean(called == truth)),
        exact_match=float(np.mean((called == truth).all(axis=1))),
        num_samples=float(len(truth)),
    )
    return out


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    threshold: float = DEFAULT_THRESHOLD,
    labelled: np.ndarray | None = None,
) -> dict[str, float]:
    """All classification metrics from ``(N, K)`` probabilities and ``(N,)`` labels; binary tasks
    call class 1 when its probability reaches ``threshold``, others take the most probable class.
    Classes not ``labelled`` (``(K,)`` bool; None: all are) get NaN per-class metrics and stay out of
    the macro averages."""
    pred = calls(probs, num_classes, threshold)
    per_class_auc: list[float] = []
    sens: list[float] = []
    spec: list[float] = []
    prec: list[float] = []
    for k in range(num_classes):
        if labelled is not None and not labelled[k]:
            for values in (per_class_auc, sens, spec, prec):
                values.append(float("nan"))
            continue
        truth, called = labels == k, pred == k
        per_class_auc.append(_auroc(truth, probs[:, k]))
        sens.append(_ratio(np.sum(truth & called), np.sum(truth)))
        spec.append(_ratio(np.sum(~truth & ~called), np.sum(~truth)))
        prec.append(_ratio(np.sum(truth & called), np.sum(called)))
    positive = 1 if num_classes == 2 else slice(None)
    out = {
        "auroc": per_class_auc[1] if num_classes == 2 else _nanmean(per_class_auc),
        "accuracy": float(np.mean(pred == labels)),
        "balanced_accuracy": _nanmean(sens),
        "sensitivity": float(np.asarray(sens)[positive].mean()) if num_classes == 2 else _nanmean(sens),
        "specificity": spec[1] if num_classes == 2 else _nanmean(spec),
        "precision": prec[1] if num_classes == 2 else _nanmean(prec),
        "num_samples": float(len(labels)),
    }
    if num_classes == 2:
        out["threshold"] = float(threshold)
    confidence = np.where(pred == 1, probs[:, 1], 1 - probs[:, 1]) if num_classes == 2 else probs.max(axis=1)
    out.update(calibration(confidence, (pred == labels).astype(float)))
    for k in range(num_classes):
        out[f"auroc_class_{k}"] = per_class_auc[k]
        out[f"sensitivity_class_{k}"] = sens[k]
    return out


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, score))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def synthetic_site(
    index: int, samples: int, image_size: int, num_classes: int, seed: int, spatial_dims: int = 2
) -> SiteArrays:
    """Synthetic hospital ``index``, seeded by ``seed``: lesion shapes per class on a smooth background
    (:mod:`medfed.data.synthetic`)."""
    return synthetic.synthetic_site(index, samples, image_size, num_classes, seed, spatial_dims=spatial_dims)
