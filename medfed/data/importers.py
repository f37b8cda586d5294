"""``medfed data import --from KIND``: known layouts made into a site folder (design.md).

Every importer writes ``manifest.csv`` with patient-level train/val/test splits (image-level where
the source has no patients) and refuses to write into a non-empty folder. The kinds:

- ``medmnist``: a MedMNIST ``.npz`` (PNG images, labels, its official splits);
- ``voc``: a Pascal VOC folder (``Annotations/`` + ``JPEGImages/``) or an annotations folder with
  ``images``; ``coco``: a COCO ``.json`` file and its images folder (boxes, detection);
- ``image-mask`` and ``nifti``: an ``images/`` + ``masks/`` folder pair (or nnU-Net's
  ``imagesTr/`` + ``labelsTr/``) matched by file name (segmentation), or an image folder with a
  ``labels`` table (classification); ``nifti`` accepts NIfTI files only;
- ``dicom``: a PACS export, see :mod:`medfed.data.dicom_import`.
"""

from __future__ import annotations

import csv
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from medfed.data.boxes import import_coco, import_voc
from medfed.data.dicom_import import import_dicom
from medfed.data.manifest import MANIFEST, DataError, DataProblem, read_table, write_site
from medfed.data.medical_io import file_stem
from medfed.data.medmnist import read_medmnist
from medfed.data.pairs import IMAGE_SUFFIXES, assign_splits, import_pairs

__all__ = ["IMPORT_SOURCES", "Imported", "import_site"]

# each source's tasks, the default first
IMPORT_SOURCES: dict[str, tuple[str, ...]] = {
    "medmnist": ("classification",),
    "voc": ("detection",),
    "coco": ("detection",),
    "image-mask": ("segmentation", "classification"),
    "nifti": ("segmentation", "classification"),
    "dicom": ("segmentation", "classification"),
}
FOLDER_PAIRS = (("images", "masks"), ("imagesTr", "labelsTr"))


@dataclass
class Imported:
    """What an import made: the site folder, the task its targets are for, and notes for the operator."""

    folder: Path
    task: str
    notes: list[str] = field(default_factory=list)


def import_site(
    source: str,
    src: str | Path,
    out: str | Path,
    task: str = "",
    *,
    images: str | Path | None = None,
    masks: str | Path | None = None,
    labels: str | Path | None = None,
    patient_pattern: str = "",
    seed: int = 0,
    fractions: tuple[float, float] = (0.2, 0.2),
    channels: int = 1,
) -> Imported:
    """Make the site folder ``out`` from ``src`` in the layout ``source`` (see the module docstring).

    ``task`` defaults to the source's usual one (classification when a ``labels`` table is given).
    ``channels`` is what MedMNIST images are written with (3 keeps a colour set's RGB); the other
    layouts are copied file by file, as they are.
    Raises ValueError for settings that do not fit the source, :class:`DataError` for bad input files.
    """
    if source not in IMPORT_SOURCES:
        raise ValueError(f"--from {source!r}: expected one of {list(IMPORT_SOURCES)}")
    task = task or ("classification" if labels is not None else IMPORT_SOURCES[source][0])
    if task not in IMPORT_SOURCES[source]:
        raise ValueError(f"--from {source} makes {' or '.join(IMPORT_SOURCES[source])} sites, not {task}")
    if task == "classification" and source != "medmnist" and labels is None:
        raise ValueError(f"classification from --from {source} needs --labels: a CSV table of image and label")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    _check_empty(out)
    if source == "medmnist":
        write_site(out, read_medmnist(src, channels))
        return Imported(out, task)
    if source == "voc":
        annotations_dir = src / "Annotations" if (src / "Annotations").is_dir() else src
        images_dir = Path(images) if images else src / "JPEGImages"
        return Imported(import_voc(annotations_dir, images_dir, out, seed, fractions), task)
    if source == "coco":
        if not src.is_file():
            raise ValueError(f"--from coco: {src} should be the COCO .json file of the boxes")
        images_dir = Path(images) if images else _coco_images(src)
        return Imported(import_coco(src, images_dir, out, seed, fractions), task)
    if source == "dicom":
        folder, notes = import_dicom(src, out, task, labels, seed, fractions)
        return Imported(folder, task, notes)
    if task == "classification":
        assert labels is not None
        images_dir = Path(images) if images else src
        folder = import_labelled(images_dir, Path(labels), out, patient_pattern, seed, fractions, source == "nifti")
        return Imported(folder, task)
    images_dir, masks_dir = _pair_folders(src, images, masks)
    if source == "nifti":
        _only_nifti(images_dir, masks_dir)
    return Imported(import_pairs(images_dir, masks_dir, out, patient_pattern, seed, fractions), task)


def import_labelled(
    images_dir: Path,
    labels_csv: Path,
    out: Path,
    patient_pattern: str = "",
    seed: int = 0,
    fractions: tuple[float, float] = (0.2, 0.2),
    nifti_only: bool = False,
) -> Path:
    """A classification site from an image folder and a table with ``image`` (file name in the
    folder) and ``label`` (class index) columns, optional ``patient_id``; else patients come from
    ``patient_pattern`` in the file name, else each image is its own patient."""
    columns, rows = read_table(labels_csv)
    if "image" not in columns or "label" not in columns:
        raise DataError(
            labels_csv.parent, [DataProblem(labels_csv.name, f"needs image and label columns, has {columns}")]
        )
    pattern = re.compile(patient_pattern) if patient_pattern else None
    problems, entries = [], []
    for line, row in enumerate(rows, start=2):
        where = f"{labels_csv.name} line {line}"
        name, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        path = images_dir / name
        if not name or not path.exists() or not path.resolve().is_relative_to(images_dir.resolve()):
            problems.append(DataProblem(where, f"image {name!r} is not a file in {images_dir}"))
            continue
        if not label.isdigit():
            problems.append(DataProblem(where, f"label {label!r} is not a class index (0, 1, ...)"))
            continue
        if nifti_only and not name.lower().endswith((".nii", ".nii.gz")):
            problems.append(DataProblem(where, f"{name} is not a NIfTI file (.nii or .nii.gz)"))
            continue
        patient = (row.get("patient_id") or "").strip()
        if not patient and pattern is not None:
            match = pattern.search(file_stem(path))
            if match is None:
                problems.append(DataProblem(where, f"patient pattern {patient_pattern!r} finds no patient id"))
                continue
            patient = match.group(1) if match.groups() else match.group(0)
        entries.append(_Entry(path, name, label, patient or file_stem(path)))
    if not entries and not problems:
        problems.append(DataProblem(labels_csv.name, "no rows"))
    if problems:
        raise DataError(images_dir, problems)
    splits = assign_splits(entries, seed, fractions)
    out.mkdir(parents=True, exist_ok=True)
    with (out / MANIFEST).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "split", "patient_id"])
        for entry, split in zip(entries, splits, strict=True):
            target = out / "images" / entry.name
            target.parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if entry.path.is_dir() else shutil.copy2
            copy(entry.path, target)
            writer.writerow([f"images/{entry.name}", entry.label, split, entry.patient])
    return out


@dataclass
class _Entry:
    path: Path
    name: str
    label: str
    patient: str


def _check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose a new or empty output folder")


def _coco_images(json_path: Path) -> Path:
    """COCO images beside the .json: an ``images`` folder, else the .json's own folder."""
    beside = json_path.parent / "images"
    return beside if beside.is_dir() else json_path.parent


def _pair_folders(src: Path, images: str | Path | None, masks: str | Path | None) -> tuple[Path, Path]:
    """The image and mask folders: given, or ``src``'s ``images``/``masks`` (``imagesTr``/``labelsTr``)."""
    if masks is not None:
        return Path(images) if images else src, Path(masks)
    for image_name, mask_name in FOLDER_PAIRS:
        if (src / image_name).is_dir() and (src / mask_name).is_dir():
            return src / image_name, src / mask_name
    layouts = " or ".join(f"{a}/ + {b}/" for a, b in FOLDER_PAIRS)
    raise ValueError(f"{src} has no {layouts} folders: give the mask folder with --masks")


def _only_nifti(*folders: Path) -> None:
    problems = [
        DataProblem(f"{folder.name}/{p.name}", "not a NIfTI file (.nii or .nii.gz); use --from image-mask")
        for folder in folders
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.lower().endswith((".nii", ".nii.gz"))
    ]
    if problems:
        raise DataError(folders[0].parent, problems)
