"""Image decoding: a file (PNG/JPEG, NumPy, DICOM, DICOM-SEG, NIfTI) as the model sees it.

:class:`Preprocess` says how a scan's values are scaled (CT window) and how its grid is fitted to
the model's (resize, or reorient, resample and crop); :func:`load_image` and :func:`load_mask` read
one image and its label mask onto that grid, :func:`from_model_grid` maps per-class maps back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medfed.config import DataConfig
from medfed.data.field_of_view import (
    IGNORE,
    SquareBox,
    computed_field_of_view,
    crop_square,
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
from medfed.data.vocabulary import CT_WINDOW, DataProblem

__all__ = [
    "DEFAULT_PREPROCESS",
    "FieldOfViewCase",
    "Geometry",
    "Preprocess",
    "fit_to_model",
    "from_model_grid",
    "is_photo",
    "load_field_of_view_case",
    "load_image",
    "load_mask",
    "model_input",
    "note_rescaled",
    "read_dicom_seg",
    "scan_geometry",
]

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
    crop: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, data: DataConfig) -> Preprocess:
        """The decoding settings of a ``[data]`` section (``ct-window``, ``modality``, ``target-spacing``,
        ``orientation``, ``max-pixels`` and ``field-of-view``)."""
        return cls(
            data.ct_window,
            data.modality,
            data.target_spacing,
            data.orientation.upper(),
            data.max_pixels,
            data.field_of_view,
        )

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

    ``path`` is one file holding the ``channels`` channels
    (:func:`~medfed.data.medical_io.read_channels`: with 1, a colour photo is turned grey) or
    ``channels`` files, one channel each (a colour photo among them is turned grey), which must
    share the first file's grid. Each channel is scaled on its own (its own
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
    arrays: list[np.ndarray] = []
    fitted: list[tuple[tuple[float, ...], Geometry]] = []
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
        # MONAI's transforms take arrays as well as tensors; their annotations name only Tensor
        return np.asarray(Resize(geometry.shape, mode="nearest")(channels))  # type: ignore[arg-type]
    resampling = _resampling(len(geometry.shape), channels.shape[1], preprocess, labels=False)
    forward = resampling(_meta_tensor(np.zeros(geometry.shape, dtype=np.float32), geometry))
    from monai.data import MetaTensor

    mapped = MetaTensor(np.asarray(channels, dtype=np.float32), meta=forward.meta)
    mapped.applied_operations = forward.applied_operations
    return np.asarray(resampling.inverse(mapped).numpy())


def _meta_tensor(array: np.ndarray, geometry: Geometry) -> Any:
    from monai.data import MetaTensor

    # MetaTensor takes an array affine as well; its annotation names only Tensor
    return MetaTensor(np.ascontiguousarray(array)[None], affine=geometry.affine)  # type: ignore[arg-type]


def _resampling(spatial_dims: int, image_size: int, preprocess: Preprocess, labels: bool) -> Any:
    from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, Spacing, Transform

    if len(preprocess.spacing) != spatial_dims:
        raise ValueError(
            f"data.target-spacing {list(preprocess.spacing)} has {len(preprocess.spacing)} values "
            f"for {spatial_dims}D scans: give one per axis"
        )
    ras = (("L", "R"), ("P", "A"), ("I", "S"))  # our affines are nibabel RAS+
    steps: list[Transform] = (
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
    instances: bool = False,
) -> np.ndarray:
    """Read a label mask as ``(1, *[image_size] * spatial_dims)`` int64, on its image's model grid.

    1-bit PNGs are read as 0/1, and so is a binary mask stored as 0/255 (the usual export; with
    fewer than 256 classes 255 can be no class index), which is then appended to ``rescaled`` for
    the caller's notice; a grey mask stored as an RGB(A) PNG is read from its one grey channel. A
    DICOM Segmentation (DICOM-SEG) referencing the image's DICOM instances gives its segment
    numbers as classes; other files must hold class indices in ``[0, num_classes - 1]``. ``image``
    (the image's own geometry) is what the mask must match in shape, and in voxel size when the
    mask file states one (NIfTI, DICOM-SEG). With ``instances`` the file is an instance label image:
    one integer per object in ``[1, MAX_INSTANCE_ID]``, 0 = background (``num_classes`` unused).
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
    if instances:
        _check_instance_ids(mask)
    elif num_classes <= 255 and mask.size and mask.max() == 255 and np.isin(mask, (0, 255)).all():
        mask = (mask == 255).astype(np.int64)
        if rescaled is not None:
            rescaled.append(path)
    if not instances and (not np.array_equal(mask, np.round(mask)) or mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"mask values must be class indices in [0, {num_classes - 1}], found {np.unique(mask)[:8]}")
    geometry = image or Geometry(mask.shape, mask_spacing, np.diag([*mask_spacing, 1.0]))
    fitted, _ = fit_to_model(mask.astype(np.float32), geometry, image_size, preprocess, labels=True)
    return fitted.astype(np.int64)[None]


MAX_INSTANCE_ID = 65_535  # a 16-bit label image


def _check_instance_ids(mask: np.ndarray) -> None:
    """Refuse an instance label image that holds anything but object ids (integers 0..MAX_INSTANCE_ID)."""
    if mask.dtype.kind not in "biuf" or not mask.size:
        raise ValueError(f"an instance label image must hold integer object ids, found {mask.dtype} values")
    if not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask)):
        raise ValueError("instance ids must be integers (one per object, 0 = background), found non-integer values")
    if mask.min() < 0 or mask.max() > MAX_INSTANCE_ID:
        raise ValueError(
            f"instance ids must lie in [0, {MAX_INSTANCE_ID}] (0 = background), found {mask.min()} to {mask.max()}"
        )


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
    if field_of_view:
        with open_photo(paths[0], preprocess.max_pixels) as img:
            shape = (img.height, img.width)
        fov = read_field_of_view(field_of_view, shape, preprocess.max_pixels)
    else:
        fov = computed_field_of_view(read_photo(paths[0], preprocess.max_pixels))
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


def _mm(spacing: tuple[float, ...]) -> str:
    return " x ".join(f"{v:.4g}" for v in spacing)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


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
    resized = Resize((size,) * array.ndim, mode=mode)(array[None])  # type: ignore[arg-type]  # arrays work too
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
