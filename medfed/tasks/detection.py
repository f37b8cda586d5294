"""Object detection (lesions, nodules, cells) in 2D images or 3D volumes: boxes with a class and a score.

Samples: ``{"image": (C, *spatial) float, "boxes": (M, 2 * dims + 1) float}``, one row
``[x1, y1, x2, y2, class]`` (2D) or ``[x1, y1, z1, x2, y2, z2, class]`` (3D) per object in
model-input voxels (x along the last array axis, y the one before, z the first of a volume),
padding rows with class -1; an image without objects is a legal negative. The model is a
CenterNet-style detector (:class:`medfed.models.CenterNet`): a heatmap of object centres per class,
box size and centre offset at 1/4 (images) or 1/2 (volumes) resolution. Loss, per image (as per-sample clipping under DP
requires): the penalty-reduced focal loss on the centre heatmap plus L1 on log box size and centre
offset at the reference centres, each divided by the image's object count.

Predictions ``(B, K, 2 * dims + 2)``: rows ``[*corners, score, class]``, local maxima of the
heatmap, then per-class non-maximum suppression (``monai.data.box_utils.batched_nms``, 3D boxes in
3D), best first, padding rows with class -1.

Metrics: COCO average precision per class and mean, at IoU 0.5 (``map50``, the primary metric)
and over IoU 0.50:0.05:0.95 (``map``), with up to 100 detections per image. Matching is MONAI's
COCO matching (``monai.apps.detection.metrics.matching``); precision is accumulated in float64 as
pycocotools does (MONAI's ``COCOMetric`` accumulates in float32, which moves recall-threshold
look-ups and differs from pycocotools in the 3rd decimal). FROC: sensitivity at LUNA16's operating
points, 0.125-8 false positives per image (scan), all classes pooled, and its mean (``froc``: in
3D LUNA16's CPM). A hit in 2D: IoU >= 0.5 with the right class; in 3D, as LUNA16 scores nodules:
the detection's centre inside the object (:func:`centre_hits`) with the right class, a second hit
on a found object counting neither way (:func:`froc_candidates`). Precision at recall 0, 0.1, ..., 1
per class at IoU 0.5 is returned too (``pr50_class_k@r``), for the report's PR curves: aggregates,
not cases.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import batched_nms
from monai.metrics.froc import compute_froc_curve_data, compute_froc_score
from torch import nn
from torch.nn import functional as F

from medfed.config import Config, require
from medfed.data import synthetic
from medfed.data.arrays import SiteArrays
from medfed.models import OUTPUT_STRIDES
from medfed.models.zoo import build_network

__all__ = [
    "FROC_FP_RATES",
    "NAME",
    "PRIMARY_METRIC",
    "PRIMARY_METRIC_PER_IMAGE",
    "SAMPLE_KEYS",
    "SPATIAL_DIMS",
    "TARGET",
    "DetectionMetrics",
    "RandomFlip",
    "box_iou",
    "build_model",
    "centre_hits",
    "check_config",
    "decode",
    "froc_candidates",
    "infer",
    "loss",
    "metrics",
    "operating_point",
    "pooled_metrics",
    "synthetic_site",
    "train_transform",
]

NAME = "detection"
PRIMARY_METRIC = "map50"
PRIMARY_METRIC_PER_IMAGE = False  # mAP is computed over the whole split
TARGET = "boxes"  # the sample key (and manifest column) of what the task learns
SAMPLE_KEYS = ("image", TARGET)
SPATIAL_DIMS = (2, 3)  # the image dimensions the task works in

MAX_DETECTIONS = 100
SCORE_THRESHOLD = 0.01
NMS_IOU = 0.5
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
PR_RECALLS = np.linspace(0.0, 1.0, 11)
GAUSSIAN_ALPHA = 0.54  # centre heatmap: sigma = alpha * box side / 6 (TTFNet)


def check_config(config: Config) -> None:
    """The settings detection needs: whole images resized as they are (boxes scale with them);
    volumes from site folders or synthetic sites."""
    require(
        not config.data.target_spacing,
        "data.target-spacing",
        list(config.data.target_spacing),
        "[] for run.task = 'detection' (whole images are resized; boxes scale with them)",
    )
    require(not config.train.logit_adjust, "train.logit-adjust", True, "false: it is for classification")
    require(
        config.data.spatial_dims == 2 or config.data.source in ("synthetic", "sites"),
        "data.source",
        config.data.source,
        "'synthetic' or 'sites' for 3D detection (data.spatial-dims = 3): Pascal VOC holds 2D images",
    )


def build_model(config: Config) -> nn.Module:
    """The ``model.name`` :class:`medfed.models.CenterNet` of the model zoo for ``data.channels``-channel
    images or volumes (``data.spatial-dims``); ``data.image-size`` must be a multiple of its total stride."""
    return build_network(NAME, config)


def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Raw head outputs ``(B, num_classes + 2 * dims, *spatial / 4)``."""
    return model(images)


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Focal loss on centres + L1 on log size and offset, per image over its objects, mean over the batch."""
    dims = outputs.ndim - 2
    num_classes = outputs.shape[1] - 2 * dims
    boxes = batch["boxes"].to(outputs.dtype)
    heatmap, centres, valid, regression = _encode(boxes, num_classes, outputs.shape[2:])
    logits = outputs[:, :num_classes]
    prob = torch.sigmoid(logits)
    positive = torch.zeros_like(logits, dtype=torch.bool)
    batch_index = torch.arange(len(boxes), device=boxes.device)[:, None].expand_as(valid)
    positive[(batch_index[valid], *(index[valid] for index in centres.unbind(-1)))] = True
    pos_term = -F.logsigmoid(logits) * (1 - prob) ** 2
    neg_term = -F.logsigmoid(-logits) * prob**2 * (1 - heatmap) ** 4
    focal = torch.where(positive, pos_term, neg_term).flatten(1).sum(1)
    count = positive.flatten(1).sum(1).clamp(min=1)
    flat = outputs[:, num_classes:].flatten(2)  # (B, 2 * dims, voxels)
    voxel = _flat_index(centres[..., 1:], outputs.shape[2:])
    gathered = flat.gather(2, voxel[:, None].expand(-1, 2 * dims, -1)).transpose(1, 2)  # (B, M, 2 * dims)
    l1 = ((gathered - regression).abs().sum(-1) * valid).sum(1)
    return ((focal + l1) / count).mean()


def _flat_index(voxels: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Flat (row-major) indices of ``(..., dims)`` voxel indices in array-axis order into ``shape``."""
    index = torch.zeros_like(voxels[..., 0])
    for axis, n in enumerate(shape):
        index = index * int(n) + voxels[..., axis]
    return index


def _encode(
    boxes: torch.Tensor, num_classes: int, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets at output resolution from boxes ``(B, M, 2 * dims + 1)``.

    Returns the Gaussian centre heatmap ``(B, num_classes, *shape)``, the integer centre of each
    box ``(B, M, 1 + dims)`` as (class, voxel index in array-axis order: z, y, x), which rows are
    objects ``(B, M)``, and the regression targets ``(B, M, 2 * dims)``: log size along x, y (z) in
    output pixels and the offset of the true centre along the same axes.
    """
    dims = len(shape)
    sizes = [int(n) for n in reversed(shape)]  # along x, y (z): the last array axis first
    valid = boxes[..., -1] >= 0
    cls = boxes[..., -1].clamp(min=0).long()
    stride = OUTPUT_STRIDES[dims]
    low, high = boxes[..., :dims] / stride, boxes[..., dims : 2 * dims] / stride
    centre, side = (low + high) / 2, (high - low).clamp(min=0.25)
    upper = torch.tensor([n - 1 for n in sizes], device=boxes.device, dtype=boxes.dtype)
    index = torch.minimum(centre.floor().clamp(min=0), upper)
    sigma = (GAUSSIAN_ALPHA * side / 6).clamp(min=0.35)
    gaussian = valid.to(boxes.dtype)[(...,) + (None,) * dims]  # (B, M, 1, ...)
    for j, n in enumerate(sizes):  # coordinate j runs along array axis dims - 1 - j
        grid = torch.arange(n, device=boxes.device, dtype=boxes.dtype)
        g = torch.exp(-((grid - index[..., j, None]) ** 2) / (2 * sigma[..., j, None] ** 2))  # (B, M, n)
        view = [*g.shape[:2], *([1] * dims)]
        view[2 + dims - 1 - j] = n
        gaussian = gaussian * g.reshape(view)
    heatmap = boxes.new_zeros((len(boxes), num_classes, *shape))
    for c in range(num_classes):
        of_class = (cls == c) & valid
        if of_class.any():
            heatmap[:, c] = (gaussian * of_class[(...,) + (None,) * dims]).amax(1)
    centres = torch.cat([cls[..., None], index.long().flip(-1)], dim=-1)
    regression = torch.cat([side.log(), centre - index], dim=-1) * valid[..., None]
    return heatmap.detach(), centres, valid, regression.detach()


@torch.no_grad()
def decode(outputs: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """Boxes ``(B, MAX_DETECTIONS, 2 * dims + 2)``: heatmap peaks, per-class NMS (3D boxes: 3D NMS),
    best first, class -1 padding."""
    dims = outputs.ndim - 2
    num_classes = outputs.shape[1] - 2 * dims
    batch, shape = outputs.shape[0], outputs.shape[2:]
    sizes = [int(n) for n in reversed(shape)]  # along x, y (z)
    heat = torch.sigmoid(outputs[:, :num_classes].float())
    pool = F.max_pool2d if dims == 2 else F.max_pool3d
    peaks = heat * (pool(heat, 3, stride=1, padding=1) == heat)
    voxels = math.prod(sizes)
    scores, index = peaks.flatten(1).topk(min(MAX_DETECTIONS, num_classes * voxels))
    cls, voxel = index // voxels, index % voxels
    reg = outputs[:, num_classes:].float().flatten(2).gather(2, voxel[:, None].expand(-1, 2 * dims, -1))  # (B, 2d, K)
    size = reg[:, :dims].clamp(max=math.log(max(sizes))).exp()
    lows, highs = [], []
    stride = OUTPUT_STRIDES[dims]
    remainder = voxel
    for j, n in enumerate(sizes):  # x first: the fastest-varying array axis
        centre = (remainder % n).float() + reg[:, dims + j]
        remainder = remainder // n
        lows.append(((centre - size[:, j] / 2) * stride).clamp(0, n * stride))
        highs.append(((centre + size[:, j] / 2) * stride).clamp(0, n * stride))
    boxes = torch.stack(lows + highs, dim=-1)  # (B, K, 2 * dims)
    result = outputs.new_zeros((batch, MAX_DETECTIONS, 2 * dims + 2), dtype=torch.float32)
    result[..., -1] = -1
    for b in range(batch):
        keep = (scores[b] >= SCORE_THRESHOLD) & (boxes[b, :, dims:] > boxes[b, :, :dims]).all(-1)
        kept_boxes, kept_scores, kept_cls = boxes[b][keep], scores[b][keep], cls[b][keep]
        if len(kept_scores):
            order = batched_nms(kept_boxes, kept_scores, kept_cls, NMS_IOU)
            n = len(order)
            result[b, :n, : 2 * dims] = kept_boxes[order]
            result[b, :n, -2] = kept_scores[order]
            result[b, :n, -1] = kept_cls[order].float()
    return result


class RandomFlip:
    """Random flips of the image and its boxes along each spatial axis (each with probability 1/2)."""

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, boxes = sample["image"], sample["boxes"].clone()
        valid = boxes[:, -1] >= 0
        dims = image.ndim - 1
        for j in range(dims):  # coordinate j (x, y, z) runs along array axis -1 - j
            if torch.rand(()) < 0.5:
                side = image.shape[-1 - j]
                image = image.flip(-1 - j)
                boxes[valid, j], boxes[valid, dims + j] = side - boxes[valid, dims + j], side - boxes[valid, j]
        return {**sample, "image": image.contiguous(), "boxes": boxes}


def train_transform(config: Config) -> RandomFlip:
    """Flips along every axis: objects keep their class under reflection (cells, nodules, lesions)."""
    return RandomFlip()


def metrics(config: Config) -> DetectionMetrics:
    return DetectionMetrics(config.data.num_classes)


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU matrix of ``(N, 2 * dims)`` and ``(M, 2 * dims)`` corner boxes (xyxy or xyzxyz), in float64
    (as pycocotools)."""
    a, b = np.asarray(boxes1, dtype=np.float64), np.asarray(boxes2, dtype=np.float64)
    dims = a.shape[1] // 2
    low = np.maximum(a[:, None, :dims], b[None, :, :dims])
    high = np.minimum(a[:, None, dims:], b[None, :, dims:])
    inter = np.clip(high - low, 0, None).prod(-1)
    size_a = (a[:, dims:] - a[:, :dims]).prod(-1)
    size_b = (b[:, dims:] - b[:, :dims]).prod(-1)
    union = size_a[:, None] + size_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def centre_hits(detections: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Which detection centres lie inside which reference object: ``(N, M)`` bool for ``(N, 2 * dims)``
    and ``(M, 2 * dims)`` corner boxes. The object is the ellipsoid inscribed in its box (a sphere of
    the nodule's diameter for a cubic box in mm), so a hit is LUNA16's "centre within the nodule's
    radius" whatever the voxel size."""
    d, r = np.asarray(detections, dtype=np.float64), np.asarray(references, dtype=np.float64)
    dims = d.shape[1] // 2
    centres = (d[:, :dims] + d[:, dims:]) / 2
    ref_centres, radii = (r[:, :dims] + r[:, dims:]) / 2, (r[:, dims:] - r[:, :dims]) / 2
    scaled = (centres[:, None] - ref_centres[None]) / np.maximum(radii[None], 1e-9)
    return np.asarray((scaled**2).sum(-1) <= 1.0)


def froc_candidates(
    detections: np.ndarray,
    det_classes: np.ndarray,
    det_scores: np.ndarray,
    references: np.ndarray,
    ref_classes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """LUNA16's scoring of one scan: the scores of true and of false positives.

    Best first, a detection whose centre lies in an object of its class (:func:`centre_hits`) not
    yet found is a true positive for the nearest such object; one that lies only in objects already
    found is neither (a second hit on one nodule is not counted); one in no object of its class is a
    false positive.
    """
    hits = centre_hits(detections, references) & (det_classes[:, None] == ref_classes[None])
    dims = detections.shape[1] // 2
    distance = np.linalg.norm(
        (detections[:, None, :dims] + detections[:, None, dims:])
        - (references[None, :, :dims] + references[None, :, dims:]),
        axis=-1,
    )
    found = np.zeros(len(references), dtype=bool)
    tp, fp = [], []
    for i in np.argsort(-det_scores, kind="stable"):
        if not hits[i].any():
            fp.append(det_scores[i])
            continue
        open_hits = np.flatnonzero(hits[i] & ~found)
        if len(open_hits):
            found[open_hits[np.argmin(distance[i, open_hits])]] = True
            tp.append(det_scores[i])
    return np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)


class DetectionMetrics:
    """Matches detections to reference boxes image by image; AP, PR and FROC over the whole split."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._matches: list[dict[int, dict[str, np.ndarray]]] = []
        self._froc_cases: list[tuple[np.ndarray, np.ndarray, int]] = []  # per image: TP scores, FP scores, objects

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        preds = predictions.detach().cpu().double().numpy()
        refs = batch["boxes"].detach().cpu().double().numpy()
        dims = (refs.shape[-1] - 1) // 2
        kept = [p[p[:, -1] >= 0] for p in preds]
        truth = [r[r[:, -1] >= 0] for r in refs]
        matches = matching_batch(
            iou_fn=box_iou,
            iou_thresholds=IOU_THRESHOLDS,  # type: ignore[arg-type]  # MONAI takes an array; its annotation says Sequence
            pred_boxes=[p[:, : 2 * dims] for p in kept],
            pred_classes=[p[:, -1].astype(int) for p in kept],
            pred_scores=[p[:, -2] for p in kept],
            gt_boxes=[t[:, : 2 * dims] for t in truth],
            gt_classes=[t[:, -1].astype(int) for t in truth],
            max_detections=MAX_DETECTIONS,
        )
        self._matches += matches
        for image, p, t in zip(matches, kept, truth, strict=True):
            if dims == 3:
                tp, fp = froc_candidates(p[:, :6], p[:, -1].astype(int), p[:, -2], t[:, :6], t[:, -1].astype(int))
            else:  # a hit at IoU >= 0.5 with the right class
                results = list(image.values())
                tp = np.concatenate([np.zeros(0), *(r["dtScores"][r["dtMatches"][0] > 0] for r in results)])
                fp = np.concatenate([np.zeros(0), *(r["dtScores"][r["dtMatches"][0] == 0] for r in results)])
            self._froc_cases.append((tp, fp, len(t)))

    def resampled(self, indices: np.ndarray) -> DetectionMetrics:
        """These metrics as if updated with the images at ``indices`` (repeats allowed): a bootstrap draw."""
        other = DetectionMetrics(self.num_classes)
        other._matches = [self._matches[i] for i in indices]
        other._froc_cases = [self._froc_cases[i] for i in indices]
        return other

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        ap50, ap, curves = [], [], {}
        for c in range(self.num_classes):
            precision = self._precision(c)  # (T, R) or None when the class has no reference box
            ap50.append(math.nan if precision is None else float(precision[0].mean()))
            ap.append(math.nan if precision is None else float(precision.mean()))
            curves[c] = precision
        out["map50"] = _nan_mean(ap50)
        out["map"] = _nan_mean(ap)
        out.update(self._froc())
        for c in range(self.num_classes):
            out[f"ap50_class_{c}"] = ap50[c]
            out[f"ap_class_{c}"] = ap[c]
            curve = curves[c]
            if curve is not None:
                at = np.searchsorted(RECALL_THRESHOLDS, PR_RECALLS - 1e-9)
                for recall, value in zip(PR_RECALLS, curve[0][at], strict=True):
                    out[f"pr50_class_{c}@{recall:.1f}"] = float(value)
        return out

    def _class_results(self, c: int) -> list[dict[str, np.ndarray]]:
        return [image[c] for image in self._matches if c in image]

    def _precision(self, c: int) -> np.ndarray | None:
        """Interpolated precision at each IoU threshold and recall threshold (pycocotools' ``accumulate``)."""
        results = self._class_results(c)
        num_gt = sum(int(np.count_nonzero(r["gtIgnore"] == 0)) for r in results)
        if num_gt == 0:
            return None
        scores = np.concatenate([r["dtScores"][:MAX_DETECTIONS] for r in results])  # results: num_gt > 0
        order = np.argsort(-scores, kind="mergesort")
        matched = np.concatenate([r["dtMatches"][:, :MAX_DETECTIONS] for r in results], axis=1)[:, order] > 0
        counted = np.concatenate([r["dtIgnore"][:, :MAX_DETECTIONS] for r in results], axis=1)[:, order] == 0
        tp_sum = np.cumsum(matched & counted, axis=1).astype(np.float64)
        fp_sum = np.cumsum(~matched & counted, axis=1).astype(np.float64)
        precision = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
        for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum, strict=True)):
            recall = tp / num_gt
            prec = tp / (fp + tp + np.spacing(1))
            prec = np.maximum.accumulate(prec[::-1])[::-1] if len(prec) else prec  # precision envelope
            index = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
            inside = index < len(prec)
            precision[t, inside] = prec[index[inside]]
        return precision

    def _froc(self) -> dict[str, float]:
        """Sensitivity at :data:`FROC_FP_RATES` false positives per image (scan), all classes pooled,
        and its mean (``froc``: LUNA16's CPM in 3D)."""
        num_targets = sum(n for _, _, n in self._froc_cases)
        nan = {"froc": math.nan, **{_froc_key(r): math.nan for r in FROC_FP_RATES}}
        if num_targets == 0:
            return nan
        tp = np.concatenate([np.zeros(0), *(t for t, _, _ in self._froc_cases)])
        fp = np.concatenate([np.zeros(0), *(f for _, f, _ in self._froc_cases)])
        # a score below every detection's, so that the curve starts at all detections kept
        fps, sensitivity = compute_froc_curve_data(
            np.concatenate([[-1.0], fp]), np.concatenate([[-1.0], tp]), num_targets, len(self._froc_cases)
        )
        out = {"froc": float(compute_froc_score(fps, sensitivity, FROC_FP_RATES))}
        for rate, value in zip(FROC_FP_RATES, np.interp(FROC_FP_RATES, fps[::-1], sensitivity[::-1]), strict=True):
            out[_froc_key(rate)] = float(value)
        return out


def _froc_key(rate: float) -> str:
    return f"froc@{rate:g}fp"


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def operating_point(val_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Detection has no threshold to choose here (mAP and FROC sweep every score): {}."""
    return {}


def pooled_metrics(test_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Detection pools nothing across sites yet: {}."""
    return {}


def synthetic_site(
    index: int, samples: int, image_size: int, num_classes: int, seed: int, spatial_dims: int = 2
) -> SiteArrays:
    """Synthetic hospital ``index``, seeded by ``seed``: 2D images with several objects each and their
    boxes, or 3D chest CT with lung nodules of 3-30 mm and 2 voxels at least (:mod:`medfed.data.synthetic`)."""
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"detection makes 2D images or 3D volumes, not spatial_dims = {spatial_dims}")
    if spatial_dims == 3:
        return synthetic.synthetic_nodule_site(index, samples, image_size, num_classes, seed)
    return synthetic.synthetic_detection_site(index, samples, image_size, num_classes, seed)
