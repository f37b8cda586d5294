"""Read medical images with their geometry; write masks that open aligned in 3D Slicer and ITK-SNAP.

`medfed predict` and the data loaders need more than pixels: a predicted mask is only useful to a radiologist
if it overlays the source scan in a viewer. Every reader here therefore returns a :class:`Scan` holding the
intensities *and* a nibabel-style affine (voxel index in array-axis order -> RAS+ world millimetres), and the
writers reuse that affine (NIfTI) or the source DICOM headers (DICOM-SEG) so the mask lands on the same voxels.

Axis conventions:

- DICOM series folder: ``array[slice, row, col]``, slices sorted along the slice normal
  (row direction x column direction from ImageOrientationPatient); ``spacing = (slice step, row spacing, col spacing)``.
- Single DICOM file: ``array[row, col]``; ``spacing = PixelSpacing`` (row spacing, col spacing).
- NIfTI: the array exactly as stored (i, j, k) with ``img.affine``; ``spacing`` = header zooms.
- PNG/JPEG/BMP/TIFF: ``array[row, col]`` with 1 mm pixels and the geometry ITK (and so Slicer and ITK-SNAP) gives
  such a file: column index -> LPS +x, row index -> LPS +y, origin 0. A NIfTI mask written for it overlays the
  image when both are loaded into those viewers.
- ``.npy``: the array as stored, identity affine, 1 mm spacing (no viewer has a convention for it).

DICOM geometry is in LPS; it is converted to RAS by negating x and y.
"""

from __future__ import annotations

import datetime
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from nibabel.openers import ImageOpener
from nibabel.spatialimages import SpatialImage
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from medfed.config import DataConfig

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ChannelError",
    "ImageTooLarge",
    "Scan",
    "check_pixels",
    "file_stem",
    "load_npy",
    "open_nifti",
    "open_photo",
    "read_channels",
    "read_dicom_series",
    "read_scan",
    "write_dicom_seg",
    "write_dicom_series",
    "write_nifti",
    "write_nifti_mask",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EXPECTED_FORMATS = "expected PNG/JPEG/BMP/TIFF, .npy, .nii(.gz), .dcm or a DICOM series folder"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Geometry of a 2D image without orientation (PNG, or DICOM lacking ImageOrientationPatient): row index -> LPS +y,
# column index -> LPS +x, as ITK reads such files.
DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
GREY_BANDS = {"1", "L", "I", "F", "A", "a"}  # PIL bands of grey photos, with or without alpha
ONE_FILE_PER_CHANNEL = "or give one file per channel, joined by ';' in the manifest's image cell"
T = TypeVar("T")
DEFAULT_MAX_PIXELS = DataConfig.max_pixels  # data.max-pixels: the voxels one file may decode to


class ChannelError(ValueError):
    """A file holds another number of image channels than ``data.channels`` asks for."""


class ImageTooLarge(ValueError):
    """A file would decode to more pixels than ``data.max-pixels`` allows (found from its header,
    before decoding: a small compressed file can claim gigabytes)."""


def check_pixels(path: str | Path, shape: Sequence[int], max_pixels: int) -> None:
    """Raise :class:`ImageTooLarge` naming ``path`` when ``shape`` (as its header states it) holds
    more than ``max_pixels`` pixels or voxels."""
    count = math.prod(max(int(n), 0) for n in shape)
    if count > max_pixels:
        raise ImageTooLarge(
            f"{path} is {'x'.join(str(int(n)) for n in shape)} = {count:,} pixels by its header, more than "
            f"data.max-pixels = {max_pixels:,}: refused before decoding (raise data.max-pixels for genuine large scans)"
        )


@dataclass
class Scan:
    """One image or volume with its geometry.

    ``affine`` maps a voxel index in array-axis order to RAS+ world millimetres (nibabel convention);
    ``spacing`` is the millimetres per array axis. ``dicom`` holds the source DICOM headers in array order
    (slice order for a series) with Pixel Data removed (the pixels are in ``array``); None if not DICOM.
    ``modality`` is the DICOM Modality (``CT``, ``MR``, ...), "" where the file does not say.
    """

    name: str
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    dicom: list[pydicom.Dataset] | None = None
    modality: str = ""


def read_scan(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Scan:
    """Read an image file, a NIfTI volume, a DICOM file or a DICOM series folder into a :class:`Scan`.

    Raises ValueError naming the file and what was expected when the input cannot be read, and
    :class:`ImageTooLarge` when its header states more than ``max_pixels`` pixels (checked before
    decoding). Voxel sizes that are not finite and > 0 are refused naming the header field.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path, max_pixels)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {EXPECTED_FORMATS}")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _read_image(path, max_pixels)
    if suffix == ".npy":
        return _read_npy(path, max_pixels)
    if suffix == ".nii" or path.name.lower().endswith(".nii.gz"):
        return _read_nifti(path, max_pixels)
    if suffix == ".dcm":
        return _read_dicom_file(path, max_pixels=max_pixels)
    raise ValueError(f"unsupported format {suffix or '(no extension)'} of {path}: {EXPECTED_FORMATS}")


def read_channels(
    path: str | Path, channels: int, spatial_dims: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Scan]:
    """The ``channels`` image channels of one file, one :class:`Scan` each, all on the file's grid.

    ``channels = 1`` is :func:`read_scan` (a colour photo is turned grey). Otherwise a colour photo
    gives its R, G and B (``channels = 3``; alpha is dropped), a NIfTI file a 4th axis of
    ``channels`` volumes (channel-last, as the Medical Segmentation Decathlon stores BraTS), a
    ``.npy`` array ``spatial_dims`` + 1 axes with ``channels`` first (else last). Any other file
    (DICOM, a grey photo, a plain 2D/3D array) holds one channel. Raises :class:`ChannelError`
    naming the file when it holds another number of channels, :class:`ImageTooLarge` as
    :func:`read_scan` does.
    """
    path = Path(path)
    if channels == 1:
        return [read_scan(path, max_pixels)]
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        raise ChannelError(
            f"{path} is DICOM, 1 channel: data.channels = {channels} expects {channels}, {ONE_FILE_PER_CHANNEL}"
        )
    if not path.is_file() or not name.endswith((*IMAGE_SUFFIXES, ".npy", ".nii", ".nii.gz")):
        read_scan(path, max_pixels)  # raises: a missing file or an unknown format
    if name.endswith(IMAGE_SUFFIXES):
        array = _photo_pixels(path, channels, max_pixels)
        affine = _plane_affine(DEFAULT_ORIENTATION, (0.0, 0.0, 0.0), (1.0, 1.0), 1.0)
        return [Scan(file_stem(path), array[..., k], affine, (1.0, 1.0)) for k in range(channels)]
    if name.endswith(".npy"):
        array = _load_npy(path, max_pixels)
        shape = tuple(n for n in array.shape if n > 1)
        if len(shape) == spatial_dims + 1 and channels in (shape[0], shape[-1]):
            array = np.moveaxis(array.reshape(shape), 0 if shape[0] == channels else -1, 0)
            return [Scan(file_stem(path), a, np.eye(4), (1.0,) * spatial_dims) for a in array]
        raise ChannelError(
            f"{path} holds an array of shape {array.shape}: data.channels = {channels} expects {channels} "
            f"{'images' if spatial_dims == 2 else 'volumes'} along its first or last axis, {ONE_FILE_PER_CHANNEL}"
        )
    img, array = _load_nifti(path, max_pixels)
    if array.ndim == 4 and array.shape[3] == channels:
        spacing = _nifti_spacing(img, path, array.shape[:3])
        affine = np.asarray(img.affine, dtype=np.float64)
        return [Scan(file_stem(path), array[..., k], affine, spacing) for k in range(channels)]
    raise ChannelError(
        f"{path} holds an array of shape {array.shape}: data.channels = {channels} expects {channels} volumes "
        f"along a 4th axis, {ONE_FILE_PER_CHANNEL}"
    )


def write_nifti_mask(mask: np.ndarray, scan: Scan, path: str | Path) -> Path:
    """Write an integer label map as a NIfTI file aligned with ``scan`` (qform and sform = ``scan.affine``, code 1).

    The mask must have exactly ``scan.array.shape``. It is stored as uint8, or uint16 when labels exceed 255.
    A 2D mask is written as a 3D volume with a singleton last axis, which is what NIfTI tools expect.
    """
    labels = _check_mask(mask, scan)
    return write_nifti(labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16), scan.affine, path)


def write_nifti(data: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``data`` with ``affine`` as qform and sform (code 1, millimetres); 2D data gets a singleton last axis."""
    if data.ndim == 2:
        data = data[..., np.newaxis]
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path = Path(path)
    nib.save(img, path)
    return path


def write_dicom_seg(
    mask: np.ndarray,
    scan: Scan,
    path: str | Path,
    segment_names: dict[int, str],
    *,
    algorithm: str = "medfed",
    version: str = "0.1",
) -> Path:
    """Write an integer label map as a BINARY DICOM Segmentation referencing the scan's source DICOM images.

    ``segment_names`` maps each label value to its segment label; every listed label becomes a segment, present
    in the mask or not. DICOM requires BINARY segments numbered 1..N, so labels are numbered in ascending order
    (labels 1..N keep their values). Segments are described as category and type "Tissue" (the generic
    terminology 3D Slicer also starts from), created by an AUTOMATIC artificial-intelligence algorithm named
    ``algorithm`` at ``version``. Frames without any segmented pixel are omitted (highdicom's default; an
    all-empty mask keeps its frames). The new series is numbered the source SeriesNumber + 1000.
    """
    if scan.dicom is None:
        raise ValueError(f"DICOM-SEG needs a DICOM source series, but scan {scan.name!r} was not read from DICOM")
    labels = _check_mask(mask, scan)
    if not segment_names:
        raise ValueError("segment_names is empty: expected at least one {label value: name}")
    if min(segment_names) < 1:
        raise ValueError(f"segment_names has label {min(segment_names)}: expected labels >= 1 (0 is background)")
    undescribed = sorted(set(np.unique(labels).tolist()) - set(segment_names) - {0})
    if undescribed:
        raise ValueError(f"mask holds labels {undescribed} that are missing from segment_names {segment_names}")

    ordered = sorted(segment_names)
    to_segment = np.zeros(max(ordered) + 1, dtype=np.uint16)
    to_segment[ordered] = np.arange(1, len(ordered) + 1)
    pixels = to_segment[labels]
    if len(ordered) <= 255:
        pixels = pixels.astype(np.uint8)

    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.DCM.ArtificialIntelligence, version=version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment_names[label],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
        )
        for number, label in enumerate(ordered, start=1)
    ]
    source = scan.dicom[0]
    seg = hd.seg.Segmentation(
        source_images=scan.dicom,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(source.get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medfed",
        manufacturer_model_name=algorithm,
        software_versions=version,
        device_serial_number="0",
        series_description=f"{algorithm} segmentation",
    )
    path = Path(path)
    seg.save_as(path)
    return path


def write_dicom_series(
    volume: np.ndarray,
    folder: str | Path,
    spacing: tuple[float, float, float] = (2.0, 0.7, 0.7),
    *,
    modality: str = "CT",
) -> list[Path]:
    """Write a synthetic ("PHANTOM" patient) DICOM series, one file per slice of an int16 (slices, rows, cols) volume.

    ``spacing`` is (slice step, row spacing, col spacing) in mm. Slices are axial (ImageOrientationPatient
    [1,0,0,0,1,0]), centred in x/y and stepping along +z from 0; values are stored as-is (RescaleSlope 1,
    RescaleIntercept 0 for CT). ``modality`` is "CT" (CT Image Storage) or "MR" (MR Image Storage). The headers
    carry what highdicom needs of source images. Returns the file paths in slice order.
    """
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality {modality!r} is not supported: expected one of {sorted(SOP_CLASSES)}")
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype != np.int16:
        raise ValueError(f"volume must be an int16 (slices, rows, cols) array, got {volume.dtype} {volume.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slices, rows, cols = volume.shape
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    origin_x, origin_y = -cols * spacing[2] / 2, -rows * spacing[1] / 2

    paths = []
    for k in range(slices):
        ds = pydicom.Dataset()
        ds.SOPClassUID = SOP_CLASSES[modality]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = "PHANTOM^"  # family name only; the caret keeps it a well-formed person name
        ds.PatientID = "PHANTOM"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyID = "1"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = "medfed synthetic phantom"
        ds.Manufacturer = "medfed"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(origin_x), _ds(origin_y), _ds(k * spacing[0])]
        ds.ImageOrientationPatient = list(DEFAULT_ORIENTATION)
        ds.SliceLocation = _ds(k * spacing[0])
        ds.SliceThickness = _ds(spacing[0])
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
        if modality == "CT":
            ds.KVP = ""
            ds.AcquisitionNumber = 1
            ds.RescaleSlope = 1
            ds.RescaleIntercept = 0
            ds.RescaleType = "HU"
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = ""
            ds.EchoTime = ""
            ds.EchoTrainLength = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(volume[k]).astype("<i2").tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _check_mask(mask: np.ndarray, scan: Scan) -> np.ndarray:
    """Return ``mask`` as a non-negative integer array with the scan's shape, or raise ValueError."""
    mask = np.asarray(mask)
    if mask.shape != scan.array.shape:
        raise ValueError(f"mask shape {mask.shape} does not match scan {scan.name!r} shape {scan.array.shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be an integer label map, got dtype {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"mask labels must lie in 0..65535, got {mask.min()}..{mask.max()}")
    return mask


def _read_image(path: Path, max_pixels: int) -> Scan:
    affine = _plane_affine(DEFAULT_ORIENTATION, (0.0, 0.0, 0.0), (1.0, 1.0), 1.0)
    return Scan(name=file_stem(path), array=_photo_pixels(path, 1, max_pixels), affine=affine, spacing=(1.0, 1.0))


@contextmanager
def open_photo(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """A PNG/JPEG/BMP/TIFF opened lazily, its size checked against ``max_pixels`` before any
    decoding; ValueError naming the file when it is not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # data.max-pixels decides
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(
            f"{path} is refused before decoding, more pixels than data.max-pixels = {max_pixels:,} and than PIL "
            f"allows: {err}"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not a readable PNG/JPEG/BMP/TIFF image: {err}") from None
    with img:
        check_pixels(path, (img.height, img.width), max_pixels)
        yield img


def _photo_pixels(path: Path, channels: int, max_pixels: int) -> np.ndarray:
    """A photo's pixels: ``(H, W)`` for ``channels = 1`` (colour turned grey, 16-bit grey kept), else
    ``(H, W, 3)`` RGB from a colour photo; :class:`ChannelError` when the photo has another count."""
    with open_photo(path, max_pixels) as img:
        frames, grey = _decoded(path, lambda: (getattr(img, "n_frames", 1), set(img.getbands()) <= GREY_BANDS))
        if frames > 1:
            raise ValueError(f"{path} holds {frames} frames: expected a single 2D image")
        if channels == 1:
            keeps_values = img.mode in ("L", "I", "F") or img.mode.startswith("I;16")
            return _decoded(path, lambda: np.asarray(img if keeps_values else img.convert("L"), dtype=np.float32))
        if channels != (1 if grey else 3):
            found = "1 channel (grey)" if grey else "3 channels (RGB)"
            raise ChannelError(
                f"{path} has {found}: data.channels = {channels} expects {channels}"
                + ("" if channels == 3 else f", {ONE_FILE_PER_CHANNEL}")
            )
        return _decoded(path, lambda: np.asarray(img.convert("RGB"), dtype=np.float32))


def _decoded(path: Path, decode: Callable[[], T]) -> T:
    """``decode()`` of a photo, any decoder failure a ValueError naming the file."""
    try:
        return decode()
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types on broken data
        raise ValueError(f"{path} is not a readable PNG/JPEG/BMP/TIFF image: {err}") from None


def _read_npy(path: Path, max_pixels: int) -> Scan:
    array = _load_npy(path, max_pixels)
    if array.ndim not in (2, 3):
        raise ValueError(f"{path} holds an array of shape {array.shape}: expected a numeric 2D or 3D array")
    return Scan(name=file_stem(path), array=array, affine=np.eye(4), spacing=(1.0,) * array.ndim)


def _load_npy(path: Path, max_pixels: int) -> np.ndarray:
    """A ``.npy`` file's numeric (or boolean) array as float32."""
    return load_npy(path, max_pixels).astype(np.float32)


def load_npy(path: Path, max_pixels: int) -> np.ndarray:
    """A ``.npy`` file's numeric (or boolean) array as stored; its header (shape, dtype) is checked
    before the data is read: ValueError naming the file for another dtype (never unpickled) and
    :class:`ImageTooLarge` for more than ``max_pixels`` values."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise ValueError(f"{path} is not a readable .npy array: {err}") from None
    real = np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)
    if not (real or dtype == np.bool_):
        raise ValueError(f"{path} holds a {dtype} array of shape {shape}: expected a numeric array")
    check_pixels(path, shape, max_pixels)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy array: {err}") from None


def _read_nifti(path: Path, max_pixels: int) -> Scan:
    img, array = _load_nifti(path, max_pixels)
    if array.ndim not in (2, 3):
        raise ValueError(f"{path} holds an array of shape {img.shape}: expected a 2D or 3D NIfTI image")
    spacing = _nifti_spacing(img, path, array.shape)
    return Scan(name=file_stem(path), array=array, affine=np.asarray(img.affine, dtype=np.float64), spacing=spacing)


def open_nifti(path: Path, max_pixels: int) -> Any:
    """A NIfTI image with its header read and checked (shape against ``max_pixels``, a finite
    affine), its data not yet decoded."""
    try:
        img = cast(SpatialImage, nib.load(path))  # a NIfTI file loads as a Nifti1Image or Nifti2Image
        shape, affine, dtype = img.shape, img.affine, img.get_data_dtype()
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib/gzip errors, ...)
        raise ValueError(f"{path} is not a readable NIfTI file: {err}") from None
    check_pixels(path, shape, max_pixels)
    if dtype.kind not in "biuf":
        raise ValueError(f"{path} holds {dtype} voxels: expected real numbers (not complex, RGB or text)")
    if affine is None or not np.isfinite(affine).all():
        raise ValueError(f"{path}: its NIfTI header's qform/sform affine is not finite: expected a voxel-to-mm mapping")
    return img


def _load_nifti(path: Path, max_pixels: int) -> tuple[Any, np.ndarray]:
    """A NIfTI image and its float32 array, trailing axes of length 1 dropped."""
    img = open_nifti(path, max_pixels)
    try:
        array = img.get_fdata(dtype=np.float32)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib/gzip errors, ...)
        raise ValueError(f"{path} is not a readable NIfTI file: {err}") from None
    while array.ndim > 3 and array.shape[-1] == 1:  # a trailing time/vector axis of 1 carries no geometry
        array = array[..., 0]
    return img, array


def _nifti_spacing(img: Any, path: Path, shape: tuple[int, ...]) -> tuple[float, ...]:
    """The voxel size (mm) of each of ``shape``'s axes from the header's pixdim as written (nibabel
    would silently turn 0 into 1 and -2 into 2); an axis of length 1 measures nothing and may hold any."""
    with ImageOpener(str(path)) as handle:  # the header as written: nibabel's own copy is already fixed
        written = type(img.header).from_fileobj(handle, check=False)
    pixdim = [float(v) for v in written["pixdim"][1 : len(shape) + 1]]
    _positive_mm([v for v, n in zip(pixdim, shape, strict=True) if n > 1], "NIfTI pixdim", path)
    return tuple(v if n > 1 else (v if math.isfinite(v) and v > 0 else 1.0) for v, n in zip(pixdim, shape, strict=True))


def _read_dicom_file(path: Path, ds: pydicom.Dataset | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Scan:
    if ds is None:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as err:
            raise ValueError(f"{path} is not a readable DICOM file: {err}") from err
    if _dicom_count(ds, "NumberOfFrames", path, 1) > 1:
        return _read_multiframe(path, ds, max_pixels)
    array = _dicom_pixels(ds, path, max_pixels)
    orientation = _dicom_vector(
        ds.get("ImageOrientationPatient") or DEFAULT_ORIENTATION, 6, "ImageOrientationPatient", path
    )
    position = _dicom_vector(ds.get("ImagePositionPatient") or (0.0, 0.0, 0.0), 3, "ImagePositionPatient", path)
    pixel_spacing = _pixel_spacing(ds, path)
    thickness = _positive_mm([_dicom_number(ds, "SliceThickness", path, 1.0)], "SliceThickness", path)[0]
    affine = _plane_affine(orientation, position, pixel_spacing, thickness)
    return Scan(
        name=file_stem(path), array=array, affine=affine, spacing=pixel_spacing, dicom=[ds], modality=_modality(ds)
    )


def _read_dicom_series(folder: Path, max_pixels: int) -> Scan:
    datasets = []
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(file)
        except (InvalidDicomError, OSError):
            continue  # stray non-DICOM files (README, thumbnails) do not make a series invalid
        if "PixelData" in ds:
            datasets.append((file, ds))
    if not datasets:
        raise ValueError(f"folder {folder} holds no DICOM files with pixel data: {EXPECTED_FORMATS}")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets})
    if len(series) > 1:
        raise ValueError(f"folder {folder}: series has {len(series)} SeriesInstanceUIDs {series}: expected one series")
    return read_dicom_series(datasets, folder.name, f"folder {folder}", max_pixels)


def read_dicom_series(
    datasets: Sequence[tuple[Path, pydicom.Dataset]], name: str, where: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Scan:
    """One series from its (file, dataset) pairs: slices of one size, orientation and pixel spacing,
    ordered along the slice normal; a single multi-frame file is read as its own volume. The whole
    volume's size (slices x Rows x Columns) is checked against ``max_pixels`` before any decoding."""
    if len(datasets) == 1:  # a multi-frame volume, or a single image (e.g. a radiograph without a position)
        scan = _read_dicom_file(*datasets[0], max_pixels=max_pixels)
        scan.name = name
        return scan
    first_file, first = datasets[0]
    rows, columns = _dicom_size(first, first_file)
    check_pixels(where, (len(datasets), rows, columns), max_pixels)
    first_spacing = _pixel_spacing(first, first_file)
    for file, ds in datasets:
        for keyword in ("ImageOrientationPatient", "ImagePositionPatient"):
            if keyword not in ds:
                raise ValueError(f"{file} has no {keyword}: a DICOM series needs it to place its slices")
        if _dicom_size(ds, file) != (rows, columns):
            raise ValueError(f"{file} is {ds.Rows}x{ds.Columns} but {first_file} is {rows}x{columns}")
        orientation = _dicom_vector(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", file)
        if not np.allclose(orientation, first.ImageOrientationPatient, atol=1e-4):
            raise ValueError(f"{file} has another ImageOrientationPatient than {first_file}: expected one orientation")
        if not np.allclose(_pixel_spacing(ds, file), first_spacing):
            raise ValueError(f"{file} has another PixelSpacing than {first_file}: expected one pixel spacing")

    positions = [_dicom_vector(ds.ImagePositionPatient, 3, "ImagePositionPatient", file) for file, ds in datasets]
    order, affine, spacing = _stack_geometry(
        first.ImageOrientationPatient,
        positions,
        first_spacing,
        1.0,
        where,  # 2+ positions give the slice step
    )
    datasets = [datasets[i] for i in order]
    array = np.stack([_dicom_pixels(ds, file, max_pixels) for file, ds in datasets])
    return Scan(
        name=name,
        array=array,
        affine=affine,
        spacing=spacing,
        dicom=[ds for _, ds in datasets],
        modality=_modality(first),
    )


def _stack_geometry(
    orientation: Sequence[float],
    positions: Sequence[Sequence[float]],
    pixel_spacing: tuple[float, float],
    thickness: float,
    where: str,
) -> tuple[list[int], np.ndarray, tuple[float, float, float]]:
    """Slice order along the slice normal, RAS affine and spacing of a stack of parallel DICOM planes.

    ``positions`` are the planes' ImagePositionPatient (LPS); ``thickness`` is the step used for a
    single plane. Planes must be distinct and evenly spaced.
    """
    cosines = np.asarray(_dicom_vector(orientation, 6, "ImageOrientationPatient", where), dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    if not np.linalg.norm(normal) > 1e-3:
        raise ValueError(f"{where}: ImageOrientationPatient {list(cosines)} has parallel row and column directions")
    points = np.asarray(positions, dtype=np.float64)
    if not np.isfinite(points).all():
        raise ValueError(f"{where}: an ImagePositionPatient is not finite: expected positions in mm")
    order = [int(i) for i in np.argsort(points @ normal, kind="stable")]
    points = points[order]
    gaps = np.diff(points @ normal)
    if len(gaps) and gaps.min() < 1e-3:
        raise ValueError(
            f"{where} has several slices at one position: expected a single 3D series "
            "(split echoes, phases or time points into separate folders)"
        )
    if len(gaps) and gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        raise ValueError(f"{where} has slice gaps from {gaps.min():.3f} to {gaps.max():.3f} mm: expected even spacing")
    step = (points[-1] - points[0]) / (len(points) - 1) if len(points) > 1 else normal * thickness
    row_spacing, col_spacing = pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = cosines[3:] * row_spacing
    lps[:3, 2] = cosines[:3] * col_spacing
    lps[:3, 3] = points[0]
    return order, LPS_TO_RAS @ lps, (float(np.linalg.norm(step)), row_spacing, col_spacing)


def _read_multiframe(path: Path, ds: pydicom.Dataset, max_pixels: int) -> Scan:
    """A multi-frame image (enhanced CT/MR, or legacy multi-frame) as a volume ordered along the slice normal.

    Geometry and rescale come from the shared and per-frame functional groups where present
    (enhanced objects), else from the top-level attributes, with frames ``SpacingBetweenSlices``
    (or ``SliceThickness``) apart. The frames' size is checked against ``max_pixels`` before decoding.
    """
    frames = _dicom_count(ds, "NumberOfFrames", path, 1)
    rows, columns = _dicom_size(ds, path)
    check_pixels(path, (frames, rows, columns), max_pixels)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    orientation = _group_value(shared, "PlaneOrientationSequence", "ImageOrientationPatient") or ds.get(
        "ImageOrientationPatient"
    )
    measures = _first_item(shared, "PixelMeasuresSequence") if shared is not None else None
    source = measures if measures is not None and "PixelSpacing" in measures else ds
    pixel_spacing = _pixel_spacing(source, path)
    spacing_source = measures if measures is not None and "SliceThickness" in measures else ds
    thickness = _slice_step(spacing_source, path)
    orientation = _dicom_vector(orientation or DEFAULT_ORIENTATION, 6, "ImageOrientationPatient", path)
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    positions = [_group_value(frame, "PlanePositionSequence", "ImagePositionPatient") for frame in per_frame[:frames]]
    if len(positions) != frames or any(p is None for p in positions):
        origin = np.asarray(
            _dicom_vector(ds.get("ImagePositionPatient") or (0.0, 0.0, 0.0), 3, "ImagePositionPatient", path)
        )
        positions = [origin + k * thickness * normal for k in range(frames)]
    else:
        positions = [_dicom_vector(p, 3, "ImagePositionPatient", path) for p in positions]
    order, affine, spacing = _stack_geometry(orientation, positions, pixel_spacing, thickness, str(path))
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise ValueError(f"{path} has {ds.SamplesPerPixel} samples per pixel: expected a grayscale image")
    try:
        pixels = ds.pixel_array.astype(np.float32).reshape(frames, rows, columns)
    except Exception as err:  # decoders raise many types (missing codec, truncated data, ...)
        raise ValueError(f"{path}: cannot decode its pixel data: {err}") from err
    for k in range(frames):
        slope, intercept = _rescale(per_frame[k] if k < len(per_frame) else None, shared, ds)
        pixels[k] = pixels[k] * slope + intercept
    del ds.PixelData
    return Scan(
        name=file_stem(path), array=pixels[order], affine=affine, spacing=spacing, dicom=[ds], modality=_modality(ds)
    )


def _modality(ds: pydicom.Dataset) -> str:
    return str(ds.get("Modality") or "").strip().upper()


def _first_item(ds: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    sequence = ds.get(keyword) if ds is not None else None
    return sequence[0] if sequence else None


def _group_value(group: pydicom.Dataset | None, sequence: str, keyword: str) -> Any:
    item = _first_item(group, sequence)
    return item.get(keyword) if item is not None else None


def _rescale(frame: pydicom.Dataset | None, shared: pydicom.Dataset | None, ds: pydicom.Dataset) -> tuple[float, float]:
    """Rescale slope and intercept of one frame: per-frame group, shared group, then top level."""
    for group in (frame, shared):
        item = _first_item(group, "PixelValueTransformationSequence")
        if item is not None and "RescaleSlope" in item:
            return float(item.RescaleSlope), float(item.get("RescaleIntercept") or 0.0)
    return float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)


def _dicom_pixels(ds: pydicom.Dataset, path: Path, max_pixels: int) -> np.ndarray:
    """Decode one grayscale frame with rescale slope/intercept applied, then drop Pixel Data from ``ds``;
    its Rows x Columns are checked against ``max_pixels`` first."""
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise ValueError(f"{path} has {ds.SamplesPerPixel} samples per pixel: expected a grayscale image")
    check_pixels(path, _dicom_size(ds, path), max_pixels)
    try:
        array = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except Exception as err:  # decoders raise many types (missing codec, truncated data, ...)
        raise ValueError(f"{path}: cannot decode its pixel data: {err}") from err
    del ds.PixelData
    return array


def _dicom_size(ds: pydicom.Dataset, path: Path) -> tuple[int, int]:
    """(Rows, Columns) as the header states them."""
    return _dicom_count(ds, "Rows", path, 0), _dicom_count(ds, "Columns", path, 0)


def _dicom_count(ds: pydicom.Dataset, keyword: str, path: Path, default: int) -> int:
    """A count in the header (Rows, Columns, NumberOfFrames): a whole number >= 0, or ValueError naming it."""
    value = _dicom_number(ds, keyword, path, default)
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise ValueError(f"{path}: DICOM {keyword} = {value:g}: expected a whole number >= 0")
    return int(value)


def _dicom_number(ds: pydicom.Dataset, keyword: str, path: Path, default: float) -> float:
    """A numeric header field (``default`` when absent or empty); ValueError naming the file and field otherwise."""
    try:
        value = ds.get(keyword)
        return float(default if value is None or value == "" else value)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a malformed element
        raise ValueError(f"{path}: DICOM {keyword} is not a number: {err}") from None


def _dicom_vector(values: Any, length: int, keyword: str, where: str | Path) -> tuple[float, ...]:
    """A multi-valued numeric header field with ``length`` finite values, or ValueError naming it."""
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{where}: DICOM {keyword} is not a list of numbers: {err}") from None
    if len(numbers) != length or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{where}: DICOM {keyword} {list(numbers)}: expected {length} finite numbers")
    return numbers


def _positive_mm(values: Sequence[float], field: str, where: str | Path) -> tuple[float, ...]:
    """``values`` when each is a voxel size in mm (finite, > 0); else ValueError naming the file and
    the field, since a volume or area measured with it would be wrong."""
    sizes = tuple(float(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in sizes):
        raise ValueError(
            f"{where}: {field} {', '.join(f'{v:g}' for v in sizes)}: expected voxel sizes in mm, finite and > 0"
        )
    return sizes


def _slice_step(ds: pydicom.Dataset, path: Path) -> float:
    """The slice step of a stack whose positions do not give it: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    keyword = next((k for k in ("SpacingBetweenSlices", "SliceThickness") if _dicom_number(ds, k, path, 0.0)), "")
    return _positive_mm([_dicom_number(ds, keyword, path, 0.0)], keyword, path)[0] if keyword else 1.0


def _pixel_spacing(ds: pydicom.Dataset, path: str | Path) -> tuple[float, float]:
    """(row spacing, col spacing) in mm: PixelSpacing, else ImagerPixelSpacing (projection X-ray), else 1 mm."""
    keyword = next((k for k in ("PixelSpacing", "ImagerPixelSpacing") if ds.get(k)), "")
    if not keyword:
        return 1.0, 1.0
    row, col = _positive_mm(_dicom_vector(ds.get(keyword), 2, keyword, path), keyword, path)
    return row, col


def _plane_affine(
    orientation: tuple[float, ...] | list[float],
    position: tuple[float, ...] | list[float],
    pixel_spacing: tuple[float, float],
    thickness: float,
) -> np.ndarray:
    """RAS affine of a 2D image indexed (row, col) from its LPS orientation, position and spacing."""
    orientation_lps = np.asarray(orientation, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = orientation_lps[3:] * pixel_spacing[0]
    lps[:3, 1] = orientation_lps[:3] * pixel_spacing[1]
    lps[:3, 2] = np.cross(orientation_lps[:3], orientation_lps[3:]) * thickness
    lps[:3, 3] = np.asarray(position, dtype=np.float64)
    return LPS_TO_RAS @ lps


def _ds(value: float) -> DSfloat:
    """A decimal string within DICOM's 16 characters (k * 0.7 would otherwise print as 2.0999999999999996)."""
    return DSfloat(value, auto_format=True)


def file_stem(path: Path) -> str:
    """The file name without its extension (``.nii.gz`` counts as one)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem
