"""2D semantic segmentation (lesions, structures), background = class 0.

Samples: ``{"image": (C, H, W) float, "mask": (1, H, W) long}``. Predictions: label maps
``(B, 1, H, W)``. Loss: Dice + cross-entropy computed per image (``batch=False``), so every
term depends on one sample only, as per-sample clipping under DP requires. Metrics on the
foreground classes: Dice (mean over images that contain the class), pooled pixel Dice, IoU and
the 95th-percentile Hausdorff distance in pixels (``monai.metrics``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from torch import nn

from medfed.config import Config

__all__ = ["NAME", "PRIMARY_METRIC", "SAMPLE_KEYS", "SegmentationMetrics", "build_model", "loss", "metrics", "predict"]

NAME = "segmentation"
PRIMARY_METRIC = "dice"
SAMPLE_KEYS = ("image", "mask")

_LOSS = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)


def build_model(config: Config) -> nn.Module:
    """A MONAI U-Net with GroupNorm and ReLU (not in place): Opacus-valid.

    ``model.width`` channels at full resolution, doubled at each of ``model.depth`` levels.
    """
    m = config.model
    channels = tuple(m.width * 2**level for level in range(m.depth))
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=config.data.num_classes,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=0,
        act=("relu", {"inplace": False}),
        norm=("group", {"num_groups": m.norm_groups}) if m.norm == "group" else None,
        dropout=m.dropout,
    )


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dice + cross-entropy, per image, averaged over the batch."""
    return _LOSS(outputs, batch["mask"])


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label maps ``(B, 1, H, W)``."""
    return model(batch["image"]).argmax(dim=1, keepdim=True)


def metrics(config: Config) -> SegmentationMetrics:
    return SegmentationMetrics(config.data.num_classes)


class SegmentationMetrics:
    """Accumulates per-image Dice, IoU and HD95 and pooled pixel counts over a split."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self._iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)
        self._hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        self._counts = np.zeros((num_classes, 3))  # per class: true positives, false positives, false negatives

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        truth = batch["mask"].to(predictions.device)
        pred_1h = one_hot(predictions, self.num_classes)
        true_1h = one_hot(truth, self.num_classes)
        self._dice(pred_1h, true_1h)
        self._iou(pred_1h, true_1h)
        both = (pred_1h[:, 1:].flatten(2).any(-1) & true_1h[:, 1:].flatten(2).any(-1)).all(dim=1)
        if both.any():  # HD95 is defined only where the class is both predicted and present
            self._hd95(pred_1h[both], true_1h[both])
        for k in range(self.num_classes):
            p, t = predictions == k, truth == k
            self._counts[k] += [float((p & t).sum()), float((p & ~t).sum()), float((~p & t).sum())]

    def compute(self) -> dict[str, float]:
        dice = self._nan_mean_per_class(self._dice)
        out = {"dice": _mean(dice), "iou": _mean(self._nan_mean_per_class(self._iou))}
        out["hd95"] = _mean(self._nan_mean_per_class(self._hd95))
        tp, fp, fn = self._counts[1:].sum(axis=0)
        out["dice_pooled"] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else math.nan
        for k, value in enumerate(dice, start=1):
            out[f"dice_class_{k}"] = value
        return out

    @staticmethod
    def _nan_mean_per_class(metric: DiceMetric | MeanIoU | HausdorffDistanceMetric) -> list[float]:
        try:
            values = metric.get_buffer()
        except (AttributeError, ValueError):
            return []
        if values is None or len(values) == 0:
            return []
        arr = values.detach().cpu().double().numpy()
        arr[~np.isfinite(arr)] = np.nan
        return [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in arr.T]


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
