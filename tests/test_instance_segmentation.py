"""Instance segmentation: metrics against hand counts, the watershed split, instance masks on disk,
a federated DP round and ``medfed predict``'s object table."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from medfed.cli import app
from medfed.data import read_site, write_site
from medfed.data.manifest import SiteReading
from medfed.data.synthetic import synthetic_instance_site
from medfed.data.vocabulary import DataError
from medfed.tasks import instance_segmentation as task
from tests.conftest import REPO


def _squares() -> np.ndarray:
    """Two touching 4x4 objects (16 pixels each) in an 8x12 image."""
    truth = np.zeros((8, 12), dtype=np.int64)
    truth[0:4, 0:4], truth[0:4, 4:8] = 1, 2
    return truth


def test_scores_of_a_merge_a_split_and_a_partial_match_match_hand_counts() -> None:
    truth = _squares()
    merged = (truth > 0).astype(np.int64)  # one 32-pixel object over both: IoU 0.5 each, no match
    scores = task.image_scores(merged, truth)
    assert scores["aji"] == pytest.approx((16 + 16) / (32 + 32))
    assert scores["dq"] == scores["pq"] == 0 and scores["count_error"] == 1 and scores["dice"] == 1
    split = task.image_scores(truth, merged)  # one reference object predicted as two halves
    assert split["aji"] == pytest.approx(16 / (32 + 16)) and split["pq"] == 0
    partial = truth.copy()
    partial[0, 0:4] = 0  # the first object loses 4 of its 16 pixels: IoU 12/16
    partial[6:8, 10:12] = 3  # a 4-pixel false positive
    scores = task.image_scores(partial, truth)
    assert scores["sq"] == pytest.approx((0.75 + 1) / 2)
    assert scores["dq"] == pytest.approx(2 / (2 + 0.5 * 1 + 0.5 * 0))  # TP 2, FP 1, FN 0
    assert scores["pq"] == pytest.approx(0.875 * 0.8)
    assert scores["aji"] == pytest.approx((12 + 16) / (16 + 16 + 4))
    assert scores["dice"] == pytest.approx(2 * 28 / (32 + 32))
    assert np.isnan(task.image_scores(np.zeros_like(truth), np.zeros_like(truth))["aji"])
    assert task.image_scores(np.zeros_like(truth), truth)["aji"] == 0


def test_panoptic_quality_agrees_with_monai() -> None:
    from monai.metrics import compute_panoptic_quality

    truth = _squares()
    pred = truth.copy()
    pred[0, 0:4] = 0
    pred[6:8, 10:12] = 7  # ids need not be consecutive
    ours = task.image_scores(pred, truth)["pq"]
    monai = compute_panoptic_quality(torch.as_tensor(pred), torch.as_tensor(truth), metric_name="pq")
    assert ours == pytest.approx(float(monai), abs=1e-4)


def test_metric_accumulator_averages_images_and_drops_small_objects() -> None:
    truth = torch.as_tensor(np.stack([_squares(), _squares()]))[:, None]
    pred = truth.clone()
    pred[1, 0, 7, 11] = 9  # a one-pixel speck on the second image
    metrics = task.InstanceMetrics(min_structure_size=2)
    metrics.update(pred, {"instances": truth})
    out = metrics.compute()
    assert out["aji"] == out["pq"] == out["f1_50"] == out["dice"] == 1 and out["count_error_mean"] == 0


def test_training_map_marks_interiors_and_boundaries_between_objects() -> None:
    truth = _squares()
    classes = task.training_map(torch.as_tensor(truth)[None, None])[0, 0].numpy()
    assert set(np.unique(classes[truth == 0])) == {0}
    assert (classes[0:3, 3] == 2).all() and (classes[0:3, 4] == 2).all()  # where the two objects meet
    assert (classes[3, 0:8] == 2).all()  # next to the background
    assert (classes[0:3, 0:3] == 1).all() and (classes[0, 5:7] == 1).all()  # the image edge is no boundary


def test_watershed_separates_two_touching_discs() -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    truth = np.zeros((32, 32), dtype=np.int64)
    truth[(yy - 16) ** 2 + (xx - 10) ** 2 <= 36] = 1
    truth[((yy - 16) ** 2 + (xx - 21) ** 2 <= 36) & (truth == 0)] = 2
    assert ndimage.label(truth > 0)[1] == 1  # one connected foreground: components alone would merge them
    classes = task.training_map(torch.as_tensor(truth)[None, None])[0, 0].numpy()
    probs = np.stack([(classes == k) * 0.8 + 0.1 for k in range(3)])  # confident, not certain
    distance = task.distance_map(torch.as_tensor(truth)[None, None])[0].numpy()
    labels = task.instance_labels(np.concatenate([probs, distance]))
    assert labels.max() == 2
    assert task.image_scores(labels, truth)["aji"] > 0.95
    # the interior alone would merge them (a bridge where the boundary was missed): the distance splits it
    bridged = probs.copy()
    bridged[:, 13:20, 15:17] = np.array([0.1, 0.8, 0.1])[:, None, None]
    assert ndimage.label(bridged.argmax(axis=0) == 1)[1] == 1
    assert task.instance_labels(np.concatenate([bridged, distance])).max() == 2
    logits = np.concatenate([np.log(probs), np.log(distance / (1 - distance + 1e-6) + 1e-6)])
    decoded = task.decode(torch.as_tensor(logits)[None])
    assert decoded.shape == (1, 1, 32, 32) and int(decoded.max()) == 2


def test_a_speck_of_high_distance_does_not_split_an_object() -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    truth = ((yy - 16) ** 2 + (xx - 10) ** 2 <= 36).astype(np.int64)
    classes = task.training_map(torch.as_tensor(truth)[None, None])[0, 0].numpy()
    probs = np.stack([(classes == k) * 0.8 + 0.1 for k in range(3)])
    distance = task.distance_map(torch.as_tensor(truth)[None, None])[0].numpy()
    distance[0, 16, 5:7] = 0.9  # two pixels off the core, as a noisy (DP) distance map leaves them
    cores = (classes == 1) & (distance[0] > task.SEED_DISTANCE)
    assert ndimage.label(cores)[1] == 2 and task.SEED_MIN_SIZE > 2
    labels = task.instance_labels(np.concatenate([probs, distance]))
    assert labels.max() == 1 and task.image_scores(labels, truth)["aji"] > 0.95


def test_distance_map_peaks_at_each_object_centre_and_dips_where_objects_touch() -> None:
    distance = task.distance_map(torch.as_tensor(_squares())[None, None])[0, 0].numpy()
    assert distance.shape == (8, 12) and distance.max() == 1 and (distance[4:] == 0).all()
    assert distance[0, 0] == 1 and distance[0, 5] == 1  # each object's farthest pixel from its edge
    assert distance[0, 3] < distance[0, 2] and distance[0, 4] < distance[0, 5]  # lowest where they meet


def test_instance_site_round_trip_and_hostile_instance_masks(tmp_path: Path) -> None:
    site = synthetic_instance_site(0, 6, image_size=32, seed=1)
    assert site.target_key == "instances" and site.targets.max() >= 2
    folder = write_site(tmp_path / "s", site)
    reading = SiteReading(32, 2, target="instances")
    back = read_site(folder, reading)
    np.testing.assert_array_equal(back.targets, site.targets)
    manifest = folder / "manifest.csv"
    original = manifest.read_text()
    bad = {
        "half.npy": (np.full((32, 32), 1.5), "must be integers"),
        "negative.npy": (np.full((32, 32), -1), r"in \[0, 65535\]"),
        "small.npy": (np.ones((16, 16), dtype=np.int64), "does not match its image's shape"),
    }
    for name, (array, why) in bad.items():
        np.save(folder / "masks" / name, array)
        manifest.write_text(original.replace("masks/000000.png", f"masks/{name}", 1))
        with pytest.raises(DataError, match=f"masks/{name} unreadable: .*{why}"):
            read_site(folder, reading)


def test_tiny_dp_federation_and_predicted_object_table(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        "simulate", str(REPO / "configs" / "instance-segmentation-synthetic.toml"), "--sites", "2", "--rounds", "1",
        "--out", str(out), "--set", "data.samples-per-site=12", "--set", "data.image-size=32",
        "--set", "train.local-epochs=1", "--set", "train.batch-size=8", "--set", "evaluation.cross-site=false",
        "--set", "evaluation.example-images=1",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "instance-segmentation" and report["primary_metric"] == "aji"
    assert report["privacy"]["site-1"]["epsilon"] <= 8.0 + 1e-6
    assert {"aji", "pq", "f1_50", "dice"} <= set(report["final"]["per_site"]["site-1"])
    assert "Predicted and reference objects" in (out / "report.html").read_text()
    from PIL import Image

    from medfed.run_folder import RunFolder

    cases = tmp_path / "cases"
    cases.mkdir()
    image = synthetic_instance_site(1, 1, image_size=32, seed=3).images[0, 0]
    Image.fromarray((image * 255).astype(np.uint8)).resize((48, 48)).save(cases / "field.png")
    predicted = tmp_path / "predicted"
    model = RunFolder(out).global_model
    result = runner.invoke(app, ["predict", "--model", str(model), "--input", str(cases), "--out", str(predicted)])
    assert result.exit_code == 0, result.output
    with (predicted / "counts.csv").open() as handle:
        counts = list(csv.DictReader(handle))
    assert [c["case"] for c in counts] == ["field"] and counts[0]["instances"] == "field_instances.nii.gz"
    with (predicted / "objects.csv").open() as handle:
        objects = list(csv.DictReader(handle))
    assert len(objects) == int(counts[0]["objects"])
    import nibabel

    labels = np.asarray(nibabel.load(predicted / "field_instances.nii.gz").dataobj)[..., 0]
    assert labels.shape == (48, 48) and labels.max() == len(objects)
    for row in objects:  # every row describes its object in the label image
        k = int(row["object"])
        ys, xs = np.nonzero(labels == k)
        assert int(row["area_px"]) == len(ys)
        box = tuple(int(row[k]) for k in ("ymin", "xmin", "ymax", "xmax"))
        assert box == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
