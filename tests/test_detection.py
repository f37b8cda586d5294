"""Detection task: box IoU, NMS, decoding, loss, and mAP/FROC against reference implementations."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from monai.data.box_utils import batched_nms

from medfed.config import Config
from medfed.models import OUTPUT_STRIDES
from medfed.tasks import detection, get_task


def _config(num_classes: int = 2, size: int = 64) -> Config:
    return Config.from_dict(
        {"run": {"task": "detection"}, "data": {"num-classes": num_classes, "image-size": size}, "model": {"width": 8}}
    )


def test_box_iou_on_hand_made_boxes() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    iou = detection.box_iou(a, b)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[1, 1] == pytest.approx(50 / 150)  # half overlap: 50 / (100 + 100 - 50)
    assert iou[2, 2] == 0.0
    assert detection.box_iou(np.array([[0, 0, 4, 4]]), np.array([[1, 1, 3, 3]]))[0, 0] == pytest.approx(4 / 16)


def test_per_class_nms_keeps_the_best_box_of_each_overlapping_group() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [30, 30, 40, 40]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    keep = batched_nms(boxes, scores, labels, 0.5)
    # box 1 overlaps box 0 (same class, IoU 0.68) and goes; box 2 overlaps too but is another class
    assert sorted(keep.tolist()) == [0, 2, 3]


def test_decode_finds_a_planted_peak_with_its_size() -> None:
    num_classes, h, w = 2, 16, 16
    outputs = torch.full((1, num_classes + 4, h, w), -10.0)
    outputs[0, num_classes:] = 0.0
    outputs[0, 1, 5, 7] = 5.0  # class 1 centre at output pixel (y=5, x=7)
    outputs[0, num_classes + 0, 5, 7] = math.log(3.0)  # width 3 output pixels
    outputs[0, num_classes + 1, 5, 7] = math.log(2.0)  # height 2
    outputs[0, num_classes + 2, 5, 7] = 0.5  # x offset
    boxes = detection.decode(outputs)[0]
    best = boxes[0]
    s = OUTPUT_STRIDES[2]
    assert best[5] == 1 and best[4] > 0.99
    expected = [(7.5 - 1.5) * s, (5 - 1) * s, (7.5 + 1.5) * s, (5 + 1) * s]
    assert best[:4].tolist() == pytest.approx(expected)
    assert (boxes[1:, 5] == -1).all()  # nothing else above the score threshold


def test_loss_is_per_image_and_falls_when_the_target_is_predicted() -> None:
    config = _config()
    model = detection.build_model(config)
    images = torch.rand(2, 1, 64, 64)
    boxes = torch.full((2, 3, 5), -1.0)
    boxes[0, 0] = torch.tensor([8, 8, 24, 20, 1])
    boxes[1, :, :4] = 0  # a negative image: only padding
    outputs = model(images)
    both = detection.loss(outputs, {"boxes": boxes})
    first = detection.loss(outputs[:1], {"boxes": boxes[:1]})
    second = detection.loss(outputs[1:], {"boxes": boxes[1:]})
    assert both.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-5)
    heatmap, centres, valid, regression = detection._encode(boxes, 2, outputs.shape[-2:])
    perfect = torch.full_like(outputs, -12.0)
    cls, cy, cx = centres[0, 0].tolist()
    perfect[0, cls, cy, cx] = 12.0
    perfect[0, 2:, cy, cx] = regression[0, 0]
    assert detection.loss(perfect[:1], {"boxes": boxes[:1]}) < 0.01 < first


def test_random_flip_moves_boxes_with_the_image() -> None:
    image = torch.zeros(1, 20, 40)
    image[0, 5:15, 10:30] = 1.0
    boxes = torch.tensor([[10.0, 5.0, 30.0, 15.0, 0.0], [0, 0, 0, 0, -1]])
    torch.manual_seed(0)
    for _ in range(8):
        out = detection.RandomFlip()({"image": image, "boxes": boxes})
        x1, y1, x2, y2 = out["boxes"][0, :4].long().tolist()
        assert out["image"][0, y1:y2, x1:x2].mean() == 1.0 and out["image"].sum() == image.sum()
        assert out["boxes"][1].tolist() == [0, 0, 0, 0, -1]


def _fixture(seed: int = 0, num_classes: int = 3, images: int = 12) -> list[tuple[np.ndarray, ...]]:
    """Reference boxes and noisy detections (jittered, missed, wrong class, spurious) on 100x100 images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(images):
        n = rng.integers(0, 8)
        xy, wh = rng.uniform(0, 80, (n, 2)), rng.uniform(5, 30, (n, 2))
        ref, ref_cls = np.concatenate([xy, xy + wh], 1), rng.integers(0, num_classes, n)
        keep = rng.random(n) < 0.8
        det, det_cls = ref[keep] + rng.normal(0, 3, (keep.sum(), 4)), ref_cls[keep].copy()
        flip = rng.random(len(det_cls)) < 0.1
        det_cls[flip] = rng.integers(0, num_classes, flip.sum())
        m = rng.integers(0, 5)
        rxy, rwh = rng.uniform(0, 80, (m, 2)), rng.uniform(5, 30, (m, 2))
        det = np.concatenate([det, np.concatenate([rxy, rxy + rwh], 1)])
        det_cls = np.concatenate([det_cls, rng.integers(0, num_classes, m)])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        out.append((ref, ref_cls, det, det_cls, rng.uniform(0, 1, len(det))))
    return out


def _accumulate(fixture: list[tuple[np.ndarray, ...]], num_classes: int) -> dict[str, float]:
    accumulator = detection.DetectionMetrics(num_classes)
    for ref, ref_cls, det, det_cls, scores in fixture:
        predictions = torch.full((1, detection.MAX_DETECTIONS, 6), -1.0)
        order = np.argsort(-scores)
        rows = np.concatenate([det, scores[:, None], det_cls[:, None]], axis=1)[order]
        predictions[0, : len(rows)] = torch.tensor(rows)
        boxes = torch.full((1, max(len(ref), 1), 5), -1.0)
        if len(ref):
            boxes[0, : len(ref)] = torch.tensor(np.concatenate([ref, ref_cls[:, None]], axis=1))
        accumulator.update(predictions.double(), {"boxes": boxes.double()})
    return accumulator.compute()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_pycocotools(seed: int) -> None:
    pytest.importorskip("pycocotools", reason="pycocotools is the reference implementation (dev extra)")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    num_classes = 3
    fixture = _fixture(seed, num_classes)
    ours = _accumulate(fixture, num_classes)
    dataset = {
        "images": [{"id": i, "width": 100, "height": 100} for i in range(len(fixture))],
        "categories": [{"id": c} for c in range(num_classes)],
        "annotations": [],
    }
    detections = []
    for i, (ref, ref_cls, det, det_cls, scores) in enumerate(fixture):
        for box, c in zip(ref, ref_cls, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            dataset["annotations"].append(
                {"id": len(dataset["annotations"]) + 1, "image_id": i, "category_id": int(c),
                 "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        for box, c, s in zip(det, det_cls, scores, strict=True):
            detections.append(
                {"image_id": i, "category_id": int(c), "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                 "score": float(s)}
            )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert ours["map"] == pytest.approx(evaluation.stats[0], abs=1e-6)
    assert ours["map50"] == pytest.approx(evaluation.stats[1], abs=1e-6)
    precision = evaluation.eval["precision"][:, :, :, 0, 2]  # IoU x recall x class, area all, 100 dets
    for c in range(num_classes):
        assert ours[f"ap50_class_{c}"] == pytest.approx(precision[0, :, c].mean(), abs=1e-6)
        assert ours[f"ap_class_{c}"] == pytest.approx(precision[:, :, c].mean(), abs=1e-6)


def test_froc_on_a_hand_counted_case() -> None:
    # 2 images, 4 objects of one class; detections at scores 0.9 (hit), 0.8 (false), 0.7 (hit), 0.6 (false)
    ref = [np.array([[0, 0, 10, 10], [20, 20, 30, 30.0]]), np.array([[0, 0, 10, 10], [50, 50, 60, 60.0]])]
    det = [np.array([[0, 0, 10, 10], [70, 70, 80, 80.0]]), np.array([[0, 0, 10, 10.5], [80, 80, 90, 90.0]])]
    scores = [np.array([0.9, 0.8]), np.array([0.7, 0.6])]
    fixture = [(r, np.zeros(2, int), d, np.zeros(2, int), s) for r, d, s in zip(ref, det, scores, strict=True)]
    result = _accumulate(fixture, 1)
    # thresholds: 0.9 -> 0 FP/image, sens 1/4; 0.8 -> 0.5 FP/image, 1/4; 0.7 -> 0.5, 2/4; 0.6 -> 1, 2/4
    assert result["froc@0.5fp"] == pytest.approx(0.5)
    assert result["froc@1fp"] == pytest.approx(0.5) and result["froc@8fp"] == pytest.approx(0.5)
    assert result["froc@0.25fp"] == pytest.approx(0.25)
    assert result["froc"] == pytest.approx(np.mean([0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5]))
    assert result["map50"] == pytest.approx(
        np.mean([1.0 if r <= 0.25 else 2 / 3 if r <= 0.5 else 0.0 for r in np.linspace(0, 1, 101)])
    )


def test_images_without_objects_count_false_positives_only() -> None:
    fixture = [(np.zeros((0, 4)), np.zeros(0, int), np.array([[0, 0, 5, 5.0]]), np.zeros(1, int), np.array([0.9]))]
    fixture.append((np.array([[0, 0, 5, 5.0]]), np.zeros(1, int), np.array([[0, 0, 5, 5.0]]), np.zeros(1, int),
                    np.array([0.5])))  # fmt: skip
    result = _accumulate(fixture, 2)
    assert result["ap50_class_0"] == pytest.approx(np.mean([0.5] * 101))  # the false alarm ranks first
    assert math.isnan(result["ap50_class_1"])  # no reference box of class 1 anywhere: undefined, not 0
    assert result["map50"] == result["ap50_class_0"]


def test_task_builds_an_opacus_valid_model() -> None:
    from opacus.validators import ModuleValidator

    model = get_task("detection").build_model(_config())
    assert ModuleValidator.validate(model, strict=False) == []
