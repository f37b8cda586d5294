"""Image classification, binary or multi-class.

Samples: ``{"image": (C, *spatial) float, "label": long}``. Predictions: class probabilities.
Metrics: macro AUROC (the primary metric), accuracy, balanced accuracy, sensitivity,
specificity, precision (macro over classes for more than two classes), and per-class AUROC and
sensitivity. A metric that is undefined on the data (AUROC with one class present) is NaN.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RandAffine
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F

from medfed.config import Config
from medfed.models import ConvClassifier

__all__ = [
    "NAME",
    "PRIMARY_METRIC",
    "PRIMARY_METRIC_PER_IMAGE",
    "SAMPLE_KEYS",
    "ClassificationMetrics",
    "RandomShiftRotate",
    "build_model",
    "loss",
    "decode",
    "infer",
    "metrics",
    "train_transform",
]

NAME = "classification"
PRIMARY_METRIC = "auroc"
PRIMARY_METRIC_PER_IMAGE = False  # AUROC is computed over the whole split
SAMPLE_KEYS = ("image", "label")
EXPLAIN_LAYER = "features"


def build_model(config: Config) -> nn.Module:
    """The configured :class:`ConvClassifier` for 1-channel images or volumes (``data.spatial-dims``)."""
    m = config.model
    return ConvClassifier(
        1, config.data.num_classes, config.data.spatial_dims, m.width, m.depth, m.norm_groups, m.dropout, m.norm
    )


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy, mean over the batch (each term depends on one sample only, as DP requires)."""
    return F.cross_entropy(outputs, batch["label"])


def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Class logits ``(B, num_classes)``."""
    return model(images)


def decode(outputs: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, num_classes)``."""
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


def metrics(config: Config) -> ClassificationMetrics:
    return ClassificationMetrics(config.data.num_classes)


class ClassificationMetrics:
    """Accumulates probabilities and labels over a split; computes the metrics at the end."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self._probs.append(predictions.detach().cpu().double().numpy())
        self._labels.append(batch["label"].detach().cpu().numpy())

    def resampled(self, indices: np.ndarray) -> ClassificationMetrics:
        """These metrics as if updated with the cases at ``indices`` (repeats allowed): a bootstrap draw."""
        other = ClassificationMetrics(self.num_classes)
        other._probs = [np.concatenate(self._probs)[indices]]
        other._labels = [np.concatenate(self._labels)[indices]]
        return other

    def compute(self) -> dict[str, float]:
        if not self._labels:
            return {}
        probs = np.concatenate(self._probs)
        labels = np.concatenate(self._labels)
        return classification_metrics(probs, labels, self.num_classes)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """All classification metrics from ``(N, K)`` probabilities and ``(N,)`` labels."""
    pred = probs.argmax(axis=1)
    per_class_auc, sens, spec, prec = [], [], [], []
    for k in range(num_classes):
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
