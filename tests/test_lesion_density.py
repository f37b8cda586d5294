"""Lesion density: Hounsfield-unit statistics inside predicted CT structures, on the values as
read (after the DICOM rescale, before windowing), in ``quantification.csv``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from medfed import predict as predict_module
from medfed.config import Config
from medfed.data.medical_io import Scan, write_dicom_series
from medfed.evaluation.quantify import density
from medfed.predict import predict_cases
from medfed.tasks import segmentation
from medfed.weights import model_to_arrays, save_checkpoint

# 18 voxels of stored values 600..617: with slope 2 and intercept -1024 they read 176, 178, ..., 210 HU
STORED = 600 + np.arange(18)
HU = 2 * STORED - 1024
EXPECTED = {"hu_mean": 193.0, "hu_std": 2 * math.sqrt((18**2 - 1) / 12), "hu_min": 176.0, "hu_max": 210.0}


def test_density_statistics_by_hand() -> None:
    values = np.array([[-1000.0, 40.0], [60.0, 20.0]])
    out = density(values, values > -500)
    assert out == pytest.approx({"hu_mean": 40.0, "hu_std": math.sqrt(800 / 3), "hu_min": 20.0, "hu_max": 60.0})
    assert all(math.isnan(v) for v in density(values, np.zeros_like(values, dtype=bool)).values())


def _checkpoint(tmp_path: Path, **overrides: object) -> Path:
    config = Config().with_overrides(
        {
            "run.task": "segmentation",
            "model.width": 4,
            "model.depth": 2,
            "data.spatial-dims": 3,
            "data.image-size": 16,
            **overrides,
        }  # fmt: skip
    )
    meta = {"round": 0, "config": config.to_public_dict()}
    return save_checkpoint(tmp_path / "model.safetensors", model_to_arrays(segmentation.build_model(config)), meta)


def _volume() -> np.ndarray:
    volume = np.zeros((4, 8, 8), np.int16)
    volume[1:3, 2:5, 2:5] = STORED.reshape(2, 3, 3)
    return volume


def _segment_above(level: float, second: float | None = None):  # noqa: ANN202 - a stand-in for segment_scan
    """A stand-in for the model: class 1 where the scan reads above ``level`` (class 2 above ``second``)."""

    def segment(case: Path, scan: Scan, config: Config, model: object) -> np.ndarray:
        mask = (scan.array > level).astype(np.int64)
        if second is not None:
            mask[scan.array > second] = 2
        return mask

    return segment


def _rows(table: Path) -> list[dict[str, str]]:
    with table.open() as handle:
        return list(csv.DictReader(handle))


def test_dicom_ct_density_uses_the_rescaled_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    series = tmp_path / "series"
    for path in write_dicom_series(_volume(), series):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.save_as(path)
    monkeypatch.setattr(predict_module, "segment_scan", _segment_above(-500))
    row = _rows(predict_cases(_checkpoint(tmp_path), series, tmp_path / "out").table)[0]
    assert {key: float(row[key]) for key in EXPECTED} == pytest.approx(EXPECTED, abs=0.005)
    assert "hu_mean_class_1" not in row  # one foreground class: the foreground's columns only


def test_nifti_density_per_class_when_declared_ct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = np.full((4, 8, 8), -1000.0, np.float32)
    volume[1:3, 2:5, 2:5] = HU.reshape(2, 3, 3)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "ct.nii.gz")
    monkeypatch.setattr(predict_module, "segment_scan", _segment_above(-500, second=200))
    ct = _checkpoint(tmp_path, **{"data.modality": "CT", "data.num-classes": 3})
    row = _rows(predict_cases(ct, tmp_path / "ct.nii.gz", tmp_path / "ct").table)[0]
    assert float(row["hu_mean"]) == pytest.approx(193.0) and float(row["hu_max"]) == 210.0
    assert float(row["hu_min_class_2"]) == 202.0 and float(row["hu_mean_class_2"]) == pytest.approx(206.0)
    assert float(row["hu_max_class_1"]) == 200.0 and float(row["hu_mean_class_1"]) == pytest.approx(188.0)
    # a NIfTI says nothing of its modality: with data.modality "auto" it is not taken for CT
    (tmp_path / "auto").mkdir()
    auto = _checkpoint(tmp_path / "auto", **{"data.num-classes": 3})
    row = _rows(predict_cases(auto, tmp_path / "ct.nii.gz", tmp_path / "auto-out").table)[0]
    assert row["hu_mean"] == "n/a" and row["hu_mean_class_2"] == "n/a"
