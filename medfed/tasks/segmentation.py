"""Semantic segmentation of 2D images or 3D volumes (lesions, organs, vessels), background = class 0.

Samples: ``{"image": (C, *spatial) float, "mask": (1, *spatial) long, "spacing": (D,) float}``.
Predictions: label maps ``(B, 1, *spatial)``. Loss: Dice + cross-entropy computed per image
(``batch=False``), so every term depends on one sample only, as per-sample clipping under DP
requires. With ``data.patch-size`` > 0 training sees one random patch per image per step (half
of them centred on foreground) and evaluation runs sliding-window inference over whole images.

Pixels labelled ``IGNORE`` (-1: outside a fundus photo's field of view, ``data.field-of-view``)
are neither learned nor scored.

A site that labels only some structures (its label map, :mod:`medfed.data.label_map`) trains
with the marginal loss (:func:`marginal_loss`) and is scored on those structures only.

Metrics on the foreground classes, averaged over classes and per class (``dice_class_1``, ...):
Dice (mean over images that contain the class), IoU and the 95th-percentile Hausdorff distance
in mm (``monai.metrics``); pooled voxel Dice; and from per-case quantification (structure count,
area in mm² or volume in mL from the real voxel size) the median absolute relative size error
and the mean absolute count error.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable
from typing import Any, cast

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, MaskedDiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from monai.networks.utils import one_hot
from monai.transforms import RandCropByPosNegLabeld
from monai.transforms.utils import map_binary_to_indices
from torch import nn

from medfed.config import Config, require
from medfed.data import synthetic
from medfed.data.arrays import SiteArrays
from medfed.data.field_of_view import IGNORE
from medfed.evaluation.quantify import quantify_case, remove_small_structures
from medfed.models.zoo import build_network

__all__ = [
    "NAME",
    "PRIMARY_METRIC",
    "PRIMARY_METRIC_PER_IMAGE",
    "SAMPLE_KEYS",
    "SPATIAL_DIMS",
    "TARGET",
    "SegmentationMetrics",
    "build_model",
    "check_config",
    "decode",
    "infer",
    "loss",
    "marginal_loss",
    "metrics",
    "operating_point",
    "pooled_metrics",
    "synthetic_site",
    "train_transform",
]

NAME = "segmentation"
PRIMARY_METRIC = "dice"
PRIMARY_METRIC_PER_IMAGE = True  # Dice is the mean of per-image Dice
TARGET = "mask"  # the sample key (and manifest column) of what the task learns
SAMPLE_KEYS = ("image", TARGET)
SPATIAL_DIMS = (2, 3)  # the image dimensions the task works in

_LOSS = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
_MASKED_DICE = MaskedDiceLoss(to_onehot_y=True, softmax=True, batch=False)
_SMOOTH = 1e-5  # MONAI DiceLoss' smooth_nr and smooth_dr


def check_config(config: Config) -> None:
    """The settings segmentation needs: background and at least one structure, and random patches
    when each image's gradient is averaged over several views."""
    require(
        config.data.num_classes >= 2,
        "data.num-classes",
        config.data.num_classes,
        "an integer >= 2 for run.task = 'segmentation' (background counts as class 0)",
    )
    require(
        config.train.augmentations == 1 or config.data.patch_size > 0,
        "train.augmentations",
        config.train.augmentations,
        "1 unless the views differ: set data.patch-size > 0 (random patches)",
    )
    require(not config.train.logit_adjust, "train.logit-adjust", True, "false: it is for classification")


def build_model(config: Config) -> nn.Module:
    """The ``model.name`` network of the model zoo for ``data.channels``-channel images or volumes.

    The default, ``unet``, is a MONAI U-Net (2D or 3D from ``data.spatial-dims``) with GroupNorm and
    ReLU (not in place): ``model.width`` channels at full resolution, doubled at each of
    ``model.depth`` levels. ``data.patch-size`` (or ``data.image-size``) must be a multiple of the
    network's total downsampling.
    """
    return build_network(NAME, config)


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dice + cross-entropy, per image, averaged over the batch; pixels labelled
    :data:`~medfed.data.field_of_view.IGNORE` (outside a photo's field of view) do not count. At a
    site that labels only some structures (``labelled`` in the batch, from its label map): the
    marginal loss, :func:`marginal_loss`."""
    mask = batch["mask"]
    labelled = batch.get("labelled")
    if labelled is not None:
        return marginal_loss(outputs, mask, labelled)
    if not (mask == IGNORE).any():
        return _LOSS(outputs, mask)
    inside = (mask != IGNORE).to(outputs.dtype)
    target = mask.clamp(min=0)
    dice = _MASKED_DICE(outputs, target, mask=inside)
    per_pixel = nn.functional.cross_entropy(outputs, target[:, 0], reduction="none") * inside[:, 0]
    counted = inside[:, 0].flatten(1).sum(dim=1).clamp(min=1.0)
    cross_entropy = (per_pixel.flatten(1).sum(dim=1) / counted).mean()  # per image, as DP requires
    return dice + cross_entropy


def marginal_loss(outputs: torch.Tensor, mask: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Marginal Dice + cross-entropy (Shi et al. 2021, "Marginal loss and exclusion loss for
    partially supervised multi-organ segmentation") for images whose site labels only the classes
    ``labelled`` ``(B, K)``: a pixel the site calls background may be a structure it does not
    label, so the softmax probabilities of background and of every unlabelled structure are summed
    into one background-or-unlabelled channel, and Dice (over the labelled classes, background
    included, as in :data:`_LOSS`) and cross-entropy are computed on the merged probabilities.
    Per image, averaged over the batch (as DP requires); :data:`IGNORE` pixels do not count. With
    every class labelled it equals the plain Dice + cross-entropy."""
    keep = labelled.bool().clone()
    keep[:, 0] = True
    keep = keep.view(*keep.shape, *(1,) * (outputs.ndim - 2))
    log_probs = torch.log_softmax(outputs, dim=1)
    merged_out = ~keep
    merged_out[:, 0] = True  # background and the unlabelled structures
    background = torch.logsumexp(log_probs.masked_fill(~merged_out, float("-inf")), dim=1, keepdim=True)
    merged = torch.cat([background, log_probs[:, 1:].masked_fill(~keep[:, 1:], float("-inf"))], dim=1)
    inside = mask != IGNORE
    target = mask.clamp(min=0)
    known = keep.flatten(1).gather(1, target.flatten(1)).view_as(target)
    target = torch.where(known, target, 0)  # a pixel of an unlabelled structure: background-or-unlabelled
    weight = inside.to(outputs.dtype)
    per_pixel = nn.functional.nll_loss(merged, target[:, 0], reduction="none") * weight[:, 0]
    cross_entropy = per_pixel.flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp(min=1.0)
    probs = merged.exp() * weight
    truth = one_hot(target, outputs.shape[1]).to(outputs.dtype) * weight
    overlap = (probs * truth).flatten(2).sum(dim=2)
    sizes = probs.flatten(2).sum(dim=2) + truth.flatten(2).sum(dim=2)
    dice = 1.0 - (2.0 * overlap + _SMOOTH) / (sizes + _SMOOTH)  # (B, K), as MONAI's DiceLoss
    classes = keep.flatten(1).to(outputs.dtype)
    return ((dice * classes).sum(dim=1) / classes.sum(dim=1) + cross_entropy).mean()


def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Logits for whole images: sliding windows of ``data.patch-size`` (Gaussian-weighted) when set."""
    patch = config.data.patch_size
    if patch and max(images.shape[2:]) > patch:
        roi = (patch,) * (images.ndim - 2)
        windows = sliding_window_inference(images, roi, sw_batch_size=8, predictor=model, overlap=0.25, mode="gaussian")
        return cast(torch.Tensor, windows)  # one tensor, as the predictor (the model) returns one
    return model(images)


def decode(outputs: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """Label maps ``(B, 1, *spatial)``."""
    return outputs.argmax(dim=1, keepdim=True)


def train_transform(config: Config) -> _RandomPatch | None:
    """One random ``data.patch-size`` patch per image (foreground- or background-centred, 1:1)."""
    return _RandomPatch(config.data.patch_size, config.data.spatial_dims) if config.data.patch_size else None


class _RandomPatch:
    """One random patch per image, centred on foreground or on background 1:1. Pixels outside a
    photo's field of view (label -1) are neither: MONAI would count any non-zero label as
    foreground, and on the retinal sites ~75-85 % of the "foreground" centres fell outside the
    field of view, where nothing is scored."""

    def __init__(self, size: int, spatial_dims: int, key: str = TARGET) -> None:
        self.key = key  # the sample key of the label image: "mask", or "instances" (instance segmentation)
        self._crop = RandCropByPosNegLabeld(
            keys=["image", "mask"], label_key="mask", spatial_size=(size,) * spatial_dims, pos=1, neg=1,
            num_samples=1, fg_indices_key="foreground", bg_indices_key="background",
        )  # fmt: skip

    def set_random_state(self, seed: int) -> None:
        """Make the patch choice repeatable (the site seeds each round's training)."""
        self._crop.set_random_state(seed=seed % 2**32)

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = sample[self.key]
        foreground, background = map_binary_to_indices(mask > 0, image=mask >= 0, image_threshold=0)
        crop_input: dict[Hashable, Any] = {"image": sample["image"], "mask": mask}
        crop_input |= {"foreground": foreground, "background": background}  # flat indices (numpy or torch)
        with warnings.catch_warnings():  # an image without foreground gives a background centre: expected
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            patch = self._crop(crop_input)[0]
        out = dict(sample)
        out["image"] = torch.as_tensor(patch["image"]).as_subclass(torch.Tensor).contiguous()
        out[self.key] = torch.as_tensor(patch["mask"]).as_subclass(torch.Tensor).long().contiguous()
        return out


def metrics(config: Config) -> SegmentationMetrics:
    return SegmentationMetrics(config.data.num_classes, config.evaluation.min_structure_size)


class SegmentationMetrics:
    """Accumulates per-image Dice, IoU, HD95 and quantification, and pooled voxel counts, over a split.

    Predicted structures smaller than ``min_structure_size`` pixels (voxels) are removed first
    (``evaluation.min-structure-size``), as ``medfed predict`` removes them.
    """

    def __init__(self, num_classes: int, min_structure_size: int = 0) -> None:
        self.num_classes = num_classes
        self.min_structure_size = min_structure_size
        self._dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self._iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)
        self._hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        self._counts = np.zeros((num_classes, 3))  # per class: true positives, false positives, false negatives
        self.cases: list[dict[str, float]] = []
        self.labelled: np.ndarray | None = None  # the classes the site labels, when not all

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        truth = batch["mask"].to(predictions.device)
        if "labelled" in batch:  # a structure the site does not label is background-or-unlabelled there
            labelled = batch["labelled"][0].to(predictions.device).bool()
            self.labelled = labelled.cpu().numpy()
            predictions = torch.where(labelled[predictions], predictions, 0)
        outside = truth == IGNORE  # outside a photo's field of view: counted as background in both, never scored
        if outside.any():
            truth = truth.masked_fill(outside, 0)
            predictions = predictions.masked_fill(outside, 0)
        if self.min_structure_size:
            cleaned = [remove_small_structures(p, self.min_structure_size) for p in predictions.cpu().numpy()]
            predictions = torch.as_tensor(np.stack(cleaned)).to(truth.device)
        if "spacing" in batch:
            spacing = batch["spacing"].double().cpu().numpy()
        else:  # no voxel size known: sizes and distances in pixels
            spacing = np.ones((len(truth), truth.ndim - 2))
        pred_1h = one_hot(predictions, self.num_classes)
        true_1h = one_hot(truth, self.num_classes)
        self._dice(pred_1h, true_1h)
        self._iou(pred_1h, true_1h)
        scored = slice(None) if self.labelled is None else torch.as_tensor(self.labelled[1:])
        both = (pred_1h[:, 1:].flatten(2).any(-1) & true_1h[:, 1:].flatten(2).any(-1))[:, scored].all(dim=1)
        if both.any():  # HD95 is defined only where the class is both predicted and present
            with warnings.catch_warnings():  # MONAI's own deprecated argument, passed inside MONAI
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf")  # unlabelled
                self._hd95(pred_1h[both], true_1h[both], spacing=[tuple(s) for s in spacing[both.cpu().numpy()]])
        for k in range(self.num_classes):
            p, t = predictions == k, truth == k
            self._counts[k] += [float((p & t).sum()), float((p & ~t).sum()), float((~p & t).sum())]
        pred_np, truth_np = predictions.cpu().numpy()[:, 0], truth.cpu().numpy()[:, 0]
        for pred, ref, space in zip(pred_np, truth_np, spacing, strict=True):
            self.cases.append(quantify_case(pred, ref, space))

    def compute(self) -> dict[str, float]:
        """The metrics; at a site that labels only some structures, the others' per-class metrics
        are NaN (n/a) and stay out of the means, and ``labelled_class_k`` (1 or 0) says which."""
        per_class = {
            "dice": self._nan_mean_per_class(self._dice),
            "iou": self._nan_mean_per_class(self._iou),
            "hd95": self._nan_mean_per_class(self._hd95),
        }
        if self.labelled is not None:
            unlabelled = ~self.labelled[1:]
            per_class = {name: [math.nan if unlabelled[k] else v for k, v in enumerate(values)]
                         for name, values in per_class.items()}  # fmt: skip
        out = {name: _mean(values) for name, values in per_class.items()}
        tp, fp, fn = self._counts[1:].sum(axis=0)
        out["dice_pooled"] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else math.nan
        for name, values in per_class.items():
            for k, value in enumerate(values, start=1):
                out[f"{name}_class_{k}"] = value
        rel = [abs(c["rel_size_error"]) for c in self.cases if math.isfinite(c["rel_size_error"])]
        out["rel_size_error_median"] = float(np.median(rel)) if rel else math.nan
        out["count_error_mean"] = (
            float(np.mean([abs(c["count"] - c["reference_count"]) for c in self.cases])) if self.cases else math.nan
        )
        if self.labelled is not None:
            out |= {f"labelled_class_{k}": float(self.labelled[k]) for k in range(self.num_classes)}
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


def operating_point(val_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Segmentation has no threshold to choose (a pixel takes its most probable class): {}."""
    return {}


def pooled_metrics(test_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Segmentation pools nothing beyond ``dice_pooled``, which each site reports: {}."""
    return {}


def synthetic_site(
    index: int, samples: int, image_size: int, num_classes: int, seed: int, spatial_dims: int = 2
) -> SiteArrays:
    """Synthetic hospital ``index``, seeded by ``seed``: lesions and their label masks
    (:mod:`medfed.data.synthetic`)."""
    return synthetic.synthetic_segmentation_site(
        index, samples, image_size, num_classes, seed, spatial_dims=spatial_dims
    )
