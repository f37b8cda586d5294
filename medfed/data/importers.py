"""``medfed data import --from KIND``: known layouts made into a site folder (design.md).

Every importer writes ``manifest.csv`` with patient-level train/val/test splits (image-level where
the source has no patients) and refuses to write into a non-empty folder. The kinds:

- ``medmnist``: a MedMNIST ``.npz`` (PNG images, labels, its official splits);
- ``voc``: a Pascal VOC folder (``Annotations/`` + ``JPEGImages/``) or an annotations folder with
  ``images``; ``coco``: a COCO ``.json`` file and its images folder (boxes, detection);
- ``image-mask`` and ``nifti``: an ``images/`` + ``masks/`` folder pair (or nnU-Net's
  ``imagesTr/`` + ``labelsTr/``) matched by file name (segmentation), or an image folder with a
  ``labels`` table (classification); ``nifti`` accepts NIfTI files only;
- ``dicom``: a PACS export, see :mod:`medfed.data.dicom_import`;
- ``heart-uci``: the UCI Heart Disease files of four hospitals, one tabular site folder each
  (``OUT/<hospital>/``, a folder of site folders), see :mod:`medfed.data.heart_uci`.
"""

from __future__ import annotations

import csv
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from medfed.data.arrays import SiteArrays
from medfed.data.boxes import import_coco, import_voc
from medfed.data.dicom_import import import_dicom
from medfed.data.heart_uci import import_heart_uci
from medfed.data.import_guard import (
    MAX_NAME_BYTES,
    PatientPattern,
    UnsafePath,
    check_fractions,
    copy_inside,
    real_folder,
    require_training,
    resolve_inside,
    tree_to_copy,
)
from medfed.data.manifest import read_table, write_site
from medfed.data.medical_io import file_stem
from medfed.data.medmnist import read_medmnist
from medfed.data.pairs import IMAGE_SUFFIXES, import_pairs
from medfed.data.partition import assign_splits
from medfed.data.vocabulary import MANIFEST, DataError, DataProblem

__all__ = ["IMPORT_SOURCES", "Imported", "import_site"]

# each source's tasks, the default first
IMPORT_SOURCES: dict[str, tuple[str, ...]] = {
    "medmnist": ("classification",),
    "voc": ("detection",),
    "coco": ("detection",),
    "image-mask": ("segmentation", "classification"),
    "nifti": ("segmentation", "classification"),
    "dicom": ("segmentation", "classification"),
    "heart-uci": ("tabular",),
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
    key_file: str | Path | None = None,
) -> Imported:
    """Make the site folder ``out`` from ``src`` in the layout ``source`` (see the module docstring).

    ``task`` defaults to the source's usual one (classification when a ``labels`` table is given).
    ``channels`` is what MedMNIST images are written with (3 keeps a colour set's RGB); the other
    layouts are copied file by file, as they are. ``key_file`` holds the site key of DICOM patient
    pseudonyms (:mod:`medfed.data.pseudonyms`).

    Every file read must resolve inside its source folder (``src``, or the ``images`` / ``masks``
    folder given) and every file written lands inside ``out`` (:mod:`medfed.data.import_guard`).
    Raises ValueError, FileNotFoundError or FileExistsError naming the setting that does not fit,
    :class:`DataError` for bad input files (or a split that leaves nothing to train on).
    """
    if source not in IMPORT_SOURCES:
        raise ValueError(f"--from {source!r}: expected one of {list(IMPORT_SOURCES)}")
    task = task or ("classification" if labels is not None else IMPORT_SOURCES[source][0])
    if task not in IMPORT_SOURCES[source]:
        raise ValueError(f"--from {source} makes {' or '.join(IMPORT_SOURCES[source])} sites, not {task}")
    if task == "classification" and source != "medmnist" and labels is None:
        raise ValueError(f"classification from --from {source} needs --labels: a CSV table of image and label")
    check_fractions(*fractions)
    pattern = PatientPattern(patient_pattern) if patient_pattern else None
    for option, path in (("SRC", src), ("--out", out), ("--images", images), ("--masks", masks), ("--labels", labels)):
        _check_name_lengths(option, path)
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if labels is not None and not Path(labels).is_file():
        raise FileNotFoundError(f"--labels {labels} is not a file: expected a CSV table")
    out = _output_folder(out)
    if source == "medmnist":
        if not src.is_file():
            raise ValueError(f"--from medmnist: {src} should be a MedMNIST .npz file")
        write_site(out, _medmnist(src, channels))
        return Imported(out, task)
    if source == "coco":
        if not src.is_file():
            raise ValueError(f"--from coco: {src} should be the COCO .json file of the boxes")
        folder = real_folder(src.parent, "the folder of the COCO file,")
        images_dir = real_folder(images, "--images") if images else _subfolder(folder, "images") or folder
        return Imported(import_coco(src, images_dir, out, seed, fractions), task)
    if source == "heart-uci":
        return Imported(out, task, import_heart_uci(src, out, seed, fractions))
    if source == "dicom":
        folder, notes = import_dicom(src, out, task, labels, seed, fractions, key_file)
        return Imported(folder, task, notes)
    root = real_folder(src, f"--from {source}")
    if source == "voc":
        annotations_dir = _subfolder(root, "Annotations") or root
        images_dir = (
            real_folder(images, "--images") if images else _subfolder(root, "JPEGImages") or root / "JPEGImages"
        )
        return Imported(import_voc(annotations_dir, images_dir, out, seed, fractions), task)
    if task == "classification":
        assert labels is not None
        images_dir = real_folder(images, "--images") if images else root
        folder = import_labelled(images_dir, Path(labels), out, pattern, seed, fractions, source == "nifti")
        return Imported(folder, task)
    images_dir, masks_dir = _pair_folders(root, images, masks)
    if source == "nifti":
        _only_nifti(images_dir, masks_dir)
    return Imported(import_pairs(images_dir, masks_dir, out, pattern or "", seed, fractions), task)


def import_labelled(
    images_dir: Path,
    labels_csv: Path,
    out: Path,
    patient_pattern: str | PatientPattern | None = None,
    seed: int = 0,
    fractions: tuple[float, float] = (0.2, 0.2),
    nifti_only: bool = False,
) -> Path:
    """A classification site from an image folder and a table with ``image`` (file name in the
    folder) and ``label`` (class index) columns, optional ``patient_id``; else patients come from
    ``patient_pattern`` in the file name, else each image is its own patient.

    An ``image`` must resolve inside ``images_dir`` (:func:`~medfed.data.import_guard.resolve_inside`)
    and be listed once; it is copied to ``out/images/`` under its path relative to the folder.
    """
    if isinstance(patient_pattern, str):
        patient_pattern = PatientPattern(patient_pattern) if patient_pattern else None
    images_dir, out = Path(os.path.realpath(images_dir)), Path(os.path.realpath(out))
    columns, rows = read_table(labels_csv)
    if "image" not in columns or "label" not in columns:
        raise DataError(
            labels_csv.parent, [DataProblem(labels_csv.name, f"needs image and label columns, has {columns}")]
        )
    problems: list[DataProblem] = []
    entries: list[_Entry] = []
    seen: dict[Path, int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{labels_csv.name} line {line}"
        name, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        try:
            path = resolve_inside(images_dir, name)
        except UnsafePath as err:
            problems.append(DataProblem(where, f"image {name!r} {err}"))
            continue
        if path == images_dir or not (path.is_file() or path.is_dir()):
            problems.append(DataProblem(where, f"image {name!r} is not an image file (or series folder) in it"))
            continue
        try:
            tree_to_copy(path, images_dir)
        except UnsafePath as err:
            problems.append(DataProblem(where, f"image folder {name!r} {err}"))
            continue
        if path in seen:
            problems.append(DataProblem(where, f"image {name!r} is listed again (first on line {seen[path]})"))
            continue
        seen[path] = line
        if not label.isdigit():
            problems.append(DataProblem(where, f"label {label!r} is not a class index (0, 1, ...)"))
            continue
        if nifti_only and not path.name.lower().endswith((".nii", ".nii.gz")):
            problems.append(DataProblem(where, f"{name!r} is not a NIfTI file (.nii or .nii.gz)"))
            continue
        entries.append(
            _Entry(path, path.relative_to(images_dir).as_posix(), label, (row.get("patient_id") or "").strip(), where)
        )
    _fill_patients(entries, patient_pattern, problems)
    if not entries and not problems:
        problems.append(DataProblem(labels_csv.name, "no rows"))
    if problems:
        raise DataError(images_dir, problems)
    splits = assign_splits(entries, seed, fractions)
    require_training(entries, splits, fractions, images_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / MANIFEST).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "split", "patient_id"])
        for entry, split in zip(entries, splits, strict=True):
            copy_inside(entry.path, images_dir, out, f"images/{entry.name}")
            writer.writerow([f"images/{entry.name}", entry.label, split, entry.patient])
    return out


@dataclass
class _Entry:
    path: Path
    name: str
    label: str
    patient: str
    where: str


def _fill_patients(entries: list[_Entry], pattern: PatientPattern | None, problems: list[DataProblem]) -> None:
    """Give each entry without the table's patient one: found by ``pattern`` in its file name, else the file name."""
    unknown = [entry for entry in entries if not entry.patient]
    found = pattern.patients([file_stem(entry.path) for entry in unknown]) if pattern else [None] * len(unknown)
    for entry, patient in zip(unknown, found, strict=True):
        if pattern is not None and patient is None:
            problems.append(DataProblem(entry.where, f"{pattern.option} {pattern.pattern!r} finds no patient id"))
        entry.patient = patient or file_stem(entry.path)


def _check_name_lengths(option: str, path: str | Path | None) -> None:
    """ValueError naming ``option`` when a name in ``path`` is longer than a file system allows."""
    longest = max((len(os.fsencode(part)) for part in Path(path or "").parts), default=0)
    if longest > MAX_NAME_BYTES:
        raise ValueError(f"{option} {path}: a name of {longest} bytes; file names are at most {MAX_NAME_BYTES} bytes")


def _output_folder(out: str | Path) -> Path:
    """``out`` resolved: a new or empty folder, whose nearest existing parent is a folder."""
    real = Path(os.path.realpath(out))
    if os.path.lexists(real) and not real.exists():
        raise ValueError(f"--out {out} is a broken symlink or a symlink loop: choose a new or empty output folder")
    if real.exists() and (not real.is_dir() or any(real.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose a new or empty output folder")
    parent = next(p for p in (real, *real.parents) if p.exists())
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    return real


def _medmnist(path: Path, channels: int) -> SiteArrays:
    """:func:`read_medmnist`, with a file that is not a MedMNIST ``.npz`` (or whose images do not fit
    ``channels``) as a :class:`DataError` naming it."""
    try:
        return read_medmnist(path, channels)
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise DataError(path.parent, [DataProblem(path.name, f"not a readable MedMNIST .npz: {err}")]) from None


def _subfolder(root: Path, name: str) -> Path | None:
    """The folder ``root/name`` resolved, None when there is none; a :class:`DataError` when it leads out of ``root``."""
    if not os.path.lexists(root / name):
        return None
    try:
        real = resolve_inside(root, name)
    except UnsafePath as err:
        raise DataError(root, [DataProblem(name, str(err))]) from None
    return real if real.is_dir() else None


def _pair_folders(root: Path, images: str | Path | None, masks: str | Path | None) -> tuple[Path, Path]:
    """The image and mask folders: given, or ``root``'s ``images``/``masks`` (``imagesTr``/``labelsTr``)."""
    if masks is not None:
        return real_folder(images, "--images") if images else root, real_folder(masks, "--masks")
    for image_name, mask_name in FOLDER_PAIRS:
        image_dir, mask_dir = _subfolder(root, image_name), _subfolder(root, mask_name)
        if image_dir and mask_dir:
            return image_dir, mask_dir
    layouts = " or ".join(f"{a}/ + {b}/" for a, b in FOLDER_PAIRS)
    raise ValueError(f"{root} has no {layouts} folders: give the mask folder with --masks")


def _only_nifti(*folders: Path) -> None:
    problems = [
        DataProblem(f"{folder.name}/{p.name}", "not a NIfTI file (.nii or .nii.gz); use --from image-mask")
        for folder in folders
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.lower().endswith((".nii", ".nii.gz"))
    ]
    if problems:
        raise DataError(folders[0].parent, problems)
