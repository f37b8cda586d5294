"""3D detection (lung nodules in CT): boxes.csv with z, the 3D CenterNet's targets and decoding,
LUNA16's FROC and CPM on a hand-counted case, synthetic CT sites, boxes in mm from `medfed predict`."""

import csv
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import Config
from medfed.data.manifest import SiteReading, read_site, write_site
from medfed.data.synthetic import MIN_NODULE_VOXELS, NODULE_MM, synthetic_nodule_site
from medfed.data.vocabulary import DataError
from medfed.predict import boxes_in_mm
from medfed.tasks import detection
from medfed.weights import model_to_arrays, save_checkpoint

READING = SiteReading(image_size=16, num_classes=1, target="boxes", spatial_dims=3)


def _cube(centre: tuple[float, float, float], side: float) -> list[float]:
    c = np.asarray(centre, dtype=float)
    return [*(c - side / 2), *(c + side / 2)]


def test_centre_hits_are_inside_the_nodule_not_its_box() -> None:
    nodule = np.array([_cube((2, 2, 2), 4)])  # radius 2 voxels
    detections = np.array([_cube((2, 2, 3.9), 1), _cube((3.5, 3.5, 2), 1), _cube((2, 2, 2), 9)])
    # inside; inside the box but outside the sphere (a corner); centred, whatever its size
    assert detection.centre_hits(detections, nodule)[:, 0].tolist() == [True, False, True]
    ellipsoid = np.array([[0, 0, 0, 10, 4, 4]])  # anisotropic voxels: a sphere in mm is an ellipsoid in voxels
    assert detection.centre_hits(np.array([_cube((9.5, 2, 2), 1), _cube((5, 3.9, 2), 1)]), ellipsoid)[:, 0].all()


def test_froc_and_cpm_at_luna16_operating_points_on_a_hand_counted_case() -> None:
    """4 scans, 4 nodules. A: nodule found (0.9), found again (0.8: neither TP nor FP), a false
    positive (0.7). B: one nodule found (0.6), a detection in its box corner but outside the
    sphere (0.5: FP), a second nodule missed. C: found (0.4). D: no nodule, a false positive (0.3).
    TP scores 0.9, 0.6, 0.4; FP 0.7, 0.5, 0.3. Thresholds 0.9 / 0.6 / 0.4 give sensitivity 1/4,
    2/4, 3/4 at 0, 1/4, 2/4 FP per scan: 1/8 FP -> 0.25, 1/4 -> 0.5, 1/2 and above -> 0.75;
    CPM = (0.25 + 0.5 + 5 x 0.75) / 7."""
    scans = [
        ([_cube((15, 15, 15), 10)], [((15, 15, 15), 0.9), ((17, 15, 15), 0.8), ((40, 40, 40), 0.7)]),
        ([_cube((2, 2, 2), 4), _cube((35, 35, 35), 10)], [((2, 2, 3.5), 0.6), ((3.5, 3.5, 2), 0.5)]),
        ([_cube((13, 13, 13), 6)], [((13, 13, 13), 0.4)]),
        ([], [((20, 20, 20), 0.3)]),
    ]
    metrics = detection.DetectionMetrics(1)
    for nodules, found in scans:
        refs = torch.full((1, 2, 7), -1.0)
        for k, box in enumerate(nodules):
            refs[0, k] = torch.tensor([*box, 0.0])
        preds = torch.zeros(1, 4, 8)
        preds[..., -1] = -1
        for k, (centre, score) in enumerate(found):
            preds[0, k] = torch.tensor([*_cube(centre, 2), score, 0.0])
        metrics.update(preds, {"boxes": refs})
    result = metrics.compute()
    expected = {0.125: 0.25, 0.25: 0.5, 0.5: 0.75, 1: 0.75, 2: 0.75, 4: 0.75, 8: 0.75}
    for rate, sensitivity in expected.items():
        assert result[f"froc@{rate:g}fp"] == pytest.approx(sensitivity), rate
    assert result["froc"] == pytest.approx((0.25 + 0.5 + 5 * 0.75) / 7)
    # the 2-voxel detection boxes overlap no nodule's box at IoU 0.5: COCO AP calls them all misses
    assert result["map50"] == 0


def test_a_perfect_detector_scores_cpm_1_even_with_false_positives_ranked_below_every_nodule() -> None:
    scans = [[_cube((4, 4, 4), 4), _cube((15, 15, 15), 10)], [_cube((5, 6, 7), 3)], []]
    metrics = detection.DetectionMetrics(1)
    for nodules in scans:
        refs = torch.full((1, 2, 7), -1.0)
        preds = torch.zeros(1, 3, 8)
        preds[..., -1] = -1
        for k, box in enumerate(nodules):
            refs[0, k] = torch.tensor([*box, 0.0])
            preds[0, k] = torch.tensor([*box, 0.9, 0.0])
        preds[0, 2] = torch.tensor([*_cube((25, 25, 25), 2), 0.2, 0.0])  # a false positive in every scan
        metrics.update(preds, {"boxes": refs})
    result = metrics.compute()
    assert result["froc"] == pytest.approx(1.0)
    assert all(result[f"froc@{rate:g}fp"] == pytest.approx(1.0) for rate in detection.FROC_FP_RATES)


def test_3d_targets_decode_back_to_their_boxes_and_the_loss_falls() -> None:
    boxes = torch.full((2, 3, 7), -1.0)
    boxes[0, 0] = torch.tensor([4.0, 8.0, 12.0, 12.0, 14.0, 28.0, 0])  # anisotropic: 8 x 6 x 16 voxels
    boxes[0, 1] = torch.tensor([20.0, 18.0, 2.0, 30.0, 30.0, 10.0, 1])
    boxes[1, 0] = torch.tensor([10.0, 10.0, 10.0, 22.0, 22.0, 22.0, 1])
    shape = torch.Size([16, 16, 16])  # 32^3 volumes at stride 2
    heatmap, centres, valid, regression = detection._encode(boxes, 2, shape)
    assert heatmap.shape == (2, 2, 16, 16, 16) and heatmap.amax() == pytest.approx(1.0)
    outputs = torch.full((2, 8, 16, 16, 16), -12.0)
    for b, m in zip(*torch.nonzero(valid, as_tuple=True), strict=True):
        cls, z, y, x = centres[b, m].tolist()
        outputs[b, cls, z, y, x] = 12.0
        outputs[b, 2:, z, y, x] = regression[b, m]
    decoded = detection.decode(outputs)
    assert decoded.shape == (2, detection.MAX_DETECTIONS, 8)
    for b in range(2):
        found = decoded[b][decoded[b, :, -1] >= 0]
        truth = boxes[b][valid[b]]
        assert len(found) == len(truth)
        for row in truth:
            match = found[(found[:, -1] == row[-1])][0]
            torch.testing.assert_close(match[:6], row[:6], atol=1e-3, rtol=0)
    batch = {"boxes": boxes}
    assert detection.loss(outputs, batch) < detection.loss(torch.zeros_like(outputs), batch)
    flipped = detection.RandomFlip()({"image": torch.zeros(1, 32, 32, 32), "boxes": boxes[0]})["boxes"]
    sides = flipped[:2, 3:6] - flipped[:2, :3]
    torch.testing.assert_close(sides, boxes[0, :2, 3:6] - boxes[0, :2, :3])  # flips move boxes, keep their size


def test_synthetic_ct_sites_hold_nodules_of_3_to_30_mm_and_2_voxels_and_differ_by_scanner() -> None:
    first, again, other = (synthetic_nodule_site(i, 12, 32, 2, seed=1) for i in (0, 0, 1))
    np.testing.assert_array_equal(first.images, again.images)
    assert first.images.shape == (12, 1, 32, 32, 32) and first.targets.shape[2] == 7
    assert first.images.min() >= 0 and first.images.max() <= 1
    assert not np.allclose(first.spacing[0], other.spacing[0])  # each scanner its own voxel size
    for site in (first, other):
        rows = site.targets[site.targets[..., -1] >= 0]
        diameters = (rows[:, 3:6] - rows[:, :3]) * site.spacing[0][::-1]  # x, y, z sides in mm
        np.testing.assert_allclose(diameters, np.repeat(diameters[:, :1], 3, axis=1), rtol=1e-4)  # spheres
        smallest = max(NODULE_MM[0], MIN_NODULE_VOXELS * site.spacing[0].max())  # 2 voxels across at least
        assert smallest - 1e-3 <= diameters.min() and diameters.max() <= NODULE_MM[1] + 1e-3
        assert (rows[:, :3] >= 0).all() and (rows[:, 3:6] <= 32).all()


def test_3d_box_sites_round_trip_and_refuse_boxes_without_z(tmp_path: Path) -> None:
    site = synthetic_nodule_site(0, 6, 16, 1, seed=2)
    folder = write_site(tmp_path / "ct", site)
    with (folder / "boxes.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[-2:] == ["zmin", "zmax"]
    back = read_site(folder, READING)
    assert back.images.shape == (6, 1, 16, 16, 16)
    np.testing.assert_allclose(back.targets, site.targets, atol=1e-4)
    np.testing.assert_allclose(back.spacing, site.spacing, rtol=1e-5)

    rows = list(csv.reader((folder / "boxes.csv").open()))
    with (folder / "boxes.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([[*row[:-2], "", row[-1]] if i == 1 else row for i, row in enumerate(rows)])
    with pytest.raises(DataError, match=r"boxes.csv line 2: zmin and zmax must be numbers"):
        read_site(folder, READING)
    with (folder / "boxes.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([row[:-2] for row in rows])  # a 2D table
    with pytest.raises(DataError, match=r"boxes.csv line 1: missing column\(s\) \['zmin', 'zmax'\]"):
        read_site(folder, READING)


def test_boxes_in_mm_follow_the_volume_affine() -> None:
    from medfed.data.decode import Geometry

    affine = np.array([[0, 0, -0.7, 100], [0, 0.7, 0, -50], [2.5, 0, 0, 20], [0, 0, 0, 1.0]])
    geometry = Geometry((40, 64, 64), (2.5, 0.7, 0.7), affine)
    box = np.array([[10.0, 20.0, 4.0, 20.0, 30.0, 8.0, 0.9, 0]])  # x 10-20, y 20-30, z 4-8 voxels
    world_x, world_y, world_z, size_x, size_y, size_z, diameter = boxes_in_mm(box, geometry)[0]
    # voxel-centre index (z, y, x) = (5.5, 24.5, 14.5)
    assert (world_x, world_y, world_z) == pytest.approx((100 - 0.7 * 14.5, -50 + 0.7 * 24.5, 20 + 2.5 * 5.5))
    assert (size_x, size_y, size_z) == pytest.approx((7.0, 7.0, 10.0)) and diameter == pytest.approx(8.0)


def test_predict_writes_3d_detections_in_mm(tmp_path: Path) -> None:
    config = Config().with_overrides(
        {
            "run.task": "detection",
            "data.spatial-dims": 3,
            "data.image-size": 16,
            "data.num-classes": 1,
            "data.class-names": ["nodule"],
            "model.width": 4,
            "model.depth": 1,
        }  # fmt: skip
    )
    torch.manual_seed(0)
    meta = {"round": 0, "config": config.to_public_dict()}
    checkpoint = save_checkpoint(tmp_path / "model.safetensors", model_to_arrays(detection.build_model(config)), meta)
    affine = np.array([[0, 0, -0.8, 40], [0, 0.8, 0, -12], [2.0, 0, 0, 7], [0, 0, 0, 1.0]])
    volume = np.random.default_rng(0).normal(size=(12, 24, 24)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    args = ["predict", "--model", str(checkpoint), "--input", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o"),
            "--min-score", "0"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with (tmp_path / "o" / "detections.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and rows[0]["class"] == "nodule" and (tmp_path / "o" / "ct_overlay.png").is_file()
    for row in rows:
        x, y, z = ((float(row[f"{a}min"]) + float(row[f"{a}max"])) / 2 - 0.5 for a in "xyz")
        assert 0 <= float(row["xmin"]) < float(row["xmax"]) <= 24 and float(row["zmax"]) <= 12
        expected = affine[:3, :3] @ [z, y, x] + affine[:3, 3]
        world = [float(row[f"world_{a}_mm"]) for a in "xyz"]
        np.testing.assert_allclose(world, expected, atol=0.2)  # the CSV rounds to 0.1
        assert float(row["size_z_mm"]) == pytest.approx(2.0 * (float(row["zmax"]) - float(row["zmin"])), abs=0.4)


def test_synth_writes_ct_sites_that_data_check_reads(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["data", "synth", "--task", "detection", "--spatial-dims", "3", "--image-size", "16", "--samples", "8",
            "--sites", "1", "--num-classes", "1", "--out", str(tmp_path)]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    site = tmp_path / "hospital-1"
    with (site / "boxes.csv").open() as handle:
        assert next(csv.reader(handle))[-2:] == ["zmin", "zmax"]
    check = ["data", "check", str(site), "--task", "detection", "--spatial-dims", "3", "--image-size", "16",
             "--num-classes", "1"]  # fmt: skip
    result = runner.invoke(app, check)
    assert result.exit_code == 0, result.output


def test_3d_detection_refuses_a_2d_only_source() -> None:
    from medfed.config import ConfigError

    with pytest.raises(ConfigError, match="data.source = 'voc'.*3D detection"):
        Config().with_overrides(
            {"run.task": "detection", "data.spatial-dims": 3, "data.source": "voc", "data.path": "/tmp"}
        )
