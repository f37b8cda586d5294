"""Scans keep their geometry through read_scan, and written masks (NIfTI, DICOM-SEG) land on the source voxels."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medfed.data.medical_io import read_scan, write_dicom_seg, write_dicom_series, write_nifti_mask


def rotated_affine() -> np.ndarray:
    """A non-trivial affine: 20 degree rotation about z, spacing 0.8/0.8/2.5 mm, offset."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [-90.0, 12.5, 40.0]
    return affine


def phantom(shape: tuple[int, int, int] = (6, 32, 32)) -> np.ndarray:
    """int16 CT-like volume whose every voxel is distinct, so misordered slices or flipped axes show."""
    return (np.arange(np.prod(shape)).reshape(shape) - 1000).astype(np.int16)


def sphere(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    distance = sum((axis - c) ** 2 for axis, c in zip(grid, centre, strict=True))
    return distance <= radius**2


def test_nifti_round_trip_keeps_the_affine(tmp_path: Path) -> None:
    affine = rotated_affine()
    volume = np.random.default_rng(0).normal(size=(20, 24, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "case01.nii.gz")

    scan = read_scan(tmp_path / "case01.nii.gz")
    assert scan.name == "case01"
    assert scan.array.dtype == np.float32 and np.allclose(scan.array, volume)
    assert np.allclose(scan.affine, affine)
    assert np.allclose(scan.spacing, (0.8, 0.8, 2.5))

    mask = sphere(volume.shape, (10, 12, 4), 5).astype(np.int64) * 3
    out = write_nifti_mask(mask, scan, tmp_path / "case01_mask.nii.gz")
    written = nib.load(out)
    assert np.allclose(written.affine, affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    assert np.allclose(written.get_qform(), affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), mask)


def test_png_reads_as_2d_and_its_mask_is_a_singleton_slice(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(30, 40), dtype=np.uint8)
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "xray.png")

    scan = read_scan(tmp_path / "xray.png")
    assert scan.name == "xray"
    assert scan.array.shape == (30, 40) and scan.array.dtype == np.float32
    assert np.allclose(scan.array, pixels, atol=1)  # RGB -> grayscale rounding
    assert scan.spacing == (1.0, 1.0)
    # ITK's geometry for a PNG: column index -> LPS +x (RAS -x), row index -> LPS +y (RAS -y).
    assert np.allclose(scan.affine @ [2, 3, 0, 1], [-3, -2, 0, 1])

    mask = np.zeros((30, 40), dtype=np.int32)
    mask[5:20, 10:35] = 300  # > 255 labels need uint16
    written = nib.load(write_nifti_mask(mask, scan, tmp_path / "xray_mask.nii.gz"))
    assert written.shape == (30, 40, 1)
    assert written.get_data_dtype() == np.uint16
    assert np.array_equal(np.asarray(written.dataobj)[..., 0], mask)
    assert np.allclose(written.affine, scan.affine)


def test_16_bit_png_keeps_its_values(tmp_path: Path) -> None:
    pixels = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "mammo.png")
    assert np.array_equal(read_scan(tmp_path / "mammo.png").array, pixels.astype(np.float32))


def test_2d_nifti_and_npy(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    affine = np.diag([0.5, 0.6, 1.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "slice.nii")
    scan = read_scan(tmp_path / "slice.nii")
    assert scan.array.shape == (3, 4) and np.allclose(scan.spacing, (0.5, 0.6))  # header zooms are float32
    written = nib.load(write_nifti_mask(np.ones((3, 4), dtype=np.uint8), scan, tmp_path / "slice_mask.nii.gz"))
    assert written.shape == (3, 4, 1) and np.allclose(written.affine, affine)

    np.save(tmp_path / "volume.npy", np.zeros((2, 3, 4), dtype=np.int16))
    scan = read_scan(tmp_path / "volume.npy")
    assert scan.name == "volume" and scan.array.shape == (2, 3, 4) and scan.array.dtype == np.float32
    assert scan.spacing == (1.0, 1.0, 1.0) and np.array_equal(scan.affine, np.eye(4))


def test_dicom_series_geometry_and_slice_order(tmp_path: Path) -> None:
    volume = phantom()
    paths = write_dicom_series(volume, tmp_path / "written")
    first, last = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1])
    # Rename files in shuffled order, so name order is not slice order.
    series = tmp_path / "CT_SERIES"
    series.mkdir()
    shuffled = list(range(len(paths)))
    random.Random(3).shuffle(shuffled)
    for path, number in zip(paths, shuffled, strict=True):
        path.rename(series / f"IM{number:04d}")
    (series / "README.txt").write_text("not DICOM")

    scan = read_scan(series)
    assert scan.name == "CT_SERIES"
    assert scan.array.shape == (6, 32, 32) and scan.array.dtype == np.float32
    assert np.array_equal(scan.array, volume)
    assert np.allclose(scan.spacing, (2.0, 0.7, 0.7))
    assert [int(ds.InstanceNumber) for ds in scan.dicom] == [1, 2, 3, 4, 5, 6]

    x, y, z = (float(v) for v in first.ImagePositionPatient)
    assert np.allclose(scan.affine @ [0, 0, 0, 1], [-x, -y, z, 1])
    step = scan.affine[:3, :3]
    assert np.allclose(step[:, 0], [0, 0, 2.0])  # next slice: +z (superior)
    assert np.allclose(step[:, 1], [0, -0.7, 0])  # next row: LPS +y = posterior = RAS -y
    assert np.allclose(step[:, 2], [-0.7, 0, 0])  # next column: LPS +x = patient left = RAS -x
    x, y, z = (float(v) for v in last.ImagePositionPatient)
    assert np.allclose(scan.affine @ [5, 0, 0, 1], [-x, -y, z, 1])


def test_dicom_rescale_is_applied_to_a_single_file(tmp_path: Path) -> None:
    (path,) = write_dicom_series(phantom((1, 8, 10)), tmp_path)
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.save_as(path)

    scan = read_scan(path)
    assert scan.array.shape == (8, 10) and scan.spacing == (0.7, 0.7)
    assert np.array_equal(scan.array, phantom((1, 8, 10))[0] * 2.0 - 1024)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    assert np.allclose(scan.affine @ [1, 1, 0, 1], [-(x + 0.7), -(y + 0.7), z, 1])


def test_dicom_seg_of_a_series_reconstructs_the_mask(tmp_path: Path) -> None:
    write_dicom_series(phantom(), tmp_path / "series")
    scan = read_scan(tmp_path / "series")
    mask = sphere(scan.array.shape, (2.5, 12, 14), 4).astype(np.uint8) * 4  # label 4 -> segment 2
    mask[5, 28:, 28:] = 1
    names = {1: "corner", 4: "lesion", 7: "absent"}

    out = write_dicom_seg(mask, scan, tmp_path / "seg.dcm", names, algorithm="unet", version="1.2")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert [item.SegmentLabel for item in ds.SegmentSequence] == ["corner", "lesion", "absent"]
    assert ds.SegmentSequence[1].SegmentAlgorithmType == "AUTOMATIC"
    assert ds.SegmentSequence[1].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "unet"
    assert ds.StudyInstanceUID == scan.dicom[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == scan.dicom[0].FrameOfReferenceUID

    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 3
    segments = seg.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in scan.dicom], combine_segments=True, assert_missing_frames_are_empty=True
    )
    labels = np.array([0, *sorted(names)])[segments]
    for index in range(mask.shape[0]):
        assert np.array_equal(labels[index], mask[index]), f"slice {index}"


def test_dicom_seg_of_a_single_image(tmp_path: Path) -> None:
    (path,) = write_dicom_series(phantom((1, 16, 20)), tmp_path / "series")
    scan = read_scan(path)
    mask = np.zeros((16, 20), dtype=np.int64)
    mask[3:9, 4:15] = 1

    ds = pydicom.dcmread(write_dicom_seg(mask, scan, tmp_path / "seg.dcm", {1: "lesion"}))
    assert ds.Modality == "SEG" and len(ds.SegmentSequence) == 1
    assert ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        scan.dicom[0].SOPInstanceUID
    )
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = seg.get_pixels_by_source_instance([scan.dicom[0].SOPInstanceUID], combine_segments=True)
    assert np.array_equal(pixels[0], mask)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("scan.foo", b"x", "unsupported format .foo"),
        ("scan.png", b"not an image", "is not a readable PNG/JPEG/BMP/TIFF image"),
        ("scan.nii.gz", b"not nifti", "is not a readable NIfTI file"),
        ("scan.dcm", b"not dicom", "is not a readable DICOM file"),
    ],
)
def test_bad_files_are_refused_with_their_name(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match="expected|readable") as error:
        read_scan(tmp_path / name)
    assert message in str(error.value) and name in str(error.value)


def test_folder_problems_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no DICOM files"):
        read_scan(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        read_scan(tmp_path / "missing.nii.gz")

    write_dicom_series(phantom((2, 8, 8)), tmp_path / "mixed")
    write_dicom_series(phantom((2, 8, 8)), tmp_path / "other")
    (tmp_path / "other" / "slice_0000.dcm").rename(tmp_path / "mixed" / "intruder.dcm")
    with pytest.raises(ValueError, match="series has 2 SeriesInstanceUIDs"):
        read_scan(tmp_path / "mixed")


@pytest.mark.parametrize(("last_z", "message"), [(2.0, "several slices at one position"), (9.0, "slice gaps")])
def test_series_that_is_not_one_regular_volume_is_refused(tmp_path: Path, last_z: float, message: str) -> None:
    paths = write_dicom_series(phantom((3, 4, 4)), tmp_path)  # slices at z = 0, 2, 4
    ds = pydicom.dcmread(paths[-1])
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], last_z]
    ds.save_as(paths[-1])
    with pytest.raises(ValueError, match=message):
        read_scan(tmp_path)


def test_mask_problems_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "image.npy", np.zeros((4, 5), dtype=np.float32))
    scan = read_scan(tmp_path / "image.npy")
    with pytest.raises(ValueError, match=r"mask shape \(5, 4\) does not match scan 'image' shape \(4, 5\)"):
        write_nifti_mask(np.zeros((5, 4), dtype=np.uint8), scan, tmp_path / "mask.nii.gz")
    with pytest.raises(ValueError, match="integer label map"):
        write_nifti_mask(np.zeros((4, 5), dtype=np.float32), scan, tmp_path / "mask.nii.gz")
    with pytest.raises(ValueError, match="DICOM-SEG needs a DICOM source series"):
        write_dicom_seg(np.zeros((4, 5), dtype=np.uint8), scan, tmp_path / "seg.dcm", {1: "lesion"})

    write_dicom_series(phantom((2, 4, 5)), tmp_path / "series")
    series = read_scan(tmp_path / "series")
    mask = np.zeros((2, 4, 5), dtype=np.uint8)
    mask[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"mask holds labels \[2\] that are missing from segment_names"):
        write_dicom_seg(mask, series, tmp_path / "seg.dcm", {1: "lesion"})
    with pytest.raises(ValueError, match="0 is background"):
        write_dicom_seg(mask, series, tmp_path / "seg.dcm", {0: "background", 2: "lesion"})


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_lossless_compressed_dicom_decodes_to_the_uncompressed_pixels(name: str) -> None:
    from pydicom.data import get_testdata_file

    compressed = read_scan(get_testdata_file(name))
    plain = read_scan(get_testdata_file("MR_small.dcm"))
    np.testing.assert_array_equal(compressed.array, plain.array)
    assert compressed.spacing == plain.spacing


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "JPGExtended.dcm"])
def test_jpeg_2000_and_jpeg_extended_dicoms_decode(name: str) -> None:
    from pydicom.data import get_testdata_file

    scan = read_scan(get_testdata_file(name))  # pylibjpeg's openjpeg / libjpeg plugins
    assert scan.array.ndim == 2 and np.isfinite(scan.array).all() and scan.array.std() > 0


def _multiframe_from_series(series: list[Path], order: list[int], path: Path, per_frame_geometry: bool) -> Path:
    """One multi-frame file holding the series' slices in ``order``, with enhanced-style functional groups."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    slices = [pydicom.dcmread(p) for p in series]
    ds = slices[0].copy()
    ds.NumberOfFrames = len(order)
    ds.PixelData = b"".join(slices[i].PixelData for i in order)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = ds.PixelSpacing
    measures.SliceThickness = ds.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = ds.ImageOrientationPatient
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in order:
        frame = Dataset()
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
        frame.PixelValueTransformationSequence = Sequence([transform])
        if per_frame_geometry:
            position = Dataset()
            position.ImagePositionPatient = slices[i].ImagePositionPatient
            frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    if not per_frame_geometry:
        ds.SpacingBetweenSlices = ds.SliceThickness
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multiframe_dicom_is_a_volume_sorted_along_the_normal_with_per_frame_rescale(tmp_path: Path) -> None:
    volume = np.random.default_rng(3).integers(0, 2000, (6, 16, 20)).astype(np.int16)
    series = write_dicom_series(volume, tmp_path / "series", (2.5, 0.6, 0.8))
    reference = read_scan(tmp_path / "series")
    shuffled = _multiframe_from_series(series, [3, 0, 5, 1, 4, 2], tmp_path / "enhanced.dcm", True)
    scan = read_scan(shuffled)
    np.testing.assert_array_equal(scan.array, reference.array - 1024)
    np.testing.assert_allclose(scan.affine, reference.affine, atol=1e-6)
    assert scan.spacing == pytest.approx(reference.spacing)
    legacy = read_scan(_multiframe_from_series(series, list(range(6)), tmp_path / "legacy.dcm", False))
    np.testing.assert_array_equal(legacy.array, reference.array - 1024)
    assert legacy.spacing == pytest.approx(reference.spacing)


def test_ct_is_windowed_in_hounsfield_units_and_mr_by_percentiles(tmp_path: Path) -> None:
    from medfed.data.decode import Preprocess, model_input

    volume = np.full((4, 8, 8), -1000, np.int16)
    volume[:, 2:6, 2:6] = 40  # soft tissue
    volume[:, 3:5, 3:5] = 3000  # metal, beyond the window
    ct = read_scan(write_dicom_series(volume, tmp_path / "ct")[0].parent)
    assert ct.modality == "CT"
    image, _, _ = model_input(ct, 8, 3, photo=False)
    assert np.unique(image).tolist() == pytest.approx([0.0, 0.52, 1.0])  # (40 + 1000) / 2000 = 0.52
    soft, _, _ = model_input(ct, 8, 3, photo=False, preprocess=Preprocess((-160.0, 240.0)))
    assert np.unique(soft).tolist() == pytest.approx([0.0, 0.5, 1.0])  # (40 + 160) / 400
    mr = read_scan(write_dicom_series(volume, tmp_path / "mr", modality="MR")[0].parent)
    assert mr.modality == "MR"
    scaled, _, _ = model_input(mr, 8, 3, photo=False)
    assert scaled.min() == 0.0 and scaled.max() == 1.0  # percentile range, whatever the units


def test_nifti_ct_is_windowed_when_the_config_says_the_modality_is_ct(tmp_path: Path) -> None:
    from medfed.data.decode import Preprocess, model_input

    volume = np.full((8, 8, 4), -1000.0, np.float32)
    volume[2:6, 2:6] = 40.0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "ct.nii.gz")
    scan = read_scan(tmp_path / "ct.nii.gz")
    assert scan.modality == ""  # NIfTI does not say
    as_ct, _, _ = model_input(scan, 8, 3, photo=False, preprocess=Preprocess(modality="CT"))
    assert np.unique(as_ct).tolist() == pytest.approx([0.0, 0.52])
    auto, _, _ = model_input(scan, 8, 3, photo=False)
    assert auto.max() == pytest.approx(1.0)  # percentile scaling
