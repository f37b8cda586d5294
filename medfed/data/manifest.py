"""A site folder on disk: ``manifest.csv`` plus the image files it names (design.md).

Columns: ``image`` (path relative to the folder), the target (``label``: a class index, or
``mask``: a label-mask file of the image's size, 0 = background), ``split``
(train/val/test) and optional ``patient_id`` (used only to keep a patient in one split; it never
leaves the site). Images may be PNG/JPEG, NumPy ``.npy``, DICOM ``.dcm`` or NIfTI ``.nii(.gz)``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medfed.data.arrays import SPLITS, SiteArrays

__all__ = ["DataError", "DataProblem", "load_image", "load_mask", "read_site", "write_site"]

MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("image", "split")


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a site folder: which file (or row) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class DataError(ValueError):
    """A site folder cannot be used; lists every problem found, not only the first."""

    def __init__(self, site_dir: Path, problems: list[DataProblem]) -> None:
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"site folder {site_dir} has {len(problems)} problem(s):\n  {shown}{more}")


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Read one 2D image as ``(1, image_size, image_size)`` float32 in [0, 1]."""
    name = path.name.lower()
    if name.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
        with Image.open(path) as img:
            array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    elif name.endswith(".npy"):
        array = _normalise(np.load(path, allow_pickle=False).astype(np.float32))
    elif name.endswith(".dcm"):
        import pydicom

        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
        pixels = pixels * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        array = _normalise(pixels)
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel

        array = _normalise(np.asarray(nibabel.load(path).dataobj, dtype=np.float32))
    else:
        raise ValueError("unsupported image format; expected PNG/JPEG, .npy, .dcm or .nii(.gz)")
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or Inf pixels")
    return _resize(array, image_size)[None]


def load_mask(path: Path, image_size: int, num_classes: int) -> np.ndarray:
    """Read a 2D label mask as ``(1, image_size, image_size)`` int64 (nearest-neighbour resize)."""
    name = path.name.lower()
    if name.endswith(".npy"):
        mask = np.load(path, allow_pickle=False)
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel

        mask = np.asarray(nibabel.load(path).dataobj)
    else:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) if img.mode == "1" else np.asarray(img)
            if img.mode == "1":
                mask = (mask > 0).astype(np.int64)
    mask = np.squeeze(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
    if not np.array_equal(mask, np.round(mask)) or mask.min() < 0 or mask.max() >= num_classes:
        raise ValueError(f"mask values must be class indices in [0, {num_classes - 1}], found {np.unique(mask)[:8]}")
    if mask.shape != (image_size, image_size):
        rows = (np.arange(image_size) * mask.shape[0] / image_size).astype(int)
        cols = (np.arange(image_size) * mask.shape[1] / image_size).astype(int)
        mask = mask[np.ix_(rows, cols)]
    return mask.astype(np.int64)[None]


def read_site(site_dir: str | Path, image_size: int, num_classes: int, target: str = "label") -> SiteArrays:
    """Load and validate a site folder; raise :class:`DataError` listing every bad row.

    ``target`` is the manifest column holding what the task learns: ``label`` or ``mask``.
    """
    site_dir = Path(site_dir)
    manifest = site_dir / MANIFEST
    if not manifest.is_file():
        raise DataError(site_dir, [DataProblem(str(manifest), "missing: a site folder needs manifest.csv")])
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in (*REQUIRED_COLUMNS, target) if c not in columns]
    if missing:
        raise DataError(site_dir, [DataProblem(MANIFEST, f"missing column(s) {missing}; found {columns}")])
    if not rows:
        raise DataError(site_dir, [DataProblem(MANIFEST, "no rows")])

    problems: list[DataProblem] = []
    images, targets, splits, patients = [], [], [], []
    for line, row in enumerate(rows, start=2):
        where = f"{MANIFEST} line {line}"
        if row["split"] not in SPLITS:
            problems.append(DataProblem(where, f"split {row['split']!r} is not one of {list(SPLITS)}"))
        if target == "label":
            value = _parse_label(row["label"], num_classes)
            if value is None:
                problems.append(
                    DataProblem(where, f"label {row['label']!r} is not a class index in [0, {num_classes - 1}]")
                )
        image = _read_file(site_dir, row["image"], where, problems, lambda p: load_image(p, image_size))
        if target == "mask":
            value = _read_file(site_dir, row["mask"], where, problems, lambda p: load_mask(p, image_size, num_classes))
        if image is None or value is None:
            continue
        images.append(image)
        targets.append(value)
        splits.append(row["split"])
        patients.append(row.get("patient_id") or "")
    problems.extend(_patient_leaks(rows))
    if problems:
        raise DataError(site_dir, problems)
    return SiteArrays(
        np.stack(images).astype(np.float32),
        np.asarray(targets, dtype=np.int64),
        np.asarray(splits, dtype=str),
        np.asarray(patients, dtype=str),
        target_key=target,
    )


def _read_file(
    site_dir: Path, relative: str, where: str, problems: list[DataProblem], reader: Callable[[Path], np.ndarray]
) -> np.ndarray | None:
    """Read one file named in the manifest, or record why it cannot be used."""
    path = site_dir / relative
    if not path.resolve().is_relative_to(site_dir.resolve()):
        problems.append(DataProblem(where, f"{relative} leaves the site folder"))
        return None
    if not path.is_file():
        problems.append(DataProblem(where, f"{relative}: file not found"))
        return None
    try:
        return reader(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is reported per file
        problems.append(DataProblem(where, f"{relative} unreadable: {err}"))
        return None


def write_site(site_dir: str | Path, site: SiteArrays) -> Path:
    """Write a site folder (8-bit PNG images, PNG masks for masks, manifest.csv) from arrays."""
    site_dir = Path(site_dir)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    masks = site.target_key == "mask"
    if masks:
        (site_dir / "masks").mkdir(exist_ok=True)
    with (site_dir / MANIFEST).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", site.target_key, "split", "patient_id"])
        for i, (image, target, split) in enumerate(zip(site.images, site.targets, site.splits, strict=True)):
            rel = f"images/{i:06d}.png"
            pixels = np.clip(np.round(image[0] * 255), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(site_dir / rel)
            if masks:
                value = f"masks/{i:06d}.png"
                Image.fromarray(target[0].astype(np.uint8)).save(site_dir / value)
            else:
                value = str(int(target))
            pid = site.patient_ids[i] if site.patient_ids is not None else ""
            writer.writerow([rel, value, split, pid])
    return site_dir


def _parse_label(text: str, num_classes: int) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 <= value < num_classes else None


def _patient_leaks(rows: list[dict[str, str]]) -> list[DataProblem]:
    seen: dict[str, set[str]] = {}
    for row in rows:
        if row.get("patient_id"):
            seen.setdefault(row["patient_id"], set()).add(row["split"])
    return [
        DataProblem(MANIFEST, f"a patient appears in several splits {sorted(s)}: splits must be patient-level")
        for s in seen.values()
        if len(s) > 1
    ]


def _normalise(array: np.ndarray) -> np.ndarray:
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return array
    low, high = np.percentile(finite, [0.5, 99.5])
    return np.clip((array - low) / max(high - low, 1e-6), 0, 1)


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    if array.shape == (size, size):
        return array.astype(np.float32)
    from monai.transforms import Resize

    resized = Resize((size, size), mode="area" if min(array.shape) > size else "bilinear")(array[None])
    return np.asarray(resized, dtype=np.float32)[0]
