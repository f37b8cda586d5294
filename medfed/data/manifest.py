"""A site folder on disk: ``manifest.csv`` plus the image files it names (design.md).

Columns: ``image`` (path relative to the folder), the target (``label``: a class index, or
``mask``: a label-mask file of the image's size, 0 = background), ``split``
(train/val/test) and optional ``patient_id`` (used only to keep a patient in one split; it never
leaves the site), ``spacing`` (mm per pixel, for files that do not state it) and ``modality``
(e.g. ``CT``, for files that do not state it: NIfTI converted from DICOM). Images may be PNG/JPEG, NumPy ``.npy``, DICOM ``.dcm`` or NIfTI ``.nii(.gz)``.
With ``data.channels`` = N > 1 an ``image`` cell names one file holding the N channels (a colour
photo for N = 3, a 4D NIfTI, a ``.npy`` with a channel axis) or N files, one per channel in order,
joined by ``;`` (``t1.nii.gz;t1c.nii.gz;t2.nii.gz;flair.nii.gz``).
Box targets (detection) have no manifest column: they sit in ``boxes.csv`` beside it
(see :mod:`medfed.data.boxes`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from PIL import Image

from medfed.data.arrays import SPLITS, SiteArrays
from medfed.data.field_of_view import (
    IGNORE,
    SquareBox,
    computed_field_of_view,
    crop_square,
    field_of_view_card,
    field_of_view_square,
    read_field_of_view,
    read_photo,
)
from medfed.data.medical_io import (
    DEFAULT_MAX_PIXELS,
    ChannelError,
    Scan,
    check_pixels,
    load_npy,
    open_nifti,
    open_photo,
    read_channels,
)

__all__ = [
    "DataError",
    "DataProblem",
    "Geometry",
    "Preprocess",
    "fit_to_model",
    "from_model_grid",
    "image_paths",
    "load_image",
    "load_mask",
    "read_site",
    "write_site",
]

MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("image", "split")
T = TypeVar("T")
CT_WINDOW = (-1000.0, 1000.0)  # Hounsfield units: air to dense bone
log = logging.getLogger("medfed.data")


@dataclass(frozen=True)
class Preprocess:
    """How a scan becomes a model input: its values (CT window) and, when asked, its grid.

    Values: CT is clipped to ``ct_window`` (Hounsfield units) and scaled to [0, 1]. ``modality``
    "auto" takes CT from the DICOM Modality tag (or the manifest's ``modality`` column); "CT" treats
    every non-photo image as CT (NIfTI CT, which has no modality tag); "other" never windows
    (percentile scaling).

    Grid: without ``spacing`` every scan is resized to the model's size, whatever its voxel size.
    With ``spacing`` (mm per axis) scans are first reoriented to ``orientation`` (3D axis codes
    such as "RAS"; "" keeps the stored order), resampled to that voxel size and then centre-cropped
    or zero-padded to the model's size, so that a millimetre is the same number of voxels at every
    site (MONAI ``Orientation``, ``Spacing``, ``ResizeWithPadOrCrop``).

    ``max_pixels`` (``data.max-pixels``) is the most pixels or voxels one file may decode to, checked
    from its header before decoding.

    ``field_of_view`` (``data.field-of-view``): "whole", "mask" or "crop", see
    :func:`load_field_of_view_case`. ``crop`` (top, left, side), for one 2D photo: the square (zero-padded where it leaves the photo)
    that is resized to the model's size instead of the whole photo, e.g. the square around a fundus
    camera's field of view (:mod:`medfed.data.field_of_view`).
    """

    ct_window: tuple[float, float] = CT_WINDOW
    modality: str = "auto"
    spacing: tuple[float, ...] = ()
    orientation: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS
    field_of_view: str = "whole"
    crop: tuple[int, int, int] = ()

    def is_ct(self, scan: Scan) -> bool:
        return scan.modality == "CT" if self.modality == "auto" else self.modality == "CT"


class Geometry(NamedTuple):
    """A scan's own grid, singleton axes dropped: shape, voxel size (mm) and voxel-to-world affine."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    source_uids: tuple[str, ...] = ()  # SOPInstanceUID per slice of a DICOM image, for DICOM-SEG masks


DEFAULT_PREPROCESS = Preprocess()
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
    path: Path | Sequence[Path],
    image_size: int,
    spatial_dims: int = 2,
    spacing: tuple[float, ...] | None = None,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
    modality: str = "",
    channels: int = 1,
) -> tuple[np.ndarray, tuple[float, ...], Geometry]:
    """Read one image (2D) or volume (3D) as ``(channels, *[image_size] * spatial_dims)`` float32 in [0, 1].

    Returns the array, its voxel size in mm after resampling and the file's own :class:`Geometry`,
    against which a mask is checked and resampled. ``spacing`` (mm per input pixel) replaces the
    file's own; a file without one (PNG) counts 1 mm per pixel. ``modality`` (e.g. "CT") stands in
    for a file that does not state its own (NIfTI). See :func:`model_input` for the values.

    ``path`` is one file holding the ``channels`` channels (:func:`read_channels`: with 1, a colour
    photo is turned grey) or ``channels`` files, one channel each (a colour photo among them is
    turned grey), which must share the first file's grid. Each channel is scaled on its own (its own
    CT window or percentiles: MR sequences differ in range); an RGB photo's three by the same 1/255.
    """
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if len(paths) > 1 and len(paths) != channels:
        raise ChannelError(
            f"{len(paths)} files ({', '.join(p.name for p in paths)}) for data.channels = {channels}: "
            f"expected {channels} file(s), one per channel, or one file holding all {channels}"
        )
    if spacing is not None and len(spacing) != spatial_dims:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values; the image has {spatial_dims} axes")
    per_file = 1 if len(paths) > 1 else channels
    arrays, fitted = [], []
    for file in paths:
        for scan in read_channels(file, per_file, spatial_dims, preprocess.max_pixels):
            if modality and not scan.modality:
                scan.modality = modality.strip().upper()
            array, fitted_spacing, geometry = model_input(
                scan, image_size, spatial_dims, is_photo(file), spacing, preprocess
            )
            if fitted and not _same_grid(geometry, fitted[0][1]):
                first = fitted[0][1]
                raise ChannelError(
                    f"{file} is {_shape(geometry.shape)} pixels of {_mm(geometry.spacing)} mm but {paths[0]}, the "
                    f"first channel, is {_shape(first.shape)} of {_mm(first.spacing)} mm: "
                    "the channels of a case must share one grid"
                )
            arrays.append(array)
            fitted.append((fitted_spacing, geometry))
    return np.concatenate(arrays), *fitted[0]


def _same_grid(a: Geometry, b: Geometry) -> bool:
    return a.shape == b.shape and np.allclose(a.spacing, b.spacing, rtol=1e-3)


def image_paths(cell: str) -> list[str]:
    """The file(s) of a manifest ``image`` cell: one, or one per channel joined by ``;``."""
    return [part.strip() for part in cell.split(";")]


def is_photo(path: Path) -> bool:
    """PNG/JPEG/BMP/TIFF: pixel values are display levels, not physical intensities."""
    return path.name.lower().endswith(PHOTO_SUFFIXES)


def model_input(
    scan: Scan,
    image_size: int,
    spatial_dims: int,
    photo: bool,
    spacing: tuple[float, ...] | None = None,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
) -> tuple[np.ndarray, tuple[float, ...], Geometry]:
    """A scan as the model sees it: ``(1, *[image_size] * spatial_dims)`` in [0, 1], its voxel size in mm
    after resampling, and the :class:`Geometry` it was resampled from.

    8-bit photos are scaled by 1/255; CT (values in Hounsfield units; see :class:`Preprocess`) is
    clipped to its window and scaled to [0, 1], so that a tissue has the same value at every site;
    anything else (MR, ...) is scaled by its 0.5-99.5 percentile range. The grid is fitted to the
    model as :func:`fit_to_model` says.
    """
    array, geometry = scan_geometry(scan, spatial_dims, spacing, "image")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or Inf pixels")
    if photo and array.max(initial=0) <= 255:
        array = array / 255.0
    elif preprocess.is_ct(scan):
        low, high = preprocess.ct_window
        array = np.clip((array - low) / (high - low), 0.0, 1.0)
    else:
        array = _normalise(array)
    fitted, fitted_spacing = fit_to_model(array.astype(np.float32), geometry, image_size, preprocess, labels=False)
    return fitted[None], fitted_spacing, geometry


def scan_geometry(
    scan: Scan, spatial_dims: int, spacing: tuple[float, ...] | None = None, what: str = "image"
) -> tuple[np.ndarray, Geometry]:
    """The scan's array with singleton axes dropped, and its :class:`Geometry`.

    ``spacing`` (the manifest's) overrides the file's voxel size and then also its orientation
    (an axis-aligned grid), since a file without its own geometry is the reason to state one.
    """
    keep = [axis for axis, n in enumerate(scan.array.shape) if n > 1]
    array, file_spacing = _squeeze(scan.array, scan.spacing, spatial_dims, what)
    if spacing is not None or spatial_dims == 2 or len(keep) != 3:
        affine = np.diag([*(spacing or file_spacing), 1.0])
    else:
        affine = np.asarray(scan.affine, dtype=np.float64)
    uids = tuple(str(ds.get("SOPInstanceUID", "")) for ds in scan.dicom or ())
    return array, Geometry(tuple(array.shape), tuple(spacing or file_spacing), affine, uids)


def fit_to_model(
    array: np.ndarray, geometry: Geometry, image_size: int, preprocess: Preprocess, labels: bool
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Put an image (or, with ``labels``, its label mask: nearest neighbour) on the model's grid.

    Returns the ``[image_size] * dims`` array and its voxel size in mm. Without
    ``preprocess.spacing``, the whole scan is resized to the grid; with it, the scan is reoriented,
    resampled to that voxel size and centre-cropped or zero-padded (see :class:`Preprocess`).
    """
    size = (image_size,) * array.ndim
    if preprocess.crop:
        array = crop_square(array, SquareBox(*preprocess.crop))
        geometry = geometry._replace(shape=array.shape)
    if not preprocess.spacing:
        if labels:
            if array.shape != size:
                index = [(np.arange(image_size) * n / image_size).astype(int) for n in array.shape]
                array = array[np.ix_(*index)]
            return array, _resampled_spacing(geometry.spacing, geometry.shape, image_size)
        return _resize(array, image_size), _resampled_spacing(geometry.spacing, geometry.shape, image_size)
    fitted = _resampling(array.ndim, image_size, preprocess, labels)(_meta_tensor(array, geometry))
    return np.asarray(fitted.numpy()[0], dtype=array.dtype), tuple(float(v) for v in preprocess.spacing)


def from_model_grid(channels: np.ndarray, geometry: Geometry, preprocess: Preprocess) -> np.ndarray:
    """Undo :func:`fit_to_model` for per-class maps ``(C, *[image_size] * dims)``: ``(C, *geometry.shape)``
    (nearest neighbour without resampling; linear through the inverse resampling otherwise)."""
    from monai.transforms import Resize

    if not preprocess.spacing:
        return np.asarray(Resize(geometry.shape, mode="nearest")(channels))
    resampling = _resampling(len(geometry.shape), channels.shape[1], preprocess, labels=False)
    forward = resampling(_meta_tensor(np.zeros(geometry.shape, dtype=np.float32), geometry))
    from monai.data import MetaTensor

    mapped = MetaTensor(np.asarray(channels, dtype=np.float32), meta=forward.meta)
    mapped.applied_operations = forward.applied_operations
    return np.asarray(resampling.inverse(mapped).numpy())


def _meta_tensor(array: np.ndarray, geometry: Geometry) -> Any:
    from monai.data import MetaTensor

    return MetaTensor(np.ascontiguousarray(array)[None], affine=geometry.affine)


def _resampling(spatial_dims: int, image_size: int, preprocess: Preprocess, labels: bool) -> Any:
    from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, Spacing

    if len(preprocess.spacing) != spatial_dims:
        raise ValueError(
            f"data.target-spacing {list(preprocess.spacing)} has {len(preprocess.spacing)} values "
            f"for {spatial_dims}D scans: give one per axis"
        )
    ras = (("L", "R"), ("P", "A"), ("I", "S"))  # our affines are nibabel RAS+
    steps = (
        [Orientation(axcodes=preprocess.orientation, labels=ras)]
        if preprocess.orientation and spatial_dims == 3
        else []
    )
    steps.append(Spacing(pixdim=preprocess.spacing, mode="nearest" if labels else "bilinear"))
    steps.append(ResizeWithPadOrCrop(spatial_size=(image_size,) * spatial_dims))
    return Compose(steps)


def load_mask(
    path: Path,
    image_size: int,
    num_classes: int,
    spatial_dims: int = 2,
    image: Geometry | None = None,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
    rescaled: list[Path] | None = None,
) -> np.ndarray:
    """Read a label mask as ``(1, *[image_size] * spatial_dims)`` int64, on its image's model grid.

    1-bit PNGs are read as 0/1, and so is a binary mask stored as 0/255 (the usual export; with
    fewer than 256 classes 255 can be no class index), which is then appended to ``rescaled`` for
    the caller's notice; a grey mask stored as an RGB(A) PNG is read from its one grey channel. A
    DICOM Segmentation (DICOM-SEG) referencing the image's DICOM instances gives its segment
    numbers as classes; other files must hold class indices in ``[0, num_classes - 1]``. ``image``
    (the image's own geometry) is what the mask must match in shape, and in voxel size when the
    mask file states one (NIfTI, DICOM-SEG).
    """
    name = path.name.lower()
    mask_spacing: tuple[float, ...] | None = None
    if name.endswith(".npy"):
        mask = load_npy(path, preprocess.max_pixels)
    elif name.endswith((".nii", ".nii.gz")):
        nifti = open_nifti(path, preprocess.max_pixels)
        mask = np.asarray(nifti.dataobj)
        mask_spacing = tuple(float(z) for z in nifti.header.get_zooms()[: mask.ndim])
    elif name.endswith(".dcm"):
        mask, mask_spacing = read_dicom_seg(path, image, preprocess.max_pixels)
    else:
        with open_photo(path, preprocess.max_pixels) as img:
            mask = (np.asarray(img.convert("L")) > 0).astype(np.int64) if img.mode == "1" else np.asarray(img)
            if img.mode in ("LA", "RGB", "RGBA"):
                mask = _grey_mask(mask[..., : 1 if img.mode == "LA" else 3])
    mask, mask_spacing = _squeeze(mask, mask_spacing or (1.0,) * mask.ndim, spatial_dims, "mask")
    if image is not None and mask.shape != tuple(image.shape):
        raise ValueError(f"mask shape {mask.shape} does not match its image's shape {tuple(image.shape)}")
    if (
        image is not None
        and (name.endswith((".nii", ".nii.gz", ".dcm")))
        and not np.allclose(mask_spacing, image.spacing, rtol=1e-3, atol=1e-4)
    ):
        raise ValueError(f"mask voxel size {_mm(mask_spacing)} mm does not match its image's {_mm(image.spacing)} mm")
    if num_classes <= 255 and mask.size and mask.max() == 255 and np.isin(mask, (0, 255)).all():
        mask = (mask == 255).astype(np.int64)
        if rescaled is not None:
            rescaled.append(path)
    if not np.array_equal(mask, np.round(mask)) or mask.min() < 0 or mask.max() >= num_classes:
        raise ValueError(f"mask values must be class indices in [0, {num_classes - 1}], found {np.unique(mask)[:8]}")
    geometry = image or Geometry(mask.shape, mask_spacing, np.diag([*mask_spacing, 1.0]))
    fitted, _ = fit_to_model(mask.astype(np.float32), geometry, image_size, preprocess, labels=True)
    return fitted.astype(np.int64)[None]


class FieldOfViewCase(NamedTuple):
    """One photo and its mask on the model's grid, the mask :data:`~medfed.data.field_of_view.IGNORE`
    outside the field of view, and the field of view's diameter in the photo's pixels."""

    image: np.ndarray
    spacing: tuple[float, ...]
    mask: np.ndarray
    diameter: int


def load_field_of_view_case(
    image: Path | Sequence[Path],
    mask: Path,
    field_of_view: Path | None,
    image_size: int,
    num_classes: int,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
    channels: int = 1,
    rescaled: list[Path] | None = None,
) -> FieldOfViewCase:
    """A 2D photo and its mask with the field of view marked (``data.field-of-view``): read from
    ``field_of_view`` (a mask file, non-zero inside) or found in the photo
    (:func:`~medfed.data.field_of_view.computed_field_of_view`). With ``preprocess.field_of_view``
    "crop" the square around the field of view, not the whole photo, is resized to ``image_size``:
    every site's field of view then spans the model's width, one scale for all cameras."""
    paths = [Path(image)] if isinstance(image, str | Path) else [Path(p) for p in image]
    pixels = None if field_of_view else read_photo(paths[0], preprocess.max_pixels)
    if pixels is not None:
        fov = computed_field_of_view(pixels)
    else:
        with open_photo(paths[0], preprocess.max_pixels) as img:
            shape = (img.height, img.width)
        fov = read_field_of_view(field_of_view, shape, preprocess.max_pixels)
    box = field_of_view_square(fov)
    if preprocess.field_of_view == "crop":
        preprocess = dataclasses.replace(preprocess, crop=tuple(box))
    array, spacing, geometry = load_image(paths, image_size, 2, preprocess=preprocess, channels=channels)
    labels = load_mask(mask, image_size, num_classes, 2, geometry, preprocess, rescaled)
    inside, _ = fit_to_model(fov.astype(np.float32), geometry, image_size, preprocess, labels=True)
    labels[0][inside == 0] = IGNORE
    return FieldOfViewCase(array, spacing, labels, box.side)


def _grey_mask(pixels: np.ndarray) -> np.ndarray:
    """A mask saved as a colour image ``(H, W, C)``: its one channel when all C are equal, else ValueError."""
    if not (pixels == pixels[..., :1]).all():
        raise ValueError("mask is a colour image whose channels differ: expected class indices in one grey channel")
    return pixels[..., 0]


def read_dicom_seg(
    path: Path, image: Geometry | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[float, ...]]:
    """A DICOM-SEG's segment numbers on the grid of the DICOM image it references (slice order of ``image``);
    its frames (NumberOfFrames x Rows x Columns) are checked against ``max_pixels`` before decoding."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        frames = (int(seg.get("NumberOfFrames") or 1), int(seg.Rows), int(seg.Columns))
    except Exception as err:  # noqa: BLE001 - pydicom/highdicom raise many types for non-SEG or broken files
        raise ValueError(f"not a readable DICOM Segmentation (DICOM-SEG): {err}") from None
    check_pixels(path, frames, max_pixels)
    if image is None or not image.source_uids or not all(image.source_uids):
        raise ValueError("a DICOM-SEG mask is read onto the DICOM image it references, which is missing or not DICOM")
    if len(image.source_uids) == 1 and len(image.shape) == 3:
        raise ValueError("DICOM-SEG masks of multi-frame images are not supported: give the mask as NIfTI")
    referenced = {sop for _, _, sop in seg.get_source_image_uids()}
    if not referenced & set(image.source_uids):
        raise ValueError("DICOM-SEG does not fit its image: it references none of the image's DICOM instances")
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(image.source_uids),
            combine_segments=True,
            assert_missing_frames_are_empty=True,
            skip_overlap_checks=False,
        )
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"DICOM-SEG does not fit its image: {err}") from None
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    row_col = tuple(float(v) for v in measures.PixelSpacing)
    slice_step = image.spacing[0] if len(image.shape) == 3 else 1.0
    return np.asarray(pixels), (slice_step, *row_col)


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A UTF-8 CSV table (a BOM is allowed) as its columns and rows; :class:`DataError` naming the file if unreadable."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path.parent, [DataProblem(path.name, f"not a readable CSV table: {err}")]) from None


def _mm(spacing: tuple[float, ...]) -> str:
    return " x ".join(f"{v:.4g}" for v in spacing)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def read_site(
    site_dir: str | Path,
    image_size: int,
    num_classes: int,
    target: str = "label",
    spatial_dims: int = 2,
    class_names: Sequence[str] = (),
    preprocess: Preprocess = DEFAULT_PREPROCESS,
    channels: int = 1,
    notices: list[DataProblem] | None = None,
) -> SiteArrays:
    """Load and validate a site folder; raise :class:`DataError` listing every bad row.

    CT images are windowed in Hounsfield units as ``preprocess`` says, see :func:`model_input`.
    Images are ``(N, channels, *spatial)``: an ``image`` cell names one file holding ``channels``
    channels or ``channels`` files joined by ``;`` (see :func:`load_image`); a row whose images hold
    another number is an error. Masks stored as 0/255 are read as 0/1 with one warning per site.

    ``target`` is what the task learns: the manifest column ``label`` or ``mask``, or ``boxes``
    (2D only), read from ``boxes.csv`` beside the manifest with labels that are names from
    ``class_names`` or class indices. An optional ``spacing`` column gives the pixel size in mm for
    files that do not carry it (``0.5`` for isotropic pixels, or one value per axis: ``2.5x0.7x0.7``).

    What is read but worth a look (dropped boxes, masks read as 0/1) is appended to ``notices``
    naming the files, for the site's operator (the pre-flight check); without it, it is logged
    counted only, since training and evaluation logs reach a simulation's coordinator.
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
        return _read_box_site(site_dir, rows, image_size, num_classes, class_names, preprocess, channels, notices)

    problems: list[DataProblem] = []
    images, targets, splits, patients, spacings, diameters = [], [], [], [], [], []
    rescaled: list[Path] = []
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
        stated_modality = row.get("modality") or ""
        if target == "mask" and preprocess.field_of_view != "whole":  # image and mask read together
            n = len(image_paths(row["image"]))  # image file(s), then the mask, then the field of view if given
            files = [*image_paths(row["image"]), row["mask"], *([row["fov"]] if row.get("fov") else [])]
            case = _read_files(site_dir, files, where, problems, lambda paths, n=n: load_field_of_view_case(
                paths[:n], paths[n], paths[n + 1] if len(paths) > n + 1 else None, image_size, num_classes,
                preprocess, channels, rescaled))  # fmt: skip
            loaded, value = (None, None) if case is None else ((case.image, case.spacing), case.mask)
            if case is not None:
                diameters.append(case.diameter)
        else:
            loaded = _read_files(
                site_dir,
                image_paths(row["image"]),
                where,
                problems,
                lambda paths, mm=pixel_mm, modality=stated_modality: load_image(
                    paths, image_size, spatial_dims, mm, preprocess, modality, channels
                ),
            )
            if target == "mask":
                value = _read_file(
                    site_dir,
                    row["mask"],
                    where,
                    problems,
                    lambda p, geometry=loaded and loaded[2]: load_mask(
                        p, image_size, num_classes, spatial_dims, geometry, preprocess, rescaled
                    ),
                )
        if loaded is None or value is None:
            continue
        images.append(loaded[0])
        spacings.append(loaded[1])
        targets.append(value)
        splits.append(row["split"])
        patients.append(row.get("patient_id") or "")
    problems.extend(_patient_leaks(rows))
    problems.extend(_repeated_images(site_dir, rows, images if len(images) == len(rows) else []))
    if problems:
        raise DataError(site_dir, problems)
    note_rescaled(site_dir, rescaled, len(targets), notices)
    card = ()
    if diameters:
        card = field_of_view_card(diameters, image_size, preprocess.field_of_view, given="fov" in columns)
    return SiteArrays(
        np.stack(images).astype(np.float32),
        np.asarray(targets, dtype=np.int64),
        np.asarray(splits, dtype=str),
        np.asarray(patients, dtype=str),
        target_key=target,
        spacing=np.asarray(spacings, dtype=np.float32),
        card=card,
    )


def note_rescaled(origin: Path, rescaled: list[Path], masks: int, notices: list[DataProblem] | None = None) -> None:
    """Say once that masks stored as 0/255 were read as 0/1: in ``notices`` naming ``origin`` and an
    example file (the pre-flight check lists it), else as a warning that names no file."""
    if not rescaled:
        return
    said = f"{len(rescaled)} of {masks} masks hold only the values 0 and 255: read as 0/1 (255 = class 1)"
    if notices is None:
        log.warning("%s", said)
    else:
        notices.append(DataProblem(str(origin), f"{said}, e.g. {rescaled[0].name}"))


def _read_box_site(
    site_dir: Path,
    rows: list[dict[str, str]],
    image_size: int,
    num_classes: int,
    class_names: Sequence[str],
    preprocess: Preprocess,
    channels: int,
    notices: list[DataProblem] | None,
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
    problems.extend(_repeated_images(site_dir, rows, []))
    return load_box_site(
        records,
        splits,
        image_size,
        class_names,
        num_classes,
        origin=site_dir,
        problems=problems,
        preprocess=preprocess,
        channels=channels,
        notices=notices,
    )


def _read_file(
    site_dir: Path, relative: str, where: str, problems: list[DataProblem], reader: Callable[[Path], T]
) -> T | None:
    """Read one file named in the manifest, or record why it cannot be used."""
    if ";" in relative:
        problems.append(DataProblem(where, f"{relative} names several files joined by ';': expected one file here"))
        return None
    return _read_files(site_dir, [relative], where, problems, lambda paths: reader(paths[0]))


def _read_files(
    site_dir: Path, relatives: list[str], where: str, problems: list[DataProblem], reader: Callable[[list[Path]], T]
) -> T | None:
    """Read the file(s) of one manifest cell together, or record why they cannot be used."""
    paths = []
    for relative in relatives:
        path = site_dir / relative
        try:
            inside = path.resolve().is_relative_to(site_dir.resolve())
        except (ValueError, OSError) as err:  # e.g. a NUL byte in the name
            problems.append(DataProblem(where, f"{relative!r} is not a usable file name: {err}"))
            return None
        if not inside:
            problems.append(DataProblem(where, f"{relative} leaves the site folder"))
            return None
        if not (relative and (path.is_file() or path.is_dir())):  # a folder is a DICOM series
            problems.append(DataProblem(where, f"{relative or 'an empty path'}: file not found"))
            return None
        paths.append(path)
    cell = ";".join(relatives)
    try:
        return reader(paths)
    except ChannelError as err:
        problems.append(DataProblem(where, str(err)))
    except Exception as err:  # noqa: BLE001 - any reader failure is reported per file
        problems.append(DataProblem(where, f"{cell} unreadable: {err}"))
    return None


def write_site(site_dir: str | Path, site: SiteArrays) -> Path:
    """Write a site folder from arrays: manifest.csv plus 8-bit PNG images and PNG masks (2D) with a
    ``spacing`` column, or NIfTI images and masks whose header holds the spacing (3D). Box targets
    go to ``boxes.csv`` with class indices as labels, in the written image's pixels. Several image
    channels become an RGB PNG (3 channels, 2D), one PNG per channel joined by ``;`` (other counts,
    2D) or a 4D NIfTI with the channels last (3D), as :func:`read_site` reads them back. 2D masks
    with pixels outside a field of view (:data:`~medfed.data.field_of_view.IGNORE`) get a ``fov``
    column naming a mask of the field of view (255 inside), read back with ``data.field-of-view``."""
    from medfed.data.boxes import BOXES, Box, write_box_table  # boxes imports this module

    site_dir = Path(site_dir)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    masks = site.target_key == "mask"
    if masks:
        (site_dir / "masks").mkdir(exist_ok=True)
    boxes = site.target_key == "boxes"
    box_rows: list[tuple[str, Box]] = []
    volumes = site.images.ndim == 5
    with_fov = masks and not volumes and bool((site.targets == IGNORE).any())  # a field of view: a fov column
    fov_cells: list[str] = []
    if with_fov:
        (site_dir / "fov").mkdir(exist_ok=True)
    with (site_dir / MANIFEST).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *(() if boxes else (site.target_key,)), "split", "patient_id", "spacing",
                         *(("fov",) if with_fov else ())])  # fmt: skip
        for i, (image, target, split) in enumerate(zip(site.images, site.targets, site.splits, strict=True)):
            spacing = tuple(float(v) for v in site.spacing[i])
            stored = image[0] if len(image) == 1 else np.moveaxis(image, 0, -1)  # channels last: RGB, 4D NIfTI
            if volumes:
                rel = f"images/{i:06d}.nii.gz"
                _save_nifti(stored.astype(np.float32), spacing, site_dir / rel)
            elif len(image) in (1, 3):
                rel = f"images/{i:06d}.png"
                Image.fromarray(_png_pixels(stored)).save(site_dir / rel)
            else:
                rel = ";".join(f"images/{i:06d}_{k}.png" for k in range(len(image)))
                for k, channel in enumerate(image):
                    Image.fromarray(_png_pixels(channel)).save(site_dir / f"images/{i:06d}_{k}.png")
            if masks and volumes:
                value = f"masks/{i:06d}.nii.gz"
                _save_nifti(target[0].astype(np.uint8), spacing, site_dir / value)
            elif masks:
                value = f"masks/{i:06d}.png"
                Image.fromarray(np.maximum(target[0], 0).astype(np.uint8)).save(site_dir / value)
                if with_fov:
                    fov_cells.append(f"fov/{i:06d}.png")
                    Image.fromarray(np.where(target[0] == IGNORE, 0, 255).astype(np.uint8)).save(
                        site_dir / fov_cells[-1]
                    )
            elif boxes:
                box_rows.extend((rel, Box(int(row[4]), *map(float, row[:4]))) for row in target if row[4] >= 0)
            else:
                value = str(int(target))
            pid = site.patient_ids[i] if site.patient_ids is not None else ""
            values = () if boxes else (value,)
            writer.writerow([rel, *values, split, pid, "" if volumes else "x".join(f"{v:g}" for v in spacing),
                             *(fov_cells[-1:] if with_fov else ())])  # fmt: skip
    if boxes:
        write_box_table(site_dir / BOXES, box_rows)
    return site_dir


def _png_pixels(image: np.ndarray) -> np.ndarray:
    """[0, 1] values as 8-bit pixels."""
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


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


def _repeated_images(site_dir: Path, rows: list[dict[str, str]], images: Sequence[np.ndarray]) -> list[DataProblem]:
    """Rows that would count one image as several privacy units: the same file on several rows (any
    split), or, in the train split, files holding the same bytes that the manifest makes into
    different model inputs (its ``spacing`` or ``modality`` cells; ``images``: the model input of
    every row, when all were read). One problem per repeated image, naming its lines. Copies read
    alike are one privacy unit (:meth:`SiteArrays.privacy_units`), not an error."""
    same_file: dict[tuple[Path, ...], list[int]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            paths = tuple((site_dir / p).resolve() for p in image_paths(row["image"]))
        except (OSError, ValueError):  # an unusable name: the reader reports it
            continue
        same_file.setdefault(paths, []).append(line)
    repeated = [(lines, "is listed again on line(s) {others}") for lines in same_file.values() if len(lines) > 1]
    train = {lines[0]: paths for paths, lines in same_file.items() if rows[lines[0] - 2]["split"] == "train"}
    try:
        files = {line: paths for line, paths in train.items() if images and all(p.is_file() for p in paths)}
        sizes = {line: tuple(p.stat().st_size for p in paths) for line, paths in files.items()}
        same_size = [line for lines in _groups(sizes) for line in lines]  # only these can hold the same bytes
        same_bytes = _groups({line: _digest(p.read_bytes() for p in files[line]) for line in same_size})
    except OSError:  # an unreadable file: the reader reports it
        same_bytes = []
    repeated += [
        (
            lines,
            "holds the same bytes as line(s) {others} in the train split, read differently (spacing or modality cells)",
        )
        for lines in same_bytes
        if not all(np.array_equal(images[lines[0] - 2], images[line - 2]) for line in lines[1:])
    ]
    problems = []
    for lines, how in repeated:
        others = ", ".join(str(n) for n in lines[1:11]) + (f" and {len(lines) - 11} more" if len(lines) > 11 else "")
        problems.append(
            DataProblem(
                f"{MANIFEST} line {lines[0]}",
                f"{rows[lines[0] - 2]['image']} {how.format(others=others)}: each copy would count as one more "
                "privacy unit and weaken the stated ε; list each image once",
            )
        )
    return problems


def _groups(keys: dict[int, Any]) -> list[list[int]]:
    """The lines that share a key, in groups of two or more (lines in order)."""
    groups: dict[Any, list[int]] = {}
    for line, key in sorted(keys.items()):
        groups.setdefault(key, []).append(line)
    return [lines for lines in groups.values() if len(lines) > 1]


def _digest(chunks: Iterable[Any]) -> bytes:
    """A digest of the bytes of ``chunks`` (bytes or contiguous arrays)."""
    digest = hashlib.blake2b()
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


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
