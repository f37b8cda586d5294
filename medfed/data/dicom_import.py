"""A PACS export as a site folder: every DICOM image series becomes one sample.

The export may be any folder tree of DICOM files (with or without ``.dcm`` extensions, with a
DICOMDIR, several patients, studies and series mixed). Files are grouped by SeriesInstanceUID;
each image series is read as one scan (slices ordered along the slice normal, rescale applied,
geometry kept) and written as a NIfTI file with its affine, so that the site folder holds no DICOM
header and so no patient name, date or free text (nor does any message print one). Targets come from:

- segmentation: DICOM-SEG objects in the export, each read onto the series it references and
  written as a NIfTI label map aligned with the image (segment number = class index);
- classification: a CSV table with a ``label`` column and one key column named after a DICOM
  attribute (``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID`` or ``AccessionNumber``).

Patients are pseudonymised before they reach the manifest, where they only keep a patient in one
split: an HMAC of PatientID keyed with the site's secret key (:mod:`medfed.data.pseudonyms`), so
that hashing candidate ids does not reverse it. ``import-sources.csv`` links each sample back to
its series and study UIDs and series number (each written only when it has the syntax DICOM gives
it, so no free text slips in through a malformed header) for the site's own staff; like every file
of the site folder it never leaves the site. Files are read only inside the export folder: a
symlink leading out of it is an error (:mod:`medfed.data.import_guard`).
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medfed.data.decode import read_dicom_seg, scan_geometry
from medfed.data.import_guard import real_folder, require_training, tree_files
from medfed.data.manifest import read_table
from medfed.data.medical_io import Scan, read_dicom_series, write_nifti, write_nifti_mask
from medfed.data.partition import assign_splits
from medfed.data.pseudonyms import default_key_file, pseudonym, site_key
from medfed.data.vocabulary import MANIFEST, DataError, DataProblem

__all__ = ["LABEL_KEYS", "DicomSeries", "find_series", "import_dicom"]

LABEL_KEYS = ("SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber", "PatientID")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC")
SOURCES = "import-sources.csv"
UID_SYNTAX = re.compile(r"[0-9]+(\.[0-9]+)*")  # DICOM UI: digits and dots, at most 64 characters
CODE_SYNTAX = re.compile(r"[A-Z0-9_ ]+")  # DICOM CS (Modality): upper-case letters, digits, _ and space, at most 16


@dataclass
class DicomSeries:
    """The files of one series in an export and the header values the import needs (no free text:
    neither descriptions nor names are read, so none can be written or printed)."""

    uid: str
    modality: str
    patient: str
    study: str
    accession: str
    number: str
    files: list[Path] = field(default_factory=list)

    @property
    def where(self) -> str:
        """How the series is named in messages at the site: its number and first file."""
        return f"series {self.number or '?'}, {len(self.files)} file(s) from {self.files[0].name}"

    def key(self, name: str) -> str:
        return {
            "SeriesInstanceUID": self.uid,
            "StudyInstanceUID": self.study,
            "AccessionNumber": self.accession,
            "PatientID": self.patient,
        }[name]


def find_series(root: str | Path) -> tuple[list[DicomSeries], list[DicomSeries], list[str]]:
    """Image series and DICOM-SEG series under ``root`` (headers only), and notes on what was skipped."""
    root = real_folder(root, "DICOM export folder")
    paths, problems = tree_files(root)
    if problems:
        raise DataError(root, problems)
    series: dict[str, DicomSeries] = {}
    skipped: defaultdict[str, int] = defaultdict(int)
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, RecursionError):
            skipped["files that are not DICOM"] += 1
            continue
        if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS:
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        if not uid:
            skipped["DICOM files without a SeriesInstanceUID"] += 1
            continue
        modality = str(ds.get("Modality") or "").strip().upper()
        if modality in NON_IMAGE_MODALITIES and modality != "SEG":
            skipped[f"{modality} objects (not images)"] += 1
            continue
        entry = series.get(uid)
        if entry is None:
            entry = series[uid] = DicomSeries(
                uid,
                modality,
                str(ds.get("PatientID") or ""),
                str(ds.get("StudyInstanceUID") or ""),
                str(ds.get("AccessionNumber") or ""),
                _number(str(ds.get("SeriesNumber") or "")),
            )
        entry.files.append(path)
    images = [s for s in series.values() if s.modality != "SEG"]
    segs = [s for s in series.values() if s.modality == "SEG"]
    return images, segs, [f"{count} {what} skipped" for what, count in skipped.items()]


def import_dicom(
    export_dir: str | Path,
    out_dir: str | Path,
    task: str,
    labels_csv: str | Path | None = None,
    seed: int = 0,
    fractions: tuple[float, float] = (0.2, 0.2),
    key_file: str | Path | None = None,
) -> tuple[Path, list[str]]:
    """Make a site folder from a DICOM export for ``task`` (segmentation: DICOM-SEG masks in the export;
    classification: ``labels_csv``). Returns the folder and notes on series left out and why.

    Patients are pseudonymised with the site key in ``key_file`` (default
    :func:`~medfed.data.pseudonyms.default_key_file`; created when missing). Raises
    :class:`DataError` listing every series that cannot be read or labelled unambiguously, and
    every file of the export that leads outside it; ValueError for an unusable key file.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new or empty output folder")
    key = site_key(key_file or default_key_file(), out_dir)
    images, segs, notes = find_series(export_dir)
    if not images:
        raise DataError(export_dir, [DataProblem(str(export_dir), "no DICOM image series found (searched all files)")])
    problems: list[DataProblem] = []
    if task == "segmentation":
        targets = _segmentations(images, segs, problems, notes)
    elif task == "classification":
        if labels_csv is None:
            raise ValueError("classification from DICOM needs --labels: a CSV table with a key column and label")
        targets = _labels(images, Path(labels_csv), problems, notes)
    else:
        raise ValueError(f"task {task!r}: a DICOM export can be imported for segmentation or classification")
    chosen = [s for s in images if s.uid in targets]
    if not chosen and not problems:
        problems.append(DataProblem(str(export_dir), f"no series has a {task} target: nothing to import"))
    scans: list[tuple[DicomSeries, Scan]] = []
    for series in chosen:
        try:
            scans.append((series, _read(series)))
        except Exception as err:  # noqa: BLE001 - every unreadable series is reported
            problems.append(DataProblem(series.where, str(err)))
    if problems:
        raise DataError(export_dir, problems)
    _write(scans, targets, out_dir, task, seed, fractions, key)
    return out_dir, notes


def _read(series: DicomSeries) -> Scan:
    datasets = []
    for path in series.files:
        try:
            datasets.append((path, pydicom.dcmread(path)))
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise ValueError(f"{path.name} is not a readable DICOM file: {err}") from None
    return read_dicom_series(datasets, series.uid, series.where)


def _segmentations(
    images: list[DicomSeries], segs: list[DicomSeries], problems: list[DataProblem], notes: list[str]
) -> dict[str, Path | str]:
    """The DICOM-SEG file of each image series that has exactly one."""
    import highdicom as hd

    by_series: defaultdict[str, list[Path]] = defaultdict(list)
    for seg_series in segs:
        for path in seg_series.files:
            try:
                seg = hd.seg.segread(path, lazy_frame_retrieval=True)
            except Exception as err:  # noqa: BLE001 - highdicom raises many types for broken files
                problems.append(DataProblem(path.name, f"not a readable DICOM-SEG: {err}"))
                continue
            for referenced in {series_uid for _, series_uid, _ in seg.get_source_image_uids()}:
                by_series[referenced].append(path)
    targets: dict[str, Path | str] = {}
    unlabelled = []
    for series in images:
        found = by_series.get(series.uid, [])
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            problems.append(DataProblem(series.where, f"{len(found)} DICOM-SEG objects reference it ({names})"))
        elif found:
            targets[series.uid] = found[0]
        else:
            unlabelled.append(series)
    if unlabelled:
        notes.append(f"{len(unlabelled)} image series without a DICOM-SEG left out: " + _names(unlabelled))
    return targets


def _labels(
    images: list[DicomSeries], labels_csv: Path, problems: list[DataProblem], notes: list[str]
) -> dict[str, Path | str]:
    """Each series' class label from the table's key column (the first of :data:`LABEL_KEYS` it has)."""
    columns, rows = read_table(labels_csv)
    key = next((k for k in LABEL_KEYS if k in columns), None)
    if key is None or "label" not in columns:
        reason = f"needs a label column and one of the key columns {list(LABEL_KEYS)}; found {columns}"
        raise DataError(labels_csv.parent, [DataProblem(labels_csv.name, reason)])
    table: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        value, label = (row.get(key) or "").strip(), (row.get("label") or "").strip()
        if not value or not label:
            problems.append(DataProblem(f"{labels_csv.name} line {line}", f"empty {key} or label"))
        elif table.setdefault(value, label) != label:
            problems.append(DataProblem(f"{labels_csv.name} line {line}", f"{key} has two labels"))
    targets: dict[str, Path | str] = {s.uid: table[s.key(key)] for s in images if s.key(key) in table}
    unlabelled = [s for s in images if s.uid not in targets]
    if unlabelled:
        notes.append(
            f"{len(unlabelled)} image series without a label in {labels_csv.name} left out: {_names(unlabelled)}"
        )
    unused = len(set(table) - {s.key(key) for s in images})
    if unused:
        notes.append(f"{unused} {key} value(s) of {labels_csv.name} match no series in the export")
    return targets


def _names(series: list[DicomSeries]) -> str:
    shown = "; ".join(s.where for s in series[:5])
    return shown + (f"; and {len(series) - 5} more" if len(series) > 5 else "")


def _write(
    scans: list[tuple[DicomSeries, Scan]],
    targets: dict[str, Path | str],
    out_dir: Path,
    task: str,
    seed: int,
    fractions: tuple[float, float],
    key: bytes,
) -> None:
    """NIfTI images (and masks), ``manifest.csv`` with pseudonymous patient-level splits, ``import-sources.csv``."""
    patients = [_Patient(_pseudonym(series, key)) for series, _ in scans]
    splits = assign_splits(patients, seed, fractions)
    require_training(patients, splits, fractions, out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if task == "segmentation":
        (out_dir / "masks").mkdir()
    target_column = "mask" if task == "segmentation" else "label"
    with (out_dir / MANIFEST).open("w", newline="") as manifest, (out_dir / SOURCES).open("w", newline="") as sources:
        rows, links = csv.writer(manifest), csv.writer(sources)
        rows.writerow(["image", target_column, "split", "patient_id", "modality"])
        links.writerow(["image", "SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber"])
        for index, ((series, scan), patient, split) in enumerate(zip(scans, patients, splits, strict=True)):
            image = f"images/series-{index + 1:04d}.nii.gz"
            _write_image(scan, out_dir / image)
            if task == "segmentation":
                _, geometry = scan_geometry(scan, scan.array.squeeze().ndim)
                segments, _ = read_dicom_seg(Path(targets[series.uid]), geometry)
                target = f"masks/series-{index + 1:04d}.nii.gz"
                write_nifti_mask(segments.reshape(scan.array.shape), scan, out_dir / target)
            else:
                target = str(targets[series.uid])
            rows.writerow([image, target, split, patient.patient, _code(scan.modality)])
            links.writerow([image, _uid(series.uid), _uid(series.study), series.number])


class _Patient:
    def __init__(self, patient: str) -> None:
        self.patient = patient


def _pseudonym(series: DicomSeries, key: bytes) -> str:
    """The patient's keyed pseudonym (the study stands in when PatientID is empty)."""
    return pseudonym(key, series.patient or f"study:{series.study or series.uid}")


def _uid(value: str) -> str:
    """A UID as written in ``import-sources.csv``: itself when it has UID syntax, else a placeholder."""
    return value if len(value) <= 64 and UID_SYNTAX.fullmatch(value) else "(not a valid UID)"


def _number(value: str) -> str:
    """A SeriesNumber (IS): itself when it is an integer, else empty."""
    return value if value.lstrip("+-").isdigit() and len(value) <= 12 else ""


def _code(value: str) -> str:
    """A code string (Modality) as written in the manifest: itself when it has CS syntax, else empty."""
    return value if len(value) <= 16 and CODE_SYNTAX.fullmatch(value) else ""


def _write_image(scan: Scan, path: Path) -> None:
    """The scan as NIfTI with its affine: int16 when its values are whole numbers in range, else float32."""
    array = scan.array
    whole = np.array_equal(array, np.round(array)) and array.min() >= -32768 and array.max() <= 32767
    write_nifti(array.astype(np.int16 if whole else np.float32), scan.affine, path)
