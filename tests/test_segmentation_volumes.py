"""Segmentation beyond the 2D basics: metrics and sizes on hand-made masks, 3D volumes, patches,
privacy units, image/mask folder import, and `medfed predict` writing NIfTI and DICOM-SEG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import Config
from medfed.data import PrivacyUnitDataset, SiteArrays, read_site, write_site
from medfed.data.manifest import SiteReading
from medfed.data.medical_io import write_dicom_series
from medfed.data.pairs import find_pairs
from medfed.data.partition import assign_splits
from medfed.data.synthetic import synthetic_segmentation_site
from medfed.evaluation.quantify import quantify_case, structure_count, structure_size
from medfed.tasks import segmentation
from medfed.weights import model_to_arrays, save_checkpoint
from tests.conftest import REPO


def _metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    acc = segmentation.SegmentationMetrics(2)
    acc.update(pred, {"mask": truth, "spacing": torch.ones(len(truth), truth.ndim - 2)})
    return acc.compute()


def test_dice_is_one_for_identical_masks_and_zero_for_disjoint_ones() -> None:
    truth = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    truth[0, 0, 2:6, 2:6] = 1
    same = _metrics(truth.clone(), truth)
    assert same["dice"] == pytest.approx(1.0) and same["iou"] == pytest.approx(1.0) and same["hd95"] == 0
    assert same["rel_size_error_median"] == 0 and same["count_error_mean"] == 0
    disjoint = torch.zeros_like(truth)
    disjoint[0, 0, 8:12, 8:12] = 1
    apart = _metrics(disjoint, truth)
    assert apart["dice"] == pytest.approx(0.0) and apart["dice_pooled"] == pytest.approx(0.0)
    assert apart["hd95"] == pytest.approx(6 * math.sqrt(2), rel=0.35)  # corner-to-corner offsets of 6 px


def test_dice_ce_loss_is_low_for_confident_correct_logits_and_high_for_wrong_ones() -> None:
    truth = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    truth[0, 0, 2:6, 2:6] = 1
    right = torch.cat([(truth == 0).float(), (truth == 1).float()], dim=1) * 20 - 10
    batch = {"mask": truth}
    assert float(segmentation.loss(right, batch)) < 0.01
    assert float(segmentation.loss(-right, batch)) > 5


def test_sphere_volume_from_anisotropic_spacing_is_within_two_percent() -> None:
    spacing = (2.5, 0.7, 0.8)  # mm per axis: slices thicker than pixels
    radius = 20.0
    axes = [(np.arange(n) - n / 2 + 0.5) * s for n, s in zip((24, 80, 70), spacing, strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    sphere = (zz**2 + yy**2 + xx**2) <= radius**2
    expected_ml = 4 / 3 * math.pi * radius**3 / 1000
    assert structure_size(sphere, spacing) == pytest.approx(expected_ml, rel=0.02)
    disc = sphere[12]
    assert structure_size(disc, spacing[1:]) == pytest.approx(math.pi * radius**2, rel=0.02)  # mm²


def test_quantify_case_counts_structures_and_relative_size_error() -> None:
    reference = np.zeros((20, 20), dtype=np.int64)
    reference[2:6, 2:6] = 1
    reference[10:14, 10:14] = 1
    prediction = reference.copy()
    prediction[10:14, 10:12] = 0  # half of the second lesion missed
    row = quantify_case(prediction, reference, (0.5, 0.5))
    assert row["count"] == 2 and row["reference_count"] == 2 and structure_count(np.zeros((4, 4))) == 0
    assert row["reference_size"] == pytest.approx(32 * 0.25)
    assert row["rel_size_error"] == pytest.approx(-0.25)


def test_synthetic_volumes_have_lesion_masks_and_scanner_voxel_size(tmp_path: Path) -> None:
    site = synthetic_segmentation_site(1, 12, image_size=16, spatial_dims=3)
    assert site.images.shape == (12, 1, 16, 16, 16) and site.targets.shape == (12, 1, 16, 16, 16)
    assert site.targets.max() == 1 and site.spacing.shape == (12, 3)
    assert site.spacing[0, 0] != site.spacing[0, 1]  # slice thickness differs from pixel size
    back = read_site(write_site(tmp_path / "v", site), SiteReading(16, 2, "mask", spatial_dims=3))
    np.testing.assert_array_equal(back.targets, site.targets)
    np.testing.assert_allclose(back.spacing, site.spacing, rtol=1e-5)
    with pytest.raises(ValueError, match="expected a 2D image"):
        read_site(tmp_path / "v", SiteReading(16, 2, "mask", spatial_dims=2))


def test_patient_is_the_privacy_unit_and_a_step_sees_one_patch_of_one_image_per_patient() -> None:
    site = synthetic_segmentation_site(0, 12, image_size=32)
    site.splits[:] = "train"
    site.patient_ids = np.array([f"p{i // 3}" for i in range(12)])  # 4 patients, 3 images each
    unit, units = site.privacy_units()
    assert unit == "patient" and sorted(len(u) for u in units) == [3, 3, 3, 3]
    config = Config().with_overrides({"run.task": "segmentation", "data.image-size": 32, "data.patch-size": 16})
    dataset = PrivacyUnitDataset(site.split("train"), units, segmentation.train_transform(config))
    assert len(dataset) == 4
    sample = dataset[0]
    assert sample["image"].shape == (1, 16, 16) and sample["mask"].shape == (1, 16, 16)
    assert type(sample["image"]) is torch.Tensor and sample["mask"].dtype == torch.long
    site.patient_ids[0] = ""
    assert site.privacy_units()[0] == "image"


def test_sliding_window_inference_covers_the_whole_image() -> None:
    config = Config().with_overrides(
        {"run.task": "segmentation", "data.image-size": 48, "data.patch-size": 16, "model.width": 4, "model.depth": 2}
    )
    model = segmentation.build_model(config).eval()
    with torch.no_grad():
        out = segmentation.infer(model, torch.rand(2, 1, 48, 48), config)
    assert out.shape == (2, 2, 48, 48)


def test_image_mask_folders_pair_by_name_and_split_by_patient(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    masks.mkdir()
    for child in range(1, 6):
        for eye in "LR":
            Image.fromarray(np.full((20, 20), 100, np.uint8)).save(images / f"Image_{child:02d}{eye}.jpg")
            Image.fromarray(np.arange(400).reshape(20, 20) % 7 == 0).save(masks / f"Image_{child:02d}{eye}_1stHO.png")
    pairs = find_pairs(images, masks, r"Image_(\d+)")
    assert len(pairs) == 10 and {p.patient for p in pairs} == {"01", "02", "03", "04", "05"}
    splits = assign_splits(pairs, seed=0)
    by_patient: dict[str, set[str]] = {}
    for pair, split in zip(pairs, splits, strict=True):
        by_patient.setdefault(pair.patient, set()).add(split)
    assert all(len(s) == 1 for s in by_patient.values()) and {"train", "val", "test"} <= set(splits)
    out = tmp_path / "site"
    result = CliRunner().invoke(
        app, ["data", "import", str(images), "--from", "image-mask", "--masks", str(masks), "--out", str(out),
              "--patient-pattern", r"Image_(\d+)"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    site = read_site(out, SiteReading(16, 2, "mask"))
    assert site.targets.max() == 1 and site.privacy_units()[0] == "patient"
    (masks / "Image_05R_1stHO.png").unlink()
    (masks / "stray.png").write_bytes((masks / "Image_01L_1stHO.png").read_bytes())
    with pytest.raises(ValueError) as err:
        find_pairs(images, masks)
    assert "Image_05R.jpg: no mask" in str(err.value) and "stray.png: mask without an image" in str(err.value)


def _checkpoint(tmp_path: Path, **overrides: object) -> Path:
    config = Config().with_overrides(
        {"run.task": "segmentation", "model.width": 4, "model.depth": 2, **overrides}  # type: ignore[dict-item]
    )
    torch.manual_seed(0)
    model = segmentation.build_model(config)
    meta = {"round": 0, "config": config.to_public_dict()}
    return save_checkpoint(tmp_path / "model.safetensors", model_to_arrays(model), meta)


def test_predict_writes_nifti_with_the_input_affine_and_quantification(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, **{"data.spatial-dims": 3, "data.image-size": 16})
    affine = np.array([[0, 0, -2.5, 40], [0, 0.8, 0, -12], [0.9, 0, 0, 7], [0, 0, 0, 1.0]])
    volume = np.random.default_rng(0).normal(size=(20, 24, 10)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    result = CliRunner().invoke(
        app,
        ["predict", "--model", str(checkpoint), "--input", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 0, result.output
    seg = nibabel.load(tmp_path / "o" / "ct_seg.nii.gz")
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert seg.shape == volume.shape and np.issubdtype(seg.get_data_dtype(), np.integer)
    assert (tmp_path / "o" / "ct_overlay.png").is_file()
    row = (tmp_path / "o" / "quantification.csv").read_text().splitlines()[1].split(",")
    voxels = int(np.count_nonzero(np.asarray(seg.dataobj)))
    assert row[0] == "ct" and row[3] == "mL"
    assert float(row[2]) == pytest.approx(voxels * 2.5 * 0.8 * 0.9 / 1000, abs=1e-3)


def test_predict_writes_dicom_seg_that_reads_back_as_the_mask(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, **{"data.spatial-dims": 3, "data.image-size": 16})
    series = tmp_path / "series"
    rng = np.random.default_rng(1)
    write_dicom_series((rng.normal(40, 30, (8, 24, 24))).astype(np.int16), series)
    result = CliRunner().invoke(
        app, ["predict", "--model", str(checkpoint), "--input", str(series), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    nifti = np.asarray(nibabel.load(tmp_path / "o" / "series_seg.nii.gz").dataobj)
    seg = pydicom.dcmread(tmp_path / "o" / "series_seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    import highdicom

    frames = highdicom.seg.Segmentation.from_dataset(seg)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    uid_to_z = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in sources}
    order = sorted(uid_to_z, key=uid_to_z.get)
    pixels = frames.get_pixels_by_source_instance(
        source_sop_instance_uids=order, segment_numbers=[1], combine_segments=True,
        assert_missing_frames_are_empty=True,
    )  # fmt: skip
    np.testing.assert_array_equal(pixels > 0, nifti > 0)


def test_a_2d_model_refuses_a_volume_with_a_clear_message(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, **{"data.image-size": 16})
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    result = CliRunner().invoke(
        app, ["predict", "--model", str(checkpoint), "--input", str(tmp_path / "v.nii.gz"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "3D input, but the model takes 2D images" in result.output


def test_tiny_3d_federation_with_dp_and_patches_writes_the_report(tmp_path: Path) -> None:
    args = [
        "simulate", str(REPO / "configs" / "segmentation-synthetic3d.toml"), "--sites", "2", "--rounds", "1",
        "--out", str(tmp_path), "--set", "data.samples-per-site=16", "--set", "data.image-size=16",
        "--set", "data.patch-size=8", "--set", "train.local-epochs=1", "--set", "train.batch-size=4",
        "--set", "evaluation.example-images=1",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["data"]["spatial-dims"] == 3 and report["config"]["privacy"]["enabled"]
    for site in ("site-1", "site-2"):
        metrics = report["final"]["per_site"][site]
        assert 0 <= metrics["dice_pooled"] <= 1 and "rel_size_error_median" in metrics
        assert report["privacy"][site]["unit"] == "image" and report["privacy"][site]["epsilon"] <= 8.0 + 1e-6
    assert list((tmp_path / "plots").glob("examples-site-1-*.png"))


def test_site_arrays_reject_spacing_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="spacing must be"):
        SiteArrays(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)), np.array(["train", "val"]), spacing=np.ones((2, 3)))


def test_metrics_are_reported_per_class_for_multi_class_masks() -> None:
    truth = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    truth[0, 0, 1:5, 1:5] = 1
    truth[0, 0, 7:11, 7:11] = 2
    pred = truth.clone()
    pred[0, 0, 7:11, 7:11] = 0  # class 2 missed entirely
    acc = segmentation.SegmentationMetrics(3)
    acc.update(pred, {"mask": truth, "spacing": torch.ones(1, 2)})
    m = acc.compute()
    assert m["dice_class_1"] == pytest.approx(1.0) and m["dice_class_2"] == pytest.approx(0.0)
    assert m["iou_class_1"] == pytest.approx(1.0) and m["dice"] == pytest.approx(0.5)


def test_nifti_image_label_pairs_in_nnunet_layout_load_as_volumes_with_their_spacing(tmp_path: Path) -> None:
    from medfed.data.sites import load_simulated_site

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for case in range(6):
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        label = np.zeros((20, 20, 8), np.uint8)
        label[5:10, 5:10, 2:5] = 1
        image = rng.normal(size=label.shape).astype(np.float32) + 3 * label
        nibabel.save(nibabel.Nifti1Image(image, affine), tmp_path / "imagesTr" / f"case_{case:03d}_0000.nii.gz")
        nibabel.save(nibabel.Nifti1Image(label, affine), tmp_path / "labelsTr" / f"case_{case:03d}.nii.gz")
    config = Config().with_overrides(
        {"run.task": "segmentation", "data.source": "pairs", "data.path": str(tmp_path), "data.images": "imagesTr",
         "data.masks": "labelsTr", "data.sites": 2, "data.spatial-dims": 3, "data.image-size": 16}
    )  # fmt: skip
    name, site = load_simulated_site(config, 1)
    assert name == "site-2" and site.images.shape == (3, 1, 16, 16, 16) and site.targets.max() == 1
    np.testing.assert_allclose(site.spacing[0], [0.8 * 20 / 16, 0.8 * 20 / 16, 2.5 * 8 / 16], rtol=1e-5)
    assert set(site.patient_ids) == {"case_003", "case_004", "case_005"}
