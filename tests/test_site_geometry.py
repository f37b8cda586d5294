"""Scans from different scanners on one grid: resampling to a common voxel size and orientation,
masks that follow their image (NIfTI or DICOM-SEG), and the way back to the scan's own grid."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel
import numpy as np
import pytest

from medfed.config import Config, ConfigError
from medfed.data import DataError, read_site
from medfed.data.decode import Preprocess, from_model_grid, load_image, load_mask
from medfed.data.manifest import SiteReading
from medfed.data.medical_io import read_scan, write_dicom_seg, write_dicom_series

COMMON = Preprocess(spacing=(2.0, 2.0, 2.0), orientation="RAS")


def _ball_volume(
    folder: Path, name: str, shape: tuple[int, int, int], spacing: tuple[float, float, float], flip: bool
) -> tuple[Path, Path]:
    """A 10 mm radius ball (value 100 in noise) at 20 mm from the first corner, as NIfTI image + mask."""
    index = np.indices(shape).astype(float)
    inside = sum((index[a] * spacing[a] - 20.0) ** 2 for a in range(3)) <= 10.0**2
    image = inside * 100.0 + np.random.default_rng(0).normal(0, 1, shape)
    affine = np.diag([*spacing, 1.0])
    if flip:  # stored with the first axis reversed (L->R instead of R->L): same anatomy, other array order
        affine[0, 0], affine[0, 3] = -spacing[0], (shape[0] - 1) * spacing[0]
        image, inside = image[::-1], inside[::-1]
    paths = folder / f"{name}.nii.gz", folder / f"{name}_mask.nii.gz"
    nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), affine), paths[0])
    nibabel.save(nibabel.Nifti1Image(inside.astype(np.uint8), affine), paths[1])
    return paths


def test_common_spacing_gives_a_ball_the_same_voxels_at_every_site(tmp_path: Path) -> None:
    sites = {  # the first two cover 48 mm per axis, the third 64 mm
        "fine": _ball_volume(tmp_path, "fine", (48, 48, 48), (1.0, 1.0, 1.0), flip=False),
        "coarse-flipped": _ball_volume(tmp_path, "coarse", (24, 48, 96), (2.0, 1.0, 0.5), flip=True),
        "wide": _ball_volume(tmp_path, "wide", (64, 64, 64), (1.0, 1.0, 1.0), flip=False),
    }
    expected = 4 / 3 * np.pi * 10.0**3 / 2.0**3  # ball volume in 2 mm voxels
    centres, counts, resized = [], [], []
    for image_path, mask_path in sites.values():
        image, spacing, geometry = load_image(image_path, 32, 3, preprocess=COMMON)
        mask = load_mask(mask_path, 32, 2, 3, geometry, COMMON)
        assert image.shape == mask.shape == (1, 32, 32, 32) and spacing == (2.0, 2.0, 2.0)
        assert image[mask == 1].mean() > 0.8 > image[mask == 0].mean()  # the mask still lies on the ball
        counts.append(int(mask.sum()))
        centres.append(np.argwhere(mask[0]).mean(axis=0))
        _, plain_geometry = load_image(image_path, 32, 3)[1:]
        resized.append(int(load_mask(mask_path, 32, 2, 3, plain_geometry).sum()))
    assert all(abs(c - expected) / expected < 0.05 for c in counts)
    np.testing.assert_allclose(centres[0], centres[1], atol=1.0)  # reoriented; within one 2 mm voxel
    assert abs(resized[0] - resized[2]) / max(resized) > 0.3  # resized whole, sizes depend on the field of view


def test_predictions_go_back_to_the_scans_own_grid(tmp_path: Path) -> None:
    image_path, mask_path = _ball_volume(tmp_path, "coarse", (20, 40, 80), (2.0, 1.0, 0.5), flip=True)
    _, _, geometry = load_image(image_path, 32, 3, preprocess=COMMON)
    on_grid = load_mask(mask_path, 32, 2, 3, geometry, COMMON)[0]
    one_hot = np.stack([on_grid == 0, on_grid == 1]).astype(np.float32)
    back = from_model_grid(one_hot, geometry, COMMON).argmax(axis=0)
    truth = read_scan(mask_path).array > 0
    assert back.shape == truth.shape
    dice = 2 * np.sum(back * truth) / (back.sum() + truth.sum())
    assert dice > 0.85


def test_nifti_mask_with_another_voxel_size_is_a_clear_error(tmp_path: Path) -> None:
    image_path, _ = _ball_volume(tmp_path, "fine", (24, 24, 24), (1.0, 1.0, 1.0), flip=False)
    wrong = tmp_path / "wrong_mask.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((24, 24, 24), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])), wrong)
    _, _, geometry = load_image(image_path, 16, 3)
    with pytest.raises(ValueError, match=r"mask voxel size 1 x 1 x 3 mm does not match its image's 1 x 1 x 1 mm"):
        load_mask(wrong, 16, 2, 3, geometry)


def _dicom_seg_site(folder: Path) -> np.ndarray:
    """A site folder whose images are DICOM series and whose masks are DICOM-SEG objects."""
    rows = []
    truth = []
    for case in range(3):
        volume = np.zeros((10, 32, 32), np.int16)
        volume[3 + case : 7, 8:24, 10:22] = 300
        write_dicom_series(volume, folder / "images" / f"case{case}", spacing=(2.0, 0.7, 0.7))
        scan = read_scan(folder / "images" / f"case{case}")
        mask = (scan.array > 100).astype(np.uint8)
        mask[5, 8:12, 10:14] = 2
        write_dicom_seg(mask, scan, folder / f"case{case}_seg.dcm", {1: "lesion", 2: "core"})
        rows.append([f"images/case{case}", f"case{case}_seg.dcm", ("train", "val", "test")[case]])
        truth.append(mask)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "mask", "split"], *rows])
    return np.stack(truth)


def test_dicom_seg_masks_are_read_onto_their_series(tmp_path: Path) -> None:
    truth = _dicom_seg_site(tmp_path)
    site = read_site(tmp_path, SiteReading(32, 3, "mask", 3))
    assert site.targets.shape == (3, 1, 32, 32, 32)
    for case in range(3):  # depth 10 -> 32 by nearest neighbour along the slices, rows/cols unchanged
        depth_index = (np.arange(32) * 10 / 32).astype(int)
        np.testing.assert_array_equal(site.targets[case, 0], truth[case][depth_index])


def test_dicom_seg_of_another_series_is_a_clear_error(tmp_path: Path) -> None:
    _dicom_seg_site(tmp_path)
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:  # case 0's image with case 1's mask
        csv.writer(handle).writerows([["image", "mask", "split"], ["images/case0", "case1_seg.dcm", "train"]])
    with pytest.raises(DataError, match="case1_seg.dcm unreadable: DICOM-SEG does not fit its image"):
        read_site(tmp_path, SiteReading(32, 3, "mask", 3))


def test_manifest_modality_column_windows_nifti_ct_in_hounsfield_units(tmp_path: Path) -> None:
    volume = np.full((8, 8, 8), -1000.0, np.float32)
    volume[2:6, 2:6, 2:6] = 40.0  # soft tissue in a body of air
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "ct.nii.gz")
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "label", "split", "modality"], ["ct.nii.gz", "0", "train", "CT"]])
    soft_tissue = Preprocess(ct_window=(-160.0, 240.0))
    image = read_site(tmp_path, SiteReading(8, 2, "label", 3, preprocess=soft_tissue)).images[0, 0]
    assert image.min() == 0.0 and image[4, 4, 4] == pytest.approx(0.5)  # 40 HU is the window's middle


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"spatial-dims": 3, "target-spacing": [1.0, 1.0]}, "data.target-spacing"),
        ({"spatial-dims": 2, "target-spacing": [0.5, -1.0]}, "data.target-spacing"),
        ({"spatial-dims": 3, "target-spacing": [1.0, 1.0, 1.0], "orientation": "RAA"}, "data.orientation"),
        ({"spatial-dims": 2, "target-spacing": [1.0, 1.0], "orientation": "RA"}, "data.orientation"),
        ({"spatial-dims": 3, "orientation": "RAS"}, "unless data.target-spacing is set"),
    ],
)
def test_resampling_settings_are_checked_when_the_config_loads(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": data})


def test_resampling_settings_reach_the_loaders() -> None:
    config = Config.from_dict({"data": {"spatial-dims": 3, "target-spacing": [1.5, 1.5, 3], "orientation": "las"}})
    assert Preprocess.from_config(config.data) == Preprocess(spacing=(1.5, 1.5, 3.0), orientation="LAS")


def test_detection_refuses_a_target_spacing() -> None:
    with pytest.raises(ConfigError, match="whole images are resized"):
        Config.from_dict({"run": {"task": "detection"}, "data": {"num-classes": 1, "target-spacing": [1.0, 1.0]}})
