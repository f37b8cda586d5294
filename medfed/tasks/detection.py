"""2D object detection (lesions, nodules, cells): boxes with a class and a score.

Samples: ``{"image": (C, H, W) float, "boxes": (M, 5) float}``, one row ``[x1, y1, x2, y2, class]``
per object in model-input pixels (x along the width axis), padding rows with class -1; an image
without objects is a legal negative. The model is a CenterNet-style detector
(:class:`medfed.models.CenterNet`): a heatmap of object centres per class, box size and centre
offset at 1/4 resolution. Loss, per image (as per-sample clipping under DP requires): the
penalty-reduced focal loss on the centre heatmap plus L1 on log box size and centre offset at the
reference centres, each divided by the image's object count.

Predictions ``(B, K, 6)``: rows ``[x1, y1, x2, y2, score, class]``, local maxima of the heatmap,
then per-class non-maximum suppression (``monai.data.box_utils.batched_nms``), best first,
padding rows with class -1.

Metrics: COCO average precision per class and mean, at IoU 0.5 (``map50``, the primary metric)
and over IoU 0.50:0.05:0.95 (``map``), with up to 100 detections per image. Matching is MONAI's
COCO matching (``monai.apps.detection.metrics.matching``); precision is accumulated in float64 as
pycocotools does (MONAI's ``COCOMetric`` accumulates in float32, which moves recall-threshold
look-ups and differs from pycocotools in the 3rd decimal). FROC: sensitivity at 0.125-8 false
positives per image (the LUNA16 convention; a detection is a hit at IoU >= 0.5 with the right
class) and its mean (``froc``). Precision at recall 0, 0.1, ..., 1 per class at IoU 0.5 is
returned too (``pr50_class_k@r``), for the report's PR curves: aggregates, not cases.
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
from medfed.models import OUTPUT_STRIDE
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
    "check_config",
    "decode",
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
SPATIAL_DIMS = (2,)  # the image dimensions the task works in

MAX_DETECTIONS = 100
SCORE_THRESHOLD = 0.01
NMS_IOU = 0.5
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
PR_RECALLS = np.linspace(0.0, 1.0, 11)
GAUSSIAN_ALPHA = 0.54  # centre heatmap: sigma = alpha * box side / 6 (TTFNet)


def check_config(config: Config) -> None:
    """The settings detection needs: whole images resized as they are (boxes scale with them)."""
    require(
        not config.data.target_spacing,
        "data.target-spacing",
        list(config.data.target_spacing),
        "[] for run.task = 'detection' (whole images are resized; boxes scale with them)",
    )
    require(not config.train.logit_adjust, "train.logit-adjust", True, "false: it is for classification")


def build_model(config: Config) -> nn.Module:
    """The ``model.name`` :class:`medfed.models.CenterNet` of the model zoo for ``data.channels``-channel
    images; ``data.image-size`` must be a multiple of its total stride."""
    return build_network(NAME, config)


def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Raw head outputs ``(B, num_classes + 4, H / 4, W / 4)``."""
    return model(images)


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Focal loss on centres + L1 on log size and offset, per image over its objects, mean over the batch."""
    num_classes = outputs.shape[1] - 4
    boxes = batch["boxes"].to(outputs.dtype)
    heatmap, centres, valid, regression = _encode(boxes, num_classes, outputs.shape[-2:])
    logits = outputs[:, :num_classes]
    prob = torch.sigmoid(logits)
    positive = torch.zeros_like(logits, dtype=torch.bool)
    batch_index = torch.arange(len(boxes), device=boxes.device)[:, None].expand_as(valid)
    cls, cy, cx = centres.unbind(-1)
    positive[batch_index[valid], cls[valid], cy[valid], cx[valid]] = True
    pos_term = -F.logsigmoid(logits) * (1 - prob) ** 2
    neg_term = -F.logsigmoid(-logits) * prob**2 * (1 - heatmap) ** 4
    focal = torch.where(positive, pos_term, neg_term).flatten(1).sum(1)
    count = positive.flatten(1).sum(1).clamp(min=1)
    width = outputs.shape[-1]
    flat = outputs[:, num_classes:].flatten(2)  # (B, 4, h * w)
    gathered = flat.gather(2, (cy * width + cx)[:, None].expand(-1, 4, -1)).transpose(1, 2)  # (B, M, 4)
    l1 = ((gathered - regression).abs().sum(-1) * valid).sum(1)
    return ((focal + l1) / count).mean()


def _encode(
    boxes: torch.Tensor, num_classes: int, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets at output resolution from boxes ``(B, M, 5)``.

    Returns the Gaussian centre heatmap ``(B, num_classes, h, w)``, the integer centre of each box
    ``(B, M, 3)`` as (class, y, x), which rows are objects ``(B, M)``, and the regression targets
    ``(B, M, 4)``: log width, log height (output pixels) and the x, y offset of the true centre.
    """
    h, w = int(shape[0]), int(shape[1])
    valid = boxes[..., 4] >= 0
    cls = boxes[..., 4].clamp(min=0).long()
    x1, y1, x2, y2 = (boxes[..., i] / OUTPUT_STRIDE for i in range(4))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    bw, bh = (x2 - x1).clamp(min=0.25), (y2 - y1).clamp(min=0.25)
    ix, iy = cx.floor().clamp(0, w - 1), cy.floor().clamp(0, h - 1)
    sx, sy = (GAUSSIAN_ALPHA * bw / 6).clamp(min=0.35), (GAUSSIAN_ALPHA * bh / 6).clamp(min=0.35)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    gx = torch.exp(-((xs[None, None] - ix[..., None]) ** 2) / (2 * sx[..., None] ** 2))  # (B, M, w)
    gy = torch.exp(-((ys[None, None] - iy[..., None]) ** 2) / (2 * sy[..., None] ** 2))  # (B, M, h)
    gaussians = gy[..., :, None] * gx[..., None, :] * valid[..., None, None]  # (B, M, h, w)
    heatmap = boxes.new_zeros((len(boxes), num_classes, h, w))
    for c in range(num_classes):
        of_class = (cls == c) & valid
        if of_class.any():
            heatmap[:, c] = (gaussians * of_class[..., None, None]).amax(1)
    centres = torch.stack([cls, iy.long(), ix.long()], dim=-1)
    regression = torch.stack([bw.log(), bh.log(), cx - ix, cy - iy], dim=-1) * valid[..., None]
    return heatmap.detach(), centres, valid, regression.detach()


@torch.no_grad()
def decode(outputs: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """Boxes ``(B, MAX_DETECTIONS, 6)``: heatmap peaks, per-class NMS, best first, class -1 padding."""
    num_classes = outputs.shape[1] - 4
    batch, _, h, w = outputs.shape
    heat = torch.sigmoid(outputs[:, :num_classes].float())
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, index = peaks.flatten(1).topk(min(MAX_DETECTIONS, num_classes * h * w))
    cls, pixel = index // (h * w), index % (h * w)
    cy, cx = (pixel // w).float(), (pixel % w).float()
    reg = outputs[:, num_classes:].float().flatten(2).gather(2, pixel[:, None].expand(-1, 4, -1))  # (B, 4, K)
    size = reg[:, :2].clamp(max=math.log(max(h, w))).exp()
    centre_x, centre_y = cx + reg[:, 2], cy + reg[:, 3]
    boxes = torch.stack(
        [centre_x - size[:, 0] / 2, centre_y - size[:, 1] / 2, centre_x + size[:, 0] / 2, centre_y + size[:, 1] / 2],
        dim=-1,
    )
    boxes = boxes * OUTPUT_STRIDE
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w * OUTPUT_STRIDE)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h * OUTPUT_STRIDE)
    result = outputs.new_zeros((batch, MAX_DETECTIONS, 6), dtype=torch.float32)
    result[..., 5] = -1
    for b in range(batch):
        keep = (scores[b] >= SCORE_THRESHOLD) & (boxes[b, :, 2] > boxes[b, :, 0]) & (boxes[b, :, 3] > boxes[b, :, 1])
        kept_boxes, kept_scores, kept_cls = boxes[b][keep], scores[b][keep], cls[b][keep]
        if len(kept_scores):
            order = batched_nms(kept_boxes, kept_scores, kept_cls, NMS_IOU)
            n = len(order)
            result[b, :n, :4] = kept_boxes[order]
            result[b, :n, 4] = kept_scores[order]
            result[b, :n, 5] = kept_cls[order].float()
    return result


class RandomFlip:
    """Random horizontal and vertical flips of the image and its boxes (each with probability 1/2)."""

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, boxes = sample["image"], sample["boxes"].clone()
        valid = boxes[:, 4] >= 0
        height, width = image.shape[-2:]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes[valid, 0], boxes[valid, 2] = width - boxes[valid, 2], width - boxes[valid, 0]
        if torch.rand(()) < 0.5:
            image = image.flip(-2)
            boxes[valid, 1], boxes[valid, 3] = height - boxes[valid, 3], height - boxes[valid, 1]
        return {**sample, "image": image.contiguous(), "boxes": boxes}


def train_transform(config: Config) -> RandomFlip:
    """Flips: objects keep their class under reflection (cells, nodules, lesions)."""
    return RandomFlip()


def metrics(config: Config) -> DetectionMetrics:
    return DetectionMetrics(config.data.num_classes)


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU matrix of ``(N, 4)`` and ``(M, 4)`` xyxy boxes, in float64 (as pycocotools)."""
    a, b = np.asarray(boxes1, dtype=np.float64), np.asarray(boxes2, dtype=np.float64)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class DetectionMetrics:
    """Matches detections to reference boxes image by image; AP, PR and FROC over the whole split."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._matches: list[dict[int, dict[str, np.ndarray]]] = []
        self._num_images = 0

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        preds = predictions.detach().cpu().double().numpy()
        refs = batch["boxes"].detach().cpu().double().numpy()
        kept = [p[p[:, 5] >= 0] for p in preds]
        truth = [r[r[:, 4] >= 0] for r in refs]
        self._matches += matching_batch(
            iou_fn=box_iou,
            iou_thresholds=IOU_THRESHOLDS,  # type: ignore[arg-type]  # MONAI takes an array; its annotation says Sequence
            pred_boxes=[p[:, :4] for p in kept],
            pred_classes=[p[:, 5].astype(int) for p in kept],
            pred_scores=[p[:, 4] for p in kept],
            gt_boxes=[t[:, :4] for t in truth],
            gt_classes=[t[:, 4].astype(int) for t in truth],
            max_detections=MAX_DETECTIONS,
        )
        self._num_images += len(preds)

    def resampled(self, indices: np.ndarray) -> DetectionMetrics:
        """These metrics as if updated with the images at ``indices`` (repeats allowed): a bootstrap draw."""
        other = DetectionMetrics(self.num_classes)
        other._matches = [self._matches[i] for i in indices]
        other._num_images = len(indices)
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
        """Sensitivity at :data:`FROC_FP_RATES` false positives per image, all classes pooled, IoU >= 0.5."""
        tp_scores, fp_scores, num_targets = [], [], 0
        for image in self._matches:
            for result in image.values():
                hit = result["dtMatches"][0].astype(bool)
                tp_scores.append(result["dtScores"][hit])
                fp_scores.append(result["dtScores"][~hit])
                num_targets += int(np.count_nonzero(result["gtIgnore"] == 0))
        nan = {"froc": math.nan, **{_froc_key(r): math.nan for r in FROC_FP_RATES}}
        if num_targets == 0 or self._num_images == 0:
            return nan
        tp = np.concatenate([np.zeros(0), *tp_scores])
        fp = np.concatenate([np.zeros(0), *fp_scores])
        # a score below every detection's, so that the curve starts at all detections kept
        fps, sensitivity = compute_froc_curve_data(
            np.concatenate([[-1.0], fp]), np.concatenate([[-1.0], tp]), num_targets, self._num_images
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
    """Synthetic hospital ``index``, seeded by ``seed``: several objects per image with their boxes
    (:mod:`medfed.data.synthetic`)."""
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"detection makes 2D images only, not spatial_dims = {spatial_dims}")
    return synthetic.synthetic_detection_site(index, samples, image_size, num_classes, seed)
