"""Instance segmentation of 2D images: touching nuclei, cells or lesions, separated and counted one by one.

Samples: ``{"image": (C, H, W) float, "instances": (1, H, W) long, "spacing": (2,) float}``, where
``instances`` is a label image holding one integer per object (0 = background). The network (a
segmentation network of the model zoo) predicts four maps: background, object interior and object
boundary (:func:`training_map`: an object's pixels next to another label), learnt with Dice +
cross-entropy, and a distance map (:func:`distance_map`: each object pixel's distance to its
object's edge, 1 at the object's centre), learnt with the squared error; both per image, as
per-sample clipping under DP requires. :func:`decode` splits the foreground into objects: the
interior where the distance map is high marks each object's core, and a watershed on low distance
and high boundary probability grows the cores over the predicted foreground, so objects that touch
are told apart where the distance dips or a boundary runs between them.

Metrics, each the mean over images: aggregated Jaccard index (``aji``, Kumar et al. 2017),
panoptic quality ``pq`` = ``sq`` (mean IoU of matched objects) x ``dq``, where matches are
object pairs with IoU > 0.5 (``dq`` is then the object F1 at IoU 0.5, reported as ``f1_50``),
semantic foreground Dice (``dice``) and the absolute count error (``count_error_mean``).
Predicted objects smaller than ``evaluation.min-structure-size`` pixels are dropped first.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from monai.losses import DiceCELoss
from scipy import ndimage
from torch import nn

from medfed.config import Config, require
from medfed.data import synthetic
from medfed.data.arrays import SiteArrays
from medfed.models.zoo import build_network
from medfed.tasks import segmentation

__all__ = [
    "NAME",
    "PRIMARY_METRIC",
    "PRIMARY_METRIC_PER_IMAGE",
    "SAMPLE_KEYS",
    "SPATIAL_DIMS",
    "TARGET",
    "InstanceMetrics",
    "build_model",
    "check_config",
    "decode",
    "image_scores",
    "infer",
    "instance_labels",
    "loss",
    "metrics",
    "operating_point",
    "pooled_metrics",
    "remove_small_instances",
    "synthetic_site",
    "train_transform",
    "training_map",
]

NAME = "instance-segmentation"
PRIMARY_METRIC = "aji"
PRIMARY_METRIC_PER_IMAGE = True  # AJI is the mean of per-image AJI
TARGET = "instances"  # the sample key (and manifest column) of the instance label images
SAMPLE_KEYS = ("image", TARGET)
SPATIAL_DIMS = (2,)
CLASSES = 3  # background, interior, boundary
MAPS = CLASSES + 1  # and the distance map
MATCH_IOU = 0.5
SEED_DISTANCE = 0.6  # markers: where the predicted distance map exceeds this
SEED_MIN_SIZE = 3  # pixels: smaller markers are the specks a noisy distance map leaves, dropped

_LOSS = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)


def check_config(config: Config) -> None:
    """One object class (background and object), and random patches when views differ."""
    require(
        config.data.num_classes == 2,
        "data.num-classes",
        config.data.num_classes,
        "2 for run.task = 'instance-segmentation' (background and object; objects are told apart by instance)",
    )
    require(
        config.train.augmentations == 1 or config.data.patch_size > 0,
        "train.augmentations",
        config.train.augmentations,
        "1 unless the views differ: set data.patch-size > 0 (random patches)",
    )
    require(not config.train.logit_adjust, "train.logit-adjust", True, "false: it is for classification")
    require(
        config.data.field_of_view == "whole",
        "data.field-of-view",
        config.data.field_of_view,
        "'whole' for run.task = 'instance-segmentation' (field-of-view masks are for fundus photos)",
    )


def build_model(config: Config) -> nn.Module:
    """The ``model.name`` segmentation network of the model zoo with four output maps
    (background, interior, boundary, distance); see :func:`medfed.tasks.segmentation.build_model`."""
    network = copy.copy(config)  # the same run with 4 "classes" for the network only
    object.__setattr__(network, "data", dataclasses.replace(config.data, num_classes=MAPS))
    return build_network(NAME, network)


def training_map(instances: torch.Tensor) -> torch.Tensor:
    """The 3-class map ``(B, 1, H, W)`` of instance label images ``(B, 1, H, W)``: 0 background,
    1 object interior, 2 boundary (an object pixel with a different label among its 8 neighbours;
    the image's edge is no boundary)."""
    labels = instances.float()
    padded = nn.functional.pad(labels, (1, 1, 1, 1), mode="replicate")
    high = nn.functional.max_pool2d(padded, 3, stride=1)
    low = -nn.functional.max_pool2d(-padded, 3, stride=1)
    boundary = (instances > 0) & (high != low)
    return torch.where(boundary, 2, (instances > 0).long())


def distance_map(instances: torch.Tensor) -> torch.Tensor:
    """Each object pixel's distance to the nearest pixel of another label (background or another
    object), divided by the largest such distance in its object: ``(B, 1, H, W)`` in [0, 1], 1 at
    each object's centre, near 0 along its edge and where it touches another object (0 on the
    background; the image's edge is no edge)."""
    labels = instances.detach().cpu().numpy()[:, 0]
    edges = training_map(instances.detach().cpu()).numpy()[:, 0] != 1
    out = np.zeros(labels.shape, dtype=np.float32)
    for i, (image, edge) in enumerate(zip(labels, edges, strict=True)):
        distance = (ndimage.distance_transform_edt(~edge) + 1) * (image > 0)  # 1 on an object's edge
        ids = np.arange(1, int(image.max()) + 1)
        peak = np.zeros(len(ids) + 1)
        peak[1:] = ndimage.maximum(distance, image, ids) if len(ids) else []
        out[i] = np.divide(distance, peak[image], out=np.zeros_like(out[i]), where=image > 0)
    return torch.as_tensor(out, device=instances.device)[:, None]


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dice + cross-entropy on the 3-class map, per image, plus the mean squared error of the
    distance map (:func:`distance_map`, through a sigmoid), averaged over the batch."""
    instances = batch[TARGET]
    classes = _LOSS(outputs[:, :CLASSES], training_map(instances))
    error = (torch.sigmoid(outputs[:, CLASSES:]) - distance_map(instances)) ** 2
    return classes + error.mean()


def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Logits of the three maps for whole images (sliding windows of ``data.patch-size`` when set)."""
    return segmentation.infer(model, images, config)


def maps(outputs: torch.Tensor) -> torch.Tensor:
    """The network's logits ``(B, 4, ...)`` as maps: the three class probabilities (softmax) and
    the distance map (sigmoid)."""
    outputs = outputs.detach().float()
    return torch.cat([torch.softmax(outputs[:, :CLASSES], dim=1), torch.sigmoid(outputs[:, CLASSES:])], dim=1)


def decode(outputs: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """Instance label images ``(B, 1, H, W)`` (0 = background, objects 1, 2, ...) from the network's logits."""
    found = maps(outputs).cpu().numpy()
    return torch.as_tensor(np.stack([instance_labels(m)[None] for m in found]), device=outputs.device)


def instance_labels(found: np.ndarray) -> np.ndarray:
    """Objects ``(H, W)`` int64 from the maps ``(4, H, W)`` (:func:`maps`).

    Foreground: pixels whose most probable class is interior or boundary. Markers: the connected
    regions of foreground where the distance map exceeds :data:`SEED_DISTANCE` (each object's
    core) of at least :data:`SEED_MIN_SIZE` pixels, plus every foreground region holding no core
    (a small object). The watershed
    (``scipy.ndimage.watershed_ift``) floods 1 - distance from the markers and from the
    background, so touching objects split where the distance map dips between them; foreground
    pixels the background basin took go to the nearest object.
    """
    probs, distance = found[:CLASSES], found[CLASSES]
    call = probs.argmax(axis=0)
    foreground = call > 0
    markers = remove_small_instances(ndimage.label((call == 1) & (distance > SEED_DISTANCE))[0], SEED_MIN_SIZE)
    count = int(markers.max())
    regions, region_count = ndimage.label(foreground)
    if region_count:
        unmarked = np.setdiff1d(np.arange(1, region_count + 1), regions[markers > 0])
        extra = np.isin(regions, unmarked)
        markers[extra] = count + np.searchsorted(unmarked, regions[extra]) + 1
        count += len(unmarked)
    if count == 0:
        return np.zeros(foreground.shape, dtype=np.int64)
    markers[~foreground & (probs[0] > 0.5)] = count + 1  # the background floods too, as one more basin
    cost = np.round(127.5 * (1 - np.clip(distance, 0, 1) + probs[2])).astype(np.uint8)
    flooded = ndimage.watershed_ift(cost, markers.astype(np.int32))
    labels = np.where(foreground & (flooded <= count), flooded, 0)
    lost = foreground & (labels == 0)  # edge pixels the background basin reached first
    if lost.any():
        nearest = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
        labels[lost] = labels[nearest[0][lost], nearest[1][lost]]
    return _consecutive(labels)


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 1, 2, ... in order of their old ids (0 stays 0)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    start = 0 if ids[0] == 0 else 1
    return (inverse.reshape(labels.shape) + start).astype(np.int64)


def remove_small_instances(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` without the objects of fewer than ``min_size`` pixels, renumbered (0 keeps all)."""
    if min_size <= 0 or not labels.any():
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return _consecutive(np.where(small[labels], 0, labels))


def train_transform(config: Config) -> segmentation._RandomPatch | None:
    """One random ``data.patch-size`` patch per image, centred on an object or on background 1:1."""
    if not config.data.patch_size:
        return None
    return segmentation._RandomPatch(config.data.patch_size, config.data.spatial_dims, TARGET)


def metrics(config: Config) -> InstanceMetrics:
    return InstanceMetrics(config.evaluation.min_structure_size)


def image_scores(prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """AJI, PQ, SQ, DQ (= object F1 at IoU 0.5), foreground Dice and count error of one image's
    predicted objects against its reference objects (label images, 0 = background). Scores that
    are undefined on an image with no object in either are NaN."""
    truth_ids, truth = np.unique(reference, return_inverse=True)
    pred_ids, pred = np.unique(prediction, return_inverse=True)
    truth = truth.ravel() + (truth_ids[0] != 0)  # 0 stays background, objects from 1
    pred = pred.ravel() + (pred_ids[0] != 0)
    n_truth, n_pred = int(truth.max()), int(pred.max())
    table = np.bincount(truth * (n_pred + 1) + pred, minlength=(n_truth + 1) * (n_pred + 1))
    table = table.reshape(n_truth + 1, n_pred + 1).astype(np.float64)
    truth_area, pred_area = table[1:].sum(axis=1), table[:, 1:].sum(axis=0)
    inter = table[1:, 1:]
    union = truth_area[:, None] + pred_area[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    out = {"count_error": float(abs(n_pred - n_truth))}
    fg_truth, fg_pred = truth_area.sum(), pred_area.sum()
    both = fg_truth + fg_pred
    out["dice"] = 2 * float(inter.sum()) / both if both else math.nan
    if n_truth + n_pred == 0:
        return out | {"aji": math.nan, "pq": math.nan, "sq": math.nan, "dq": math.nan}
    # AJI: each reference object with its best-IoU overlapping prediction; the areas of reference
    # objects that overlap none, and of predictions paired with none, only add to the union
    rows = np.arange(n_truth)
    best = iou.argmax(axis=1) if n_pred else np.zeros(n_truth, dtype=np.int64)
    paired = iou[rows, best] > 0 if n_pred else np.zeros(n_truth, dtype=bool)
    used = np.zeros(n_pred, dtype=bool)
    used[best[paired]] = True
    common = inter[rows[paired], best[paired]].sum()
    joint = union[rows[paired], best[paired]].sum() + truth_area[~paired].sum() + pred_area[~used].sum()
    out["aji"] = float(common / joint)
    # PQ: IoU > 0.5 makes at most one match per object
    matched = iou > MATCH_IOU
    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_truth - tp
    out["sq"] = float(iou[matched].mean()) if tp else 0.0
    out["dq"] = tp / (tp + 0.5 * fp + 0.5 * fn)
    out["pq"] = out["sq"] * out["dq"]
    return out


class InstanceMetrics:
    """Accumulates per-image instance scores (:func:`image_scores`) over a split; the means are the metrics."""

    def __init__(self, min_structure_size: int = 0) -> None:
        self.min_structure_size = min_structure_size
        self.cases: list[dict[str, float]] = []

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        truth = batch[TARGET].cpu().numpy()[:, 0]
        for pred, ref in zip(predictions.cpu().numpy()[:, 0], truth, strict=True):
            self.cases.append(image_scores(remove_small_instances(pred, self.min_structure_size), ref))

    def compute(self) -> dict[str, float]:
        out = {}
        for name in ("aji", "pq", "sq", "dq", "dice", "count_error"):
            values = [c[name] for c in self.cases if math.isfinite(c[name])]
            out[name] = float(np.mean(values)) if values else math.nan
        out["f1_50"] = out["dq"]
        out["count_error_mean"] = out.pop("count_error")
        return out


def operating_point(val_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Instance segmentation has no threshold to choose: {}."""
    return {}


def pooled_metrics(test_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Instance scores are per image: nothing to pool, {}."""
    return {}


def synthetic_site(
    index: int, samples: int, image_size: int, num_classes: int, seed: int, spatial_dims: int = 2
) -> SiteArrays:
    """Synthetic hospital ``index``, seeded by ``seed``: touching nuclei and their instance labels
    (:func:`medfed.data.synthetic.synthetic_instance_site`)."""
    return synthetic.synthetic_instance_site(index, samples, image_size, seed)
