"""``medfed data import --from KIND``: every known layout becomes a checked site folder, from the CLI."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfed.cli import app
from medfed.data import DataError, read_site
from medfed.data.dicom_import import import_dicom
from medfed.data.manifest import SiteReading
from medfed.data.medical_io import read_scan, write_dicom_seg, write_dicom_series
from tests.test_detection_data import _png, _voc

SENTINEL_NAME = "Zyxwvut^Sentinelle"
SENTINEL_ID = "PID-7734-SENTINEL"


def _import(*args: str) -> str:
    result = CliRunner().invoke(app, ["data", "import", *args])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def _manifest(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_medmnist_npz_keeps_its_official_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(tmp_path / "tiny.npz", **arrays)
    output = _import(str(tmp_path / "tiny.npz"), "--from", "medmnist", "--out", str(tmp_path / "site"))
    assert "--task classification" in output
    site = read_site(tmp_path / "site", SiteReading(28, 2))
    assert [int(np.sum(site.splits == s)) for s in ("train", "val", "test")] == [12, 4, 5]
    np.testing.assert_array_equal(site.targets[:12], arrays["train_labels"].ravel())


def test_voc_folder_and_coco_file_become_box_sites(tmp_path: Path) -> None:
    voc = _voc(tmp_path / "voc", {f"img{i}": [("cell", 2, 3, 12, 13)] for i in range(5)})
    _import(str(voc), "--from", "voc", "--out", str(tmp_path / "voc-site"))
    site = read_site(tmp_path / "voc-site", SiteReading(32, 1, "boxes", class_names=("cell",)))
    assert len(site.targets) == 5 and (site.targets[:, 0, 4] == 0).all()

    for name in ("x.png", "y.png", "z.png"):
        _png(tmp_path / "coco" / "images" / name, 32, 24)
    images = [{"id": i, "file_name": n, "width": 32, "height": 24} for i, n in enumerate(["x.png", "y.png", "z.png"])]
    coco = {"images": images, "categories": [{"id": 7, "name": "nodule"}], "annotations": []}
    coco["annotations"].append({"id": 1, "image_id": 0, "category_id": 7, "bbox": [4, 2, 10, 6]})
    (tmp_path / "coco" / "instances.json").write_text(json.dumps(coco))
    _import(str(tmp_path / "coco" / "instances.json"), "--from", "coco", "--out", str(tmp_path / "coco-site"))
    assert len(read_site(tmp_path / "coco-site", SiteReading(32, 1, "boxes", class_names=("nodule",))).targets) == 3


def _nnunet_folder(root: Path, cases: int = 6) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case in range(cases):
        image = np.random.default_rng(case).normal(0, 1, (12, 12, 8)).astype(np.float32)
        mask = np.zeros((12, 12, 8), np.uint8)
        mask[3:8, 3:8, 2:6] = 1
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nibabel.save(nibabel.Nifti1Image(image, affine), root / "imagesTr" / f"case_{case:03d}_0000.nii.gz")
        nibabel.save(nibabel.Nifti1Image(mask, affine), root / "labelsTr" / f"case_{case:03d}.nii.gz")
    return root


def test_nifti_pairs_in_the_nnunet_layout_become_a_segmentation_site(tmp_path: Path) -> None:
    src = _nnunet_folder(tmp_path / "Dataset001")
    _import(str(src), "--from", "nifti", "--out", str(tmp_path / "site"), "--patient-pattern", r"case_(\d+)")
    site = read_site(tmp_path / "site", SiteReading(16, 2, "mask", 3))
    assert site.targets.shape == (6, 1, 16, 16, 16) and set(site.splits) == {"train", "val", "test"}
    np.testing.assert_allclose(site.spacing[0], (0.6, 0.6, 1.25))  # 12 x 0.8 mm and 8 x 2.5 mm over 16 voxels


def test_nifti_import_refuses_other_formats_and_names_the_file(tmp_path: Path) -> None:
    src = _nnunet_folder(tmp_path / "src", cases=2)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "imagesTr" / "stray.png")
    result = CliRunner().invoke(app, ["data", "import", str(src), "--from", "nifti", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "imagesTr/stray.png: not a NIfTI file" in result.output  # a data error


def test_image_folder_with_a_labels_table_becomes_a_classification_site(tmp_path: Path) -> None:
    rows = [["image", "label"]]
    for i in range(8):
        _png(tmp_path / "xrays" / f"pat{i // 2}_view{i % 2}.png", 20, 20, value=20 * i)
        rows.append([f"pat{i // 2}_view{i % 2}.png", str(i % 2)])
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    src, labels = str(tmp_path / "xrays"), str(tmp_path / "labels.csv")
    out = str(tmp_path / "site")
    _import(src, "--from", "image-mask", "--labels", labels, "--out", out, "--patient-pattern", r"(pat\d+)_")
    manifest = _manifest(tmp_path / "site")
    splits_of = {}
    for row in manifest:
        splits_of.setdefault(row["patient_id"], set()).add(row["split"])
    assert len(manifest) == 8 and all(len(s) == 1 for s in splits_of.values()) and len(splits_of) == 4
    assert read_site(tmp_path / "site", SiteReading(16, 2)).targets.tolist() == [i % 2 for i in range(8)]


def test_import_refuses_a_task_the_layout_cannot_give_and_a_non_empty_folder(tmp_path: Path) -> None:
    voc = _voc(tmp_path / "voc", {"a": [("cell", 2, 3, 12, 13)]})
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", str(voc), "--from", "voc", "--task", "segmentation", "--out", "x"])
    assert result.exit_code == 2 and "--from voc makes detection sites, not segmentation" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("site data")
    result = runner.invoke(app, ["data", "import", str(voc), "--from", "voc", "--out", str(tmp_path / "full")])
    assert result.exit_code == 2 and "exists and is not empty" in " ".join(result.output.split())  # rich wraps
    result = runner.invoke(app, ["data", "import", str(voc), "--from", "jpeg", "--out", str(tmp_path / "n")])
    assert result.exit_code == 2 and "expected one of" in result.output


def _series(
    folder: Path, patient: tuple[str, str], accession: str, modality: str = "CT", offset: int = 0
) -> tuple[Path, np.ndarray]:
    """A DICOM series of a 6 x 24 x 24 phantom with a bright box (its mask), identifying tags set, no extensions."""
    volume = np.full((6, 24, 24), -800 if modality == "CT" else 20, np.int16)
    volume[2:5, 6 + offset : 16 + offset, 8:18] = 400
    paths = write_dicom_series(volume, folder, spacing=(3.0, 0.9, 0.9), modality=modality)
    study = pydicom.uid.generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = patient[0], patient[1], accession
        ds.StudyInstanceUID = study
        ds.PatientBirthDate, ds.InstitutionName = "19610704", "Sentinel General Hospital"
        ds.save_as(path.with_suffix(""), enforce_file_format=True)  # PACS exports often have no extension
        path.unlink()
    return folder, (volume > 100).astype(np.uint8)


def _export(root: Path, with_segs: bool = True) -> dict[str, np.ndarray]:
    """A PACS-like export: 2 patients, 3 image series (CT, CT, MR) mixed in nested folders, DICOM-SEGs, junk."""
    series = {
        "ACC1": _series(root / "tmp-a", (SENTINEL_NAME, SENTINEL_ID), "ACC1"),
        "ACC2": _series(root / "tmp-b", (SENTINEL_NAME, SENTINEL_ID), "ACC2", offset=3),
        "ACC3": _series(root / "tmp-c", ("Other^Patient", "PID-2"), "ACC3", modality="MR", offset=5),
    }
    masks = {}
    for index, (accession, (folder, mask)) in enumerate(series.items()):
        target = root / "export" / f"study{index % 2}" / f"series{index}"
        target.mkdir(parents=True)
        for file in folder.iterdir():
            file.rename(target / file.name)
        folder.rmdir()
        if with_segs:
            scan = read_scan(target)
            write_dicom_seg(mask, scan, root / "export" / f"study{index % 2}" / f"seg{index}", {1: "lesion"})
        masks[accession] = mask
    (root / "export" / "README.txt").write_text("exported from PACS")
    return masks


def test_dicom_export_becomes_a_nifti_segmentation_site_without_identifying_data(tmp_path: Path) -> None:
    masks = _export(tmp_path)
    key = str(tmp_path / "keys" / "site.key")
    output = _import(str(tmp_path / "export"), "--from", "dicom", "--out", str(tmp_path / "site"), "--key-file", key)
    assert "1 files that are not DICOM skipped" in output and "--task segmentation" in output
    manifest = _manifest(tmp_path / "site")
    assert sorted(row["modality"] for row in manifest) == ["CT", "CT", "MR"]
    patients = {row["patient_id"] for row in manifest}
    assert len(patients) == 2 and all(p.startswith("p-") for p in patients)
    sources = list(csv.DictReader((tmp_path / "site" / "import-sources.csv").open()))
    for row, source in zip(manifest, sources, strict=True):
        image = read_scan(tmp_path / "site" / row["image"])
        mask = read_scan(tmp_path / "site" / row["mask"]).array.astype(np.uint8)
        original = next(m for m in masks.values() if np.array_equal(m, mask))  # aligned voxel for voxel
        assert image.array.shape == original.shape and source["SeriesInstanceUID"]
        np.testing.assert_allclose(image.spacing, (3.0, 0.9, 0.9))
        assert image.array[mask == 1].min() > 100  # the mask lies on the bright box
    for path in (tmp_path / "site").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            data = gzip.decompress(data) if path.name.endswith(".gz") else data
            for secret in (SENTINEL_NAME, SENTINEL_ID, "Sentinel General", "19610704", "ACC1", "phantom"):
                assert secret.encode() not in data, f"{secret} found in {path.name}"
    site = read_site(tmp_path / "site", SiteReading(16, 2, "mask", 3))
    assert site.privacy_units("train")[0] == "patient"
    check = CliRunner().invoke(
        app, ["data", "check", str(tmp_path / "site"), "--task", "segmentation", "--spatial-dims", "3"]
    )
    assert check.exit_code == 0, check.output
    assert "modalities: CT 2, MR 1" in check.output


def test_dicom_export_with_a_labels_table_becomes_a_classification_site(tmp_path: Path) -> None:
    _export(tmp_path, with_segs=False)
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["AccessionNumber", "label"], ["ACC1", "1"], ["ACC3", "0"], ["ACC9", "1"]])
    output = _import(
        str(tmp_path / "export"),
        "--from",
        "dicom",
        "--labels",
        str(tmp_path / "labels.csv"),
        "--out",
        str(tmp_path / "s"),
        "--key-file",
        str(tmp_path / "site.key"),
    )
    assert "1 image series without a label in labels.csv left out" in output
    assert "1 AccessionNumber value(s) of labels.csv match no series" in output
    assert sorted(row["label"] for row in _manifest(tmp_path / "s")) == ["0", "1"]


def test_dicom_export_problems_name_the_series(tmp_path: Path) -> None:
    _export(tmp_path)
    broken = sorted((tmp_path / "export" / "study1" / "series1").iterdir())[2]
    ds = pydicom.dcmread(broken)
    del ds.ImagePositionPatient
    ds.save_as(broken, enforce_file_format=True)
    with pytest.raises(DataError) as err:
        import_dicom(tmp_path / "export", tmp_path / "site", "segmentation", key_file=tmp_path / "site.key")
    assert "series 1, 6 file(s)" in str(err.value) and "phantom" not in str(err.value)  # no SeriesDescription
    assert "has no ImagePositionPatient" in str(err.value)
    assert not (tmp_path / "site" / "manifest.csv").exists()
