"""A site folder on disk: ``manifest.csv`` plus the image files it names (design.md).

Columns: ``image`` (path relative to the folder), the target (``label``: a class index, or
``mask``: a label-mask file of the image's size, 0 = background), ``split``
(train/val/test) and optional ``patient_id`` (used only to keep a patient in one split; it never
leaves the site). Images may be PNG/JPEG, NumPy ``.npy``, DICOM ``.dcm`` or NIfTI ``.nii(.gz)``.
Box targets (detection) have no manifest column: they sit in ``boxes.csv`` beside it
(see :mod:`medfed.data.boxes`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from medfed.data.arrays import SPLITS, SiteArrays
from medfed.data.medical_io import Scan, read_scan

__all__ = ["DataError", "DataProblem", "Intensity", "load_image", "load_mask", "read_site", "write_site"]

MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("image", "split")
T = TypeVar("T")
CT_WINDOW = (-1000.0, 1000.0)  # Hounsfield units: air to dense bone


@dataclass(frozen=True)
class Intensity:
    """How image values become model inputs: CT is clipped to ``ct_window`` (Hounsfield units).

    ``modality`` "auto" takes CT from the DICOM Modality tag; "CT" treats every non-photo image as
    CT (NIfTI CT, which has no modality tag); "other" never windows (percentile scaling).
    """

    ct_window: tuple[float, float] = CT_WINDOW
    modality: str = "auto"

    def is_ct(self, scan: Scan) -> bool:
        return scan.modality == "CT" if self.modality == "auto" else self.modality == "CT"


DEFAULT_INTENSITY = Intensity()
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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


def load_image(
    path: Path,
    image_size: int,
    spatial_dims: int = 2,
    spacing: tuple[float, ...] | None = None,
    intensity: Intensity = DEFAULT_INTENSITY,
) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """Read one image (2D) or volume (3D) as ``(1, *[image_size] * spatial_dims)`` float32 in [0, 1].

    Returns the array, its voxel size in mm after resampling and the file's own shape (singleton
    axes dropped), against which a mask is checked. ``spacing`` (mm per input pixel)
    replaces the file's own; a file without one (PNG) counts 1 mm per pixel. Photos (PNG/JPEG,
    8-bit) are scaled by 1/255, other formats by their 0.5-99.5 percentile range.
    """
    scan = read_scan(path)
    if spacing is not None and len(spacing) != spatial_dims:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values; the image has {spatial_dims} axes")
    return model_input(scan, image_size, spatial_dims, is_photo(path), spacing, intensity)


def is_photo(path: Path) -> bool:
    """PNG/JPEG/BMP/TIFF: pixel values are display levels, not physical intensities."""
    return path.name.lower().endswith(PHOTO_SUFFIXES)


def model_input(
    scan: Scan,
    image_size: int,
    spatial_dims: int,
    photo: bool,
    spacing: tuple[float, ...] | None = None,
    intensity: Intensity = DEFAULT_INTENSITY,
) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """A scan as the model sees it: ``(1, *[image_size] * spatial_dims)`` in [0, 1], its voxel size in mm
    after resampling, and the shape it was resampled from (singleton axes dropped).

    8-bit photos are scaled by 1/255; CT (values in Hounsfield units; see :class:`Intensity`) is
    clipped to its window and scaled to [0, 1], so that a tissue has the same value at every site;
    anything else (MR, ...) is scaled by its 0.5-99.5 percentile range.
    """
    array, file_spacing = _squeeze(scan.array, scan.spacing, spatial_dims, "image")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or Inf pixels")
    if photo and array.max(initial=0) <= 255:
        array = array / 255.0
    elif intensity.is_ct(scan):
        low, high = intensity.ct_window
        array = np.clip((array - low) / (high - low), 0.0, 1.0)
    else:
        array = _normalise(array)
    resized = _resize(array.astype(np.float32), image_size)
    return resized[None], _resampled_spacing(spacing or file_spacing, array.shape, image_size), array.shape


def load_mask(
    path: Path, image_size: int, num_classes: int, spatial_dims: int = 2, image_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Read a label mask as ``(1, *[image_size] * spatial_dims)`` int64 (nearest-neighbour resampling).

    1-bit PNGs are read as 0/1; other files must hold class indices in ``[0, num_classes - 1]``.
    ``image_shape`` (the image's own shape) is what the mask must match before resampling.
    """
    name = path.name.lower()
    if name.endswith(".npy"):
        mask = np.load(path, allow_pickle=False)
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel

        mask = np.asarray(nibabel.load(path).dataobj)
    else:
        with Image.open(path) as img:
            mask = (np.asarray(img.convert("L")) > 0).astype(np.int64) if img.mode == "1" else np.asarray(img)
    mask, _ = _squeeze(mask, (1.0,) * mask.ndim, spatial_dims, "mask")
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise ValueError(f"mask shape {mask.shape} does not match its image's shape {tuple(image_shape)}")
    if not np.array_equal(mask, np.round(mask)) or mask.min() < 0 or mask.max() >= num_classes:
        raise ValueError(f"mask values must be class indices in [0, {num_classes - 1}], found {np.unique(mask)[:8]}")
    if mask.shape != (image_size,) * spatial_dims:
        index = [(np.arange(image_size) * n / image_size).astype(int) for n in mask.shape]
        mask = mask[np.ix_(*index)]
    return mask.astype(np.int64)[None]


def read_site(
    site_dir: str | Path,
    image_size: int,
    num_classes: int,
    target: str = "label",
    spatial_dims: int = 2,
    class_names: Sequence[str] = (),
    intensity: Intensity = DEFAULT_INTENSITY,
) -> SiteArrays:
    """Load and validate a site folder; raise :class:`DataError` listing every bad row.

    CT images are windowed in Hounsfield units as ``intensity`` says, see :func:`model_input`.

    ``target`` is what the task learns: the manifest column ``label`` or ``mask``, or ``boxes``
    (2D only), read from ``boxes.csv`` beside the manifest with labels that are names from
    ``class_names`` or class indices. An optional ``spacing`` column gives the pixel size in mm for
    files that do not carry it (``0.5`` for isotropic pixels, or one value per axis: ``2.5x0.7x0.7``).
    """
    site_dir = Path(site_dir)
    manifest = site_dir / MANIFEST
    if not manifest.is_file():
        raise DataError(site_dir, [DataProblem(str(manifest), "missing: a site folder needs manifest.csv")])
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            # a short row leaves its last cells empty (then checked like any empty cell); extra cells are ignored
            rows = [{k: v or "" for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(site_dir, [DataProblem(MANIFEST, f"not a UTF-8 CSV table: {err}")]) from None
    boxes = target == "boxes"
    if boxes and spatial_dims != 2:
        raise ValueError(f"box targets need 2D images (spatial_dims = 2), got spatial_dims = {spatial_dims}")
    missing = [c for c in (*REQUIRED_COLUMNS, *(() if boxes else (target,))) if c not in columns]
    if missing:
        raise DataError(site_dir, [DataProblem(MANIFEST, f"missing column(s) {missing}; found {columns}")])
    if not rows:
        raise DataError(site_dir, [DataProblem(MANIFEST, "no rows")])
    if boxes:
        return _read_box_site(site_dir, rows, image_size, num_classes, class_names, intensity)

    problems: list[DataProblem] = []
    images, targets, splits, patients, spacings = [], [], [], [], []
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
        pixel_mm = _parse_spacing(row.get("spacing") or "", spatial_dims, where, problems)
        loaded = _read_file(
            site_dir,
            row["image"],
            where,
            problems,
            lambda p, mm=pixel_mm: load_image(p, image_size, spatial_dims, mm, intensity),
        )
        if target == "mask":
            value = _read_file(
                site_dir,
                row["mask"],
                where,
                problems,
                lambda p, shape=loaded and loaded[2]: load_mask(p, image_size, num_classes, spatial_dims, shape),
            )
        if loaded is None or value is None:
            continue
        images.append(loaded[0])
        spacings.append(loaded[1])
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
        spacing=np.asarray(spacings, dtype=np.float32),
    )


def _read_box_site(
    site_dir: Path,
    rows: list[dict[str, str]],
    image_size: int,
    num_classes: int,
    class_names: Sequence[str],
    intensity: Intensity,
) -> SiteArrays:
    """The box site of :func:`read_site`: manifest rows checked here, boxes from ``boxes.csv``."""
    from medfed.data.boxes import BOXES, AnnotatedImage, load_box_site, read_box_table  # boxes imports this module

    boxes, problems = read_box_table(site_dir / BOXES, {row["image"] for row in rows})
    records, splits = [], []
    for line, row in enumerate(rows, start=2):
        where = f"{MANIFEST} line {line}"
        if row["split"] not in SPLITS:
            problems.append(DataProblem(where, f"split {row['split']!r} is not one of {list(SPLITS)}"))
        pixel_mm = _parse_spacing(row.get("spacing") or "", 2, where, problems)
        path = _read_file(site_dir, row["image"], where, problems, lambda p: p)
        if path is not None:
            image_boxes = boxes.get(row["image"], [])
            records.append(
                AnnotatedImage(path, image_boxes, row.get("patient_id") or "", source=BOXES, spacing=pixel_mm)
            )
            splits.append(row["split"])
    problems.extend(_patient_leaks(rows))
    return load_box_site(
        records, splits, image_size, class_names, num_classes, origin=site_dir, problems=problems, intensity=intensity
    )


def _read_file(
    site_dir: Path, relative: str, where: str, problems: list[DataProblem], reader: Callable[[Path], T]
) -> T | None:
    """Read one file named in the manifest, or record why it cannot be used."""
    path = site_dir / relative
    try:
        inside = path.resolve().is_relative_to(site_dir.resolve())
    except (ValueError, OSError) as err:  # e.g. a NUL byte in the name
        problems.append(DataProblem(where, f"{relative!r} is not a usable file name: {err}"))
        return None
    if not inside:
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
    """Write a site folder from arrays: manifest.csv plus 8-bit PNG images and PNG masks (2D) with a
    ``spacing`` column, or NIfTI images and masks whose header holds the spacing (3D). Box targets
    go to ``boxes.csv`` with class indices as labels, in the written image's pixels."""
    from medfed.data.boxes import BOXES, Box, write_box_table  # boxes imports this module

    site_dir = Path(site_dir)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    masks = site.target_key == "mask"
    if masks:
        (site_dir / "masks").mkdir(exist_ok=True)
    boxes = site.target_key == "boxes"
    box_rows: list[tuple[str, Box]] = []
    volumes = site.images.ndim == 5
    with (site_dir / MANIFEST).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *(() if boxes else (site.target_key,)), "split", "patient_id", "spacing"])
        for i, (image, target, split) in enumerate(zip(site.images, site.targets, site.splits, strict=True)):
            spacing = tuple(float(v) for v in site.spacing[i])
            if volumes:
                rel = f"images/{i:06d}.nii.gz"
                _save_nifti(image[0].astype(np.float32), spacing, site_dir / rel)
            else:
                rel = f"images/{i:06d}.png"
                Image.fromarray(np.clip(np.round(image[0] * 255), 0, 255).astype(np.uint8)).save(site_dir / rel)
            if masks and volumes:
                value = f"masks/{i:06d}.nii.gz"
                _save_nifti(target[0].astype(np.uint8), spacing, site_dir / value)
            elif masks:
                value = f"masks/{i:06d}.png"
                Image.fromarray(target[0].astype(np.uint8)).save(site_dir / value)
            elif boxes:
                box_rows.extend((rel, Box(int(row[4]), *map(float, row[:4]))) for row in target if row[4] >= 0)
            else:
                value = str(int(target))
            pid = site.patient_ids[i] if site.patient_ids is not None else ""
            values = () if boxes else (value,)
            writer.writerow([rel, *values, split, pid, "" if volumes else "x".join(f"{v:g}" for v in spacing)])
    if boxes:
        write_box_table(site_dir / BOXES, box_rows)
    return site_dir


def _save_nifti(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    import nibabel

    nibabel.save(nibabel.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def _parse_spacing(text: str, spatial_dims: int, where: str, problems: list[DataProblem]) -> tuple[float, ...] | None:
    if not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * spatial_dims
    if len(values) != spatial_dims or not all(np.isfinite(v) and v > 0 for v in values):
        problems.append(
            DataProblem(where, f"spacing {text!r}: expected mm > 0, one value or {spatial_dims} joined by x")
        )
        return None
    return values


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
    if array.shape == (size,) * array.ndim:
        return array.astype(np.float32)
    from monai.transforms import Resize

    mode = "area" if min(array.shape) > size else ("bilinear" if array.ndim == 2 else "trilinear")
    resized = Resize((size,) * array.ndim, mode=mode)(array[None])
    return np.asarray(resized, dtype=np.float32)[0]


def _resampled_spacing(spacing: tuple[float, ...], shape: tuple[int, ...], size: int) -> tuple[float, ...]:
    return tuple(float(s) * n / size for s, n in zip(spacing, shape, strict=True))


def _squeeze(
    array: np.ndarray, spacing: tuple[float, ...], spatial_dims: int, what: str
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Drop singleton axes (a 2D slice stored as (H, W, 1)); the rest must be ``spatial_dims`` axes."""
    keep = [axis for axis, n in enumerate(array.shape) if n > 1]
    if len(keep) != spatial_dims:
        kind = "2D image" if spatial_dims == 2 else "3D volume"
        raise ValueError(f"expected a {kind} {what} (data.spatial-dims = {spatial_dims}), got shape {array.shape}")
    return array.reshape([array.shape[a] for a in keep]), tuple(float(spacing[a]) for a in keep)
