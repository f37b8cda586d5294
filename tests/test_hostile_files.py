"""A generated corpus of hostile files and hostile text, fed to the commands a site runs.

Every case is refused (or, where the input is usable, accepted) with a clear message: an error of
the project's own kind naming the file, or a CLI exit code 1/2 with no traceback. Images that
claim a huge size in a small file are refused from their header, before decoding, with little
memory; checkpoints are never unpickled; user text holding Rich markup prints as itself; voxel
sizes that are not finite and > 0 are refused naming the header field; ``boxes.csv`` is read as
the manifest is (UTF-8, BOM or not). Plus property tests (hypothesis) of the markup helper and of
the ``boxes.csv`` parser.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from medfed.cli import app
from medfed.cli.render import print_summary
from medfed.data import DataError, write_site
from medfed.data.boxes import read_box_table
from medfed.data.decode import DEFAULT_PREPROCESS, Preprocess, load_mask
from medfed.data.manifest import SiteReading
from medfed.data.medical_io import ImageTooLarge, read_scan, write_dicom_series
from medfed.data.medmnist import read_medmnist
from medfed.data.synthetic import synthetic_detection_site, synthetic_site
from medfed.display import plain
from medfed.tasks import get_task
from medfed.weights import model_to_arrays, save_checkpoint
from tests.conftest import REPO, time_limit, tiny_config

runner = CliRunner()
LOW_MEMORY = 64 * 1024 * 1024  # bytes numpy may allocate while refusing a size bomb from its header


@pytest.fixture(autouse=True)
def _per_case_time_limit() -> Iterator[None]:
    """A case over 60 s is a hang."""
    with time_limit(60, "a hostile input"):
        yield


# ---------------------------------------------------------------- file builders


def _png_bytes(width: int, height: int, real_rows: int = 1) -> bytes:
    """A greyscale PNG whose header says ``width`` x ``height``, holding ``real_rows`` rows of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * real_rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _png_zlib_bomb(side: int) -> bytes:
    """A real PNG of ``side`` x ``side`` zeros: kilobytes on disk, ``side``² bytes decoded."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _photo(suffix: str, array: np.ndarray | None = None, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.full((8, 8), 90, np.uint8) if array is None else array)
    image.save(buffer, format={".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".png": "PNG"}[suffix], **save)
    return buffer.getvalue()


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_photo(".jpg"))
    at = data.index(b"\xff\xc0") + 5  # SOF0: marker, length (2), precision (1), then height and width
    data[at : at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_photo(".bmp"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _tiff_claiming(width: int, height: int) -> bytes:
    data = bytearray(_photo(".tif"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        tag = struct.unpack("<H", data[entry : entry + 2])[0]
        if tag in (256, 257):  # ImageWidth, ImageLength as LONG
            data[entry + 2 : entry + 12] = struct.pack("<HII", 4, 1, width if tag == 256 else height)
    return bytes(data)


def _npy_claiming(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\x00" * 64


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _nifti(array: np.ndarray, pixdim: tuple[float, ...] | None = None, gz: bool = False) -> bytes:
    """NIfTI-1 bytes; ``pixdim`` is written into the header as given (nibabel would fix it from the affine)."""
    data = bytearray(nib.Nifti1Image(array, np.eye(4)).to_bytes())
    for axis, value in enumerate(pixdim or ()):
        struct.pack_into("<f", data, 76 + 4 * (axis + 1), value)  # pixdim[1:] at byte 80
    return gzip.compress(bytes(data)) if gz else bytes(data)


def _nifti_nan_sform(path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    img.header.set_qform(None, code=0)
    img.header["sform_code"] = 1
    for row in ("srow_x", "srow_y", "srow_z"):
        img.header[row] = np.nan
    path.write_bytes(img.to_bytes())


def _nifti_claiming(shape: tuple[int, ...], gz: bool = False) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    buffer = io.BytesIO()
    header.write_to(buffer)
    data = buffer.getvalue() + b"\x00" * (4 + 4096)
    return gzip.compress(data) if gz else data


def _dicom_dataset(tmp: Path, rows: int = 8, modality: str = "CT") -> pydicom.Dataset:
    volume = (np.arange(rows * rows).reshape(1, rows, rows) % 200).astype(np.int16)
    path = write_dicom_series(volume, tmp / "dicom-source", (1.0, 0.7, 0.7), modality=modality)[0]
    return pydicom.dcmread(path)


def _dicom(edit: Callable[[pydicom.Dataset], None]) -> Callable[[Path], None]:
    """A writer of one DICOM file (a CT slice of 8 x 8) changed by ``edit``."""

    def write(path: Path) -> None:
        ds = _dicom_dataset(path.parent)
        edit(ds)
        ds.save_as(path, enforce_file_format=False)

    return write


def _set(**fields: Any) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in fields.items():
            setattr(ds, keyword, value)

    return edit


def _dicom_series(edit: Callable[[int, pydicom.Dataset], None], slices: int = 3) -> Callable[[Path], None]:
    """A writer of a DICOM series folder (``slices`` CT slices of 8 x 8), each slice changed by ``edit``."""

    def write(folder: Path) -> None:
        volume = np.zeros((slices, 8, 8), np.int16)
        paths = write_dicom_series(volume, folder, (2.0, 0.7, 0.7))
        for k, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            edit(k, ds)
            ds.save_as(path, enforce_file_format=False)

    return write


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


# ------------------------------------------------------------ size bombs: header first


class Bomb(NamedTuple):
    id: str
    name: str
    write: Callable[[Path], None]


BOMBS = [
    *(
        Bomb(f"png-header-{w}x{h}", f"b{w}x{h}.png", _bytes(_png_bytes(w, h)))
        for w, h in [(12000, 12000), (20000, 20000), (9000, 9000), (100_000, 1000), (1, 80_000_000), (65535, 65535)]
    ),
    Bomb("png-real-zlib-bomb-12000", "bomb.png", lambda p: p.write_bytes(_png_zlib_bomb(12000))),
    *(
        Bomb(f"jpeg-header-{w}x{h}", f"b{w}x{h}.jpg", _bytes(_jpeg_claiming(w, h)))
        for w, h in [(12000, 12000), (65535, 65535), (65535, 1100)]
    ),
    *(
        Bomb(f"bmp-header-{w}x{h}", f"b{w}x{h}.bmp", _bytes(_bmp_claiming(w, h)))
        for w, h in [(12000, 12000), (30000, -30000)]
    ),
    *(
        Bomb(f"tiff-header-{w}x{h}", f"b{w}x{h}.tif", _bytes(_tiff_claiming(w, h)))
        for w, h in [(12000, 12000), (200_000, 1000)]
    ),
    *(
        Bomb(f"npy-header-{'x'.join(map(str, s))}-{d}", f"b{len(s)}{d}.npy", _bytes(_npy_claiming(s, d)))
        for s, d in [
            ((100_000, 100_000), "<f8"),
            ((9000, 9000), "|u1"),
            ((1000, 1000, 1000), "<f4"),
            ((70_000_000,), "<i2"),
        ]
    ),
    *(
        Bomb(
            f"nifti-header-{'x'.join(map(str, s))}{'-gz' if gz else ''}",
            f"b{len(s)}.nii{'.gz' if gz else ''}",
            _bytes(_nifti_claiming(s, gz)),
        )
        for s in [(2000, 2000, 2000), (30000, 30000), (512, 512, 512), (256, 256, 256, 8)]
        for gz in (False, True)
    ),  # fmt: skip
    Bomb("dicom-rows-columns-65535", "big.dcm", _dicom(_set(Rows=65535, Columns=65535))),
    Bomb("dicom-12000-square", "big12k.dcm", _dicom(_set(Rows=12000, Columns=12000))),
    Bomb("dicom-100000-frames", "frames.dcm", _dicom(_set(NumberOfFrames=100_000, Rows=512, Columns=512))),
    Bomb("dicom-series-total", "series", _dicom_series(lambda k, ds: _set(Rows=5000, Columns=5000)(ds))),
]


@pytest.mark.parametrize("bomb", BOMBS, ids=[b.id for b in BOMBS])
def test_a_size_bomb_is_refused_from_its_header_with_little_memory(bomb: Bomb, tmp_path: Path) -> None:
    path = tmp_path / bomb.name
    bomb.write(path)
    assert path.is_dir() or path.stat().st_size < 10_000_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as raised:
            read_scan(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.name in str(raised.value) and "data.max-pixels" in str(raised.value)
    assert peak < LOW_MEMORY, f"{peak / 2**20:.0f} MiB allocated before refusing"


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param(b, marks=[pytest.mark.slow] if "real" in b.id else [], id=f"mask-{b.id}")
        for b in BOMBS
        if not b.name.endswith((".dcm", "series"))
    ],
)
def test_a_size_bomb_as_a_mask_is_refused_from_its_header(bomb: Bomb, tmp_path: Path) -> None:
    path = tmp_path / bomb.name
    bomb.write(path)
    with pytest.raises(ImageTooLarge, match="data.max-pixels"):
        load_mask(path, 8, 2, 2)


def test_data_max_pixels_is_a_config_key_the_readers_use(tmp_path: Path) -> None:
    config = tiny_config(**{"data.max-pixels": 100})
    assert config.to_dict()["data"]["max-pixels"] == 100 and Preprocess.from_config(config.data).max_pixels == 100
    path = tmp_path / "small.png"
    path.write_bytes(_photo(".png", np.zeros((11, 10), np.uint8)))
    with pytest.raises(ImageTooLarge, match="10x11|11x10"):
        read_scan(path, max_pixels=100)
    assert read_scan(path, max_pixels=110).array.shape == (11, 10)


# ------------------------------------------------------------ MedMNIST .npz archives


def _npz(arrays: dict[str, bytes | np.ndarray], compress: bool = True) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(path, "w", mode) as archive:
            for name, value in arrays.items():
                archive.writestr(f"{name}.npy", value if isinstance(value, bytes) else _npy(value))

    return write


def _medmnist(**changes: bytes | np.ndarray) -> dict[str, bytes | np.ndarray]:
    arrays: dict[str, bytes | np.ndarray] = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.full((4, 8, 8), 100, np.uint8)
        arrays[f"{split}_labels"] = np.array([[0], [1], [0], [1]], np.uint8)
    return {**arrays, **changes}


def _zeros_bomb(path: Path) -> None:
    """A real deflate bomb: 80 M zero pixels as MedMNIST train images, a few hundred kB on disk."""
    arrays = _medmnist()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            if name != "train_images":
                archive.writestr(f"{name}.npy", _npy(value))
        with archive.open("train_images.npy", "w") as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": (1250, 256, 250)}
            )
            for _ in range(1250):
                member.write(bytes(256 * 250))


def _many_arrays(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for k in range(3000):
            archive.writestr(f"a{k}.npy", _npy(np.zeros(2)))


NPZ_CASES = {
    "zeros-bomb": (_zeros_bomb, "data.max-pixels"),
    "header-bomb": (_npz(_medmnist(train_images=_npy_claiming((100_000, 1000, 1000), "|u1"))), "data.max-pixels"),
    "huge-images": (_npz(_medmnist(train_images=_npy_claiming((1, 9000, 9000), "|u1"))), "data.max-pixels"),
    "many-arrays": (_many_arrays, "missing arrays"),
    "missing-labels": (_npz({k: v for k, v in _medmnist().items() if k != "val_labels"}), "val_labels"),
    "object-array": (_npz(_medmnist(test_labels=np.array([{"a": 1}], dtype=object))), "test_labels"),
    "string-images": (_npz(_medmnist(train_images=np.full((4, 8, 8), "x"))), "train_images"),
    "complex-images": (_npz(_medmnist(train_images=np.zeros((4, 8, 8), complex))), "train_images"),
    "nan-images": (_npz(_medmnist(val_images=np.full((4, 8, 8), np.nan))), "NaN"),
    "inf-labels": (_npz(_medmnist(val_labels=np.full((4, 1), np.inf))), "val_labels"),
    "fraction-labels": (_npz(_medmnist(val_labels=np.full((4, 1), 0.5))), "val_labels"),
    "label-count": (_npz(_medmnist(test_labels=np.zeros((3, 1)))), "labels"),
    "1d-images": (_npz(_medmnist(train_images=np.zeros(8, np.uint8))), "images"),
    "5d-images": (_npz(_medmnist(train_images=np.zeros((1, 1, 2, 2, 2), np.uint8))), "images"),
    "broken-npy-member": (_npz(_medmnist(train_images=b"\x93NUMPY garbage")), "train_images"),
    "not-a-zip": (_bytes(b"PK\x03\x04 this is not a zip at all"), "bad.npz"),
    "empty-file": (_bytes(b""), "bad.npz"),
    "truncated-zip": (lambda p: (_npz(_medmnist())(p), p.write_bytes(p.read_bytes()[:300])), "bad.npz"),
}


@pytest.mark.parametrize("name", list(NPZ_CASES))
def test_a_hostile_medmnist_archive_is_refused_before_decoding(name: str, tmp_path: Path) -> None:
    write, expected = NPZ_CASES[name]
    path = tmp_path / "bad.npz"
    write(path)
    assert path.stat().st_size < 10_000_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as raised:
            read_medmnist(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert expected in str(raised.value) and "bad.npz" in str(raised.value), str(raised.value)
    assert peak < LOW_MEMORY, f"{peak / 2**20:.0f} MiB allocated before refusing"


# ------------------------------------------------- voxel sizes that would measure wrong


def _positions(values: list[float]) -> Callable[[int, pydicom.Dataset], None]:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.ImagePositionPatient = [0.0, 0.0, values[k]]

    return edit


VOXEL_CASES = {
    **{
        f"nifti-pixdim-{axis}-{value}": (
            f"v{axis}.nii",
            _bytes(_nifti(np.zeros((4, 4, 4), np.float32), (value, 1, 1) if axis == "x" else (1, 1, value))),
            "pixdim",
        )
        for axis in ("x", "z")
        for value in (-1.0, 0.0, float("nan"), float("inf"))
    },
    "nifti-gz-pixdim-negative": ("n.nii.gz", _bytes(_nifti(np.zeros((4, 4, 4), np.float32), (-2, 1, 1), gz=True)), "pixdim"),
    "nifti-2d-pixdim-zero": ("flat.nii", _bytes(_nifti(np.zeros((6, 6), np.float32), (0, 1))), "pixdim"),
    "nifti-nan-affine": ("a.nii", _nifti_nan_sform, "affine"),
    **{
        f"dicom-pixelspacing-{value}": ("ps.dcm", _dicom(_set(PixelSpacing=value)), "PixelSpacing")
        for value in (["-0.5", "0.5"], ["0", "0.7"], ["nan", "0.7"], ["inf", "inf"], ["0.7"], ["1e999", "1"])
    },
    "dicom-imagerpixelspacing-negative": ("ips.dcm", _dicom(lambda ds: (delattr(ds, "PixelSpacing"), _set(ImagerPixelSpacing=["-1", "1"])(ds))), "ImagerPixelSpacing"),
    "dicom-slicethickness-nan": ("st.dcm", _dicom(_set(SliceThickness="nan")), "SliceThickness"),
    "dicom-slicethickness-negative": ("st.dcm", _dicom(_set(SliceThickness="-3")), "SliceThickness"),
    "dicom-position-nan": ("pos.dcm", _dicom(_set(ImagePositionPatient=["nan", "0", "0"])), "ImagePositionPatient"),
    "dicom-orientation-inf": ("o.dcm", _dicom(_set(ImageOrientationPatient=["inf", 0, 0, 0, 1, 0])), "ImageOrientationPatient"),
    "series-position-nan": ("s1", _dicom_series(_positions([0.0, float("nan"), 4.0])), "ImagePositionPatient"),
    "series-position-inf": ("s2", _dicom_series(_positions([0.0, 2.0, float("inf")])), "ImagePositionPatient"),
    "series-orientation-zero": ("s3", _dicom_series(lambda k, ds: _set(ImageOrientationPatient=[0] * 6)(ds)), "ImageOrientationPatient"),
    "series-pixelspacing-negative": ("s4", _dicom_series(lambda k, ds: _set(PixelSpacing=["-0.7", "-0.7"])(ds)), "PixelSpacing"),
    "series-same-position": ("s5", _dicom_series(_positions([1.0, 1.0, 1.0])), "one position"),
    "multiframe-thickness-zero-step-negative": (
        "mf.dcm", _dicom(_set(NumberOfFrames=1, SpacingBetweenSlices="-2")), None),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VOXEL_CASES))
def test_a_voxel_size_that_would_measure_wrong_is_refused_naming_the_field(name: str, tmp_path: Path) -> None:
    file_name, write, field = VOXEL_CASES[name]
    path = tmp_path / file_name
    write(path)
    if field is None:  # a single frame: no slice step is used, the file is fine
        assert read_scan(path).array.shape == (8, 8)
        return
    with pytest.raises(ValueError) as raised:
        read_scan(path)
    assert path.name in str(raised.value) and field in str(raised.value), str(raised.value)


def test_data_check_refuses_a_negative_pixel_spacing(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site", synthetic_site(0, 12, seed=1))
    _dicom(_set(PixelSpacing=["-0.5", "0.5"]))(site / "images" / "neg.dcm")
    lines = (site / "manifest.csv").read_text().splitlines()
    (site / "manifest.csv").write_text(
        "\n".join([lines[0], "images/neg.dcm" + lines[1][lines[1].index(",") :], *lines[2:]])
    )
    result = runner.invoke(app, ["data", "check", str(site)])
    assert result.exit_code == 1 and "neg.dcm" in result.output and "PixelSpacing" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------- hostile images through `medfed predict`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny classification model as medfed writes it (28 px grey images, 2 classes)."""
    config = tiny_config()
    torch.manual_seed(0)
    model = get_task("classification").build_model(config)
    path = tmp_path_factory.mktemp("model") / "global.safetensors"
    return save_checkpoint(path, model_to_arrays(model), {"round": 1, "config": config.to_dict()})


def _truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


IMAGE_CASES: dict[str, tuple[str, Callable[[Path], None]]] = {}
for _suffix in (".png", ".jpg", ".bmp", ".tif"):
    for _fraction in (0.1, 0.3, 0.6, 0.9):
        IMAGE_CASES[f"truncated{_fraction}{_suffix}"] = (
            f"cut{_suffix}",
            _bytes(
                _truncated(_photo(_suffix, np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)), _fraction)
            ),
        )
    IMAGE_CASES[f"empty{_suffix}"] = (f"empty{_suffix}", _bytes(b""))
    IMAGE_CASES[f"garbage{_suffix}"] = (f"junk{_suffix}", _bytes(np.random.default_rng(1).bytes(700)))
IMAGE_CASES.update(
    {
        "png-zero-width": ("zw.png", _bytes(_png_bytes(0, 8))),
        "tiff-float-nan": ("nan.tif", _bytes(_photo(".tif", np.full((8, 8), np.nan, np.float32)))),
        "tiff-float-inf": ("inf.tif", _bytes(_photo(".tif", np.full((8, 8), np.inf, np.float32)))),
        "tiff-two-pages": (
            "pages.tif",
            lambda p: Image.fromarray(np.zeros((8, 8), np.uint8)).save(
                p, save_all=True, append_images=[Image.fromarray(np.ones((8, 8), np.uint8))]
            ),
        ),
        "npy-nan": ("nan.npy", _bytes(_npy(np.full((8, 8), np.nan)))),
        "npy-inf": ("inf.npy", _bytes(_npy(np.full((8, 8), -np.inf, np.float32)))),
        "npy-zero-size": ("zero.npy", _bytes(_npy(np.zeros((0, 8))))),
        "npy-3d-for-2d-model": ("vol.npy", _bytes(_npy(np.zeros((4, 8, 8))))),
        "npy-4d": ("4d.npy", _bytes(_npy(np.zeros((2, 3, 8, 8))))),
        "npy-1d": ("1d.npy", _bytes(_npy(np.zeros(64)))),
        "npy-scalar": ("scalar.npy", _bytes(_npy(np.array(3.0)))),
        "npy-complex": ("complex.npy", _bytes(_npy(np.zeros((8, 8), complex)))),
        "npy-strings": ("str.npy", _bytes(_npy(np.full((8, 8), "ab")))),
        "npy-structured": ("rec.npy", _bytes(_npy(np.zeros((8, 8), dtype=[("a", "<f4"), ("b", "<i4")])))),
        "npy-pickled-object": ("obj.npy", _bytes(_npy(np.array([{"a": 1}], dtype=object)))),
        "npy-bad-magic": ("magic.npy", _bytes(b"\x93NUMPX\x01\x00" + b"\x00" * 100)),
        "npy-header-lies-short-data": ("short.npy", _bytes(_npy_claiming((64, 64)))),
        "nifti-nan": ("nan.nii", _bytes(_nifti(np.full((8, 8, 1), np.nan, np.float32)))),
        "nifti-inf-gz": ("inf.nii.gz", _bytes(_nifti(np.full((8, 8, 1), np.inf, np.float32), gz=True))),
        "nifti-3d-for-2d-model": ("vol.nii", _bytes(_nifti(np.zeros((4, 8, 8), np.float32)))),
        "nifti-4d": ("4d.nii", _bytes(_nifti(np.zeros((4, 4, 4, 3), np.float32)))),
        "nifti-complex": ("cplx.nii", _bytes(_nifti(np.zeros((8, 8, 1), np.complex64)))),
        "nifti-truncated": ("cut.nii", _bytes(_nifti(np.zeros((32, 32, 1), np.float32))[:600])),
        "nifti-gz-truncated": (
            "cut.nii.gz",
            _bytes(_nifti(np.random.default_rng(3).random((32, 32, 1), np.float32), gz=True)[:2000]),
        ),
        "nifti-gz-not-gzip": ("fake.nii.gz", _bytes(b"\x1f\x8b" + b"\x00" * 50)),
        "dicom-no-pixel-data": ("nopix.dcm", _dicom(lambda ds: delattr(ds, "PixelData"))),
        "dicom-rgb": ("rgb.dcm", _dicom(_set(SamplesPerPixel=3))),
        "dicom-rows-zero": ("rows0.dcm", _dicom(_set(Rows=0))),
        "dicom-pixel-data-short": ("short.dcm", _dicom(_set(PixelData=b"\x00\x01"))),
        "dicom-rescale-slope-nan": ("slope.dcm", _dicom(_set(RescaleSlope="nan"))),
        "dicom-frames-negative": ("frames.dcm", _dicom(_set(NumberOfFrames="-3"))),
        "dicom-bits-allocated-odd": ("bits.dcm", _dicom(_set(BitsAllocated=7))),
        "dicom-truncated": ("cut.dcm", lambda p: (_dicom(lambda ds: None)(p), p.write_bytes(p.read_bytes()[:400]))),
        "dicom-not-dicom": ("text.dcm", _bytes(b"this is a radiology report, not an image\n" * 20)),
        "series-different-sizes": ("mixed", _dicom_series(lambda k, ds: _set(Rows=4 if k else 8)(ds))),
        "series-uneven-gaps": ("gaps", _dicom_series(_positions([0.0, 1.0, 7.0]))),
        "unknown-suffix": ("scan.xyz", _bytes(b"data")),
        **{b.id: (b.name, b.write) for b in [*BOMBS[:2], *BOMBS[7:9]]},  # header bombs, before decoding
    }
)


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_predict_refuses_a_hostile_image_naming_it(name: str, checkpoint: Path, tmp_path: Path) -> None:
    file_name, write = IMAGE_CASES[name]
    case = tmp_path / "in" / file_name
    case.parent.mkdir()
    write(case)
    result = runner.invoke(
        app, ["predict", "--model", str(checkpoint), "--input", str(case), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "error:" in result.output and file_name in result.output, result.output


# ------------------------------------------------------------ hostile checkpoints


class _Planted:
    """Unpickling this creates a file: evidence that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def _safetensors_header(header: dict[str, Any], payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


def _meta(checkpoint: Path) -> dict[str, Any]:
    return json.loads(checkpoint.with_suffix(".json").read_text())


def _weights(checkpoint: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    from safetensors.torch import load_file, save_file

    def write(path: Path) -> None:
        state = load_file(str(checkpoint))
        change(state)
        save_file(state, str(path))
        path.with_suffix(".json").write_text(checkpoint.with_suffix(".json").read_text())

    return write


def _sidecar(checkpoint: Path, text: str | bytes | Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(checkpoint.read_bytes())
        if callable(text):
            meta = _meta(checkpoint)
            changed = text(meta)
            path.with_suffix(".json").write_text(json.dumps(meta if changed is None else changed))
        else:
            path.with_suffix(".json").write_bytes(text if isinstance(text, bytes) else text.encode())

    return write


def _config_change(section: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        meta["config"].setdefault(section, {})[key] = value

    return change


def _good_sidecar(checkpoint: Path, data: bytes | Callable[[Path], bytes]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data(path) if callable(data) else data)
        path.with_suffix(".json").write_text(checkpoint.with_suffix(".json").read_text())

    return write


def _pickle_payload(path: Path) -> bytes:
    return pickle.dumps({"weight": _Planted(path.parent / "PICKLE_LOADED")})


def _torch_zip_payload(path: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "planted": _Planted(path.parent / "PICKLE_LOADED")}, buffer)
    return buffer.getvalue()


def _checkpoint_cases(checkpoint: Path) -> dict[str, tuple[Callable[[Path], None], str]]:
    """Each case: a writer of ``model.safetensors`` (+ ``.json``) and a word the error must hold."""
    return {
        "pickle-renamed": (_good_sidecar(checkpoint, _pickle_payload), "not a safetensors file"),
        "torch-zip-renamed": (_good_sidecar(checkpoint, _torch_zip_payload), "not a safetensors file"),
        "empty-file": (_good_sidecar(checkpoint, b""), "not a safetensors file"),
        "random-bytes": (_good_sidecar(checkpoint, np.random.default_rng(2).bytes(4096)), "not a safetensors file"),
        "huge-header-length": (_good_sidecar(checkpoint, struct.pack("<Q", 2**62) + b"{}"), "not a safetensors file"),
        "header-not-json": (_good_sidecar(checkpoint, struct.pack("<Q", 5) + b"{{{{{"), "not a safetensors file"),
        "offsets-past-end": (
            _good_sidecar(checkpoint, _safetensors_header({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}})),
            "not a safetensors file",
        ),
        "truncated": (_good_sidecar(checkpoint, lambda p: checkpoint.read_bytes()[:200]), "not a safetensors file"),
        "no-sidecar": (lambda p: p.write_bytes(checkpoint.read_bytes()), "metadata not found"),
        "sidecar-not-json": (_sidecar(checkpoint, "round = 1\n[config]\n"), "not readable JSON"),
        "sidecar-not-utf8": (_sidecar(checkpoint, b"\xff\xfe{\x00"), "not readable JSON"),
        "sidecar-empty": (_sidecar(checkpoint, ""), "not readable JSON"),
        "sidecar-list": (_sidecar(checkpoint, "[1, 2, 3]"), "JSON list"),
        "sidecar-deeply-nested": (_sidecar(checkpoint, "[" * 100_000 + "]" * 100_000), "not readable JSON"),
        "sidecar-no-config": (_sidecar(checkpoint, lambda meta: {"round": 3}), "no 'config' table"),
        "sidecar-config-string": (_sidecar(checkpoint, lambda meta: {**meta, "config": "fast"}), "no 'config' table"),
        "sidecar-unknown-section": (_sidecar(checkpoint, _config_change("bogus", "x", 1)), "unknown section"),
        "sidecar-width-mismatch": (_sidecar(checkpoint, _config_change("model", "width", 16)), "does not fit"),
        "sidecar-depth-mismatch": (_sidecar(checkpoint, _config_change("model", "depth", 3)), "does not fit"),
        "sidecar-classes-mismatch": (_sidecar(checkpoint, _config_change("data", "num-classes", 5)), "does not fit"),
        "sidecar-dims-mismatch": (_sidecar(checkpoint, _config_change("data", "spatial-dims", 3)), "does not fit"),
        "sidecar-channels-mismatch": (_sidecar(checkpoint, _config_change("data", "channels", 3)), "does not fit"),
        "sidecar-task-mismatch": (_sidecar(checkpoint, _config_change("run", "task", "segmentation")), "does not fit"),
        "sidecar-bad-type": (_sidecar(checkpoint, _config_change("model", "width", "wide")), "model.width"),
        "sidecar-negative-size": (_sidecar(checkpoint, _config_change("data", "image-size", -5)), "data.image-size"),
        "sidecar-max-pixels-zero": (_sidecar(checkpoint, _config_change("data", "max-pixels", 0)), "data.max-pixels"),
        "weights-nan": (_weights(checkpoint, lambda s: next(v for v in s.values() if v.is_floating_point()).fill_(float("nan"))), "NaN or Inf"),
        "weights-inf": (_weights(checkpoint, lambda s: next(v for v in reversed(s.values()) if v.is_floating_point()).fill_(float("inf"))), "NaN or Inf"),
        "weights-missing-tensor": (_weights(checkpoint, lambda s: s.pop(next(iter(s)))), "missing"),
        "weights-extra-tensor": (_weights(checkpoint, lambda s: s.update(extra=torch.zeros(3))), "unexpected"),
        "weights-reshaped": (_weights(checkpoint, lambda s: s.update({k: v.reshape(-1) for k, v in list(s.items()) if v.ndim > 1})), "shapes differ"),
        "weights-int-dtype": (_weights(checkpoint, lambda s: s.update({k: v.to(torch.int64) for k, v in list(s.items())[:1]})), ""),
    }  # fmt: skip


CHECKPOINT_NAMES = list(_checkpoint_cases(Path("x")))


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_a_hostile_checkpoint_is_refused_naming_the_file(
    name: str, command: str, checkpoint: Path, tmp_path: Path
) -> None:
    write, expected = _checkpoint_cases(checkpoint)[name]
    model = tmp_path / "model.safetensors"
    write(model)
    if command == "predict":
        image = tmp_path / "scan.png"
        image.write_bytes(_photo(".png"))
        args = ["predict", "--model", str(model), "--input", str(image), "--out", str(tmp_path / "out")]
    else:
        site = write_site(tmp_path / "site", synthetic_site(0, 12, seed=1))
        args = ["evaluate", "--model", str(model), "--data", str(site)]
    result = runner.invoke(app, args)
    if name == "weights-int-dtype":  # an integer tensor is cast to the parameter's dtype by torch: usable
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
        return
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    output = " ".join(result.output.split())
    assert "model.safetensors" in output or "model.json" in output, output
    assert expected in output, output
    assert not (tmp_path / "PICKLE_LOADED").exists(), "a pickle in the checkpoint was loaded"


@pytest.mark.parametrize(
    "name",
    ["pickle-renamed", "sidecar-not-json", "sidecar-list", "weights-nan", "weights-missing-tensor", "no-sidecar"],
)
def test_a_hostile_initial_model_is_refused_before_the_run(name: str, checkpoint: Path, tmp_path: Path) -> None:
    write, _ = _checkpoint_cases(checkpoint)[name]
    model = tmp_path / "model.safetensors"
    write(model)
    config = REPO / "configs" / "classification-synthetic.toml"
    args = ["simulate", str(config), "--set", f"run.initial-model={model}", "--set", "model.width=8",
            "--set", "model.depth=2", "--sites", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "run.initial-model" in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "PICKLE_LOADED").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------- boxes.csv


def _box_site(tmp_path: Path, table: bytes) -> Path:
    site = write_site(tmp_path / "site", synthetic_detection_site(0, 12, 32, seed=1))
    (site / "boxes.csv").write_bytes(table)
    return site


def _first_image(tmp_path: Path) -> str:
    return "images/000000.png"


HEADER = "image,label,xmin,ymin,xmax,ymax\n"
GOOD_ROW = "images/000000.png,0,2,2,10,10\n"
BOX_CASES: dict[str, tuple[bytes, int, str]] = {  # table bytes, exit code, word in the output
    "utf8-bom": (("\ufeff" + HEADER + GOOD_ROW).encode(), 0, "all readable"),
    "utf8-bom-crlf": (("\ufeff" + HEADER + GOOD_ROW).replace("\n", "\r\n").encode(), 0, "all readable"),
    "latin1": ((HEADER + "images/000000.png,lésion,2,2,10,10\n").encode("latin-1"), 1, "not a UTF-8 box table"),
    "utf16": ((HEADER + GOOD_ROW).encode("utf-16"), 1, "not a UTF-8 box table"),
    "cp1252-quotes": ((HEADER + "images/000000.png,“a”,2,2,10,10\n").encode("cp1252"), 1, "not a UTF-8 box table"),
    "invalid-utf8": (HEADER.encode() + b"images/000000.png,\xc3\x28,2,2,10,10\n", 1, "not a UTF-8 box table"),
    "nul-bytes": (HEADER.encode() + b"images/000000.png,0,2\x00,2,10,10\n", 1, "boxes.csv"),
    "huge-field": ((HEADER + "images/000000.png," + "x" * 200_000 + ",2,2,10,10\n").encode(), 1, "boxes.csv"),
    "nan-corners": ((HEADER + "images/000000.png,0,nan,2,10,10\n").encode(), 0, "box dropped"),
    "inf-corners": ((HEADER + "images/000000.png,0,2,2,inf,10\n").encode(), 0, "box dropped"),
    "negative": ((HEADER + "images/000000.png,0,-5,2,10,10\n").encode(), 0, "box dropped"),
    "huge": ((HEADER + "images/000000.png,0,0,0,1e308,1e308\n").encode(), 0, "box dropped"),
    "empty-box": ((HEADER + "images/000000.png,0,5,5,5,9\n").encode(), 0, "box dropped"),
    "inverted": ((HEADER + "images/000000.png,0,10,10,2,2\n").encode(), 0, "box dropped"),
    "text-corner": ((HEADER + "images/000000.png,0,two,2,10,10\n").encode(), 1, "must be numbers"),
    "short-row": ((HEADER + "images/000000.png,0,2\n").encode(), 1, "must be numbers"),
    "unknown-image": ((HEADER + "images/ghost.png,0,2,2,10,10\n").encode(), 1, "ghost.png"),
    "unknown-class": ((HEADER + "images/000000.png,7,2,2,10,10\n").encode(), 1, "class '7'"),
    "missing-columns": (b"image,label\nimages/000000.png,0\n", 1, "missing column"),
    "empty": (b"", 1, "missing column"),
    "bom-only": ("\ufeff".encode(), 1, "missing column"),
    "markup-label": ((HEADER + "images/000000.png,[/],2,2,10,10\n").encode(), 1, "[/]"),
    "markup-image": ((HEADER + "images/[bold]x[/].png,0,2,2,10,10\n").encode(), 1, "[bold]x[/].png"),
}


@pytest.mark.parametrize("name", list(BOX_CASES))
def test_data_check_reads_a_hostile_boxes_csv_clearly(name: str, tmp_path: Path) -> None:
    table, code, word = BOX_CASES[name]
    site = _box_site(tmp_path, table)
    result = runner.invoke(app, ["data", "check", str(site), "--task", "detection", "--image-size", "32"])
    output = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) or result.exception is None
    assert "Traceback" not in result.output and word in output, result.output


_corner = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.text(alphabet="0123456789.-+eEnaif ", max_size=6),
)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.sampled_from(["a.png", "b.png", "c.png"]), st.text(max_size=5), _corner, _corner, _corner, _corner), max_size=8),
    bom=st.booleans(),
)  # fmt: skip
def test_box_table_parser_accepts_or_names_every_row(tmp_path: Path, rows: list[tuple[str, ...]], bom: bool) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "label", "xmin", "ymin", "xmax", "ymax"])
    writer.writerows(rows)
    path = tmp_path / "boxes.csv"
    path.write_bytes(("\ufeff" if bom else "").encode() + buffer.getvalue().encode("utf-8", "surrogatepass"))
    try:
        boxes, problems = read_box_table(path, {"a.png", "b.png"})
    except UnicodeEncodeError:
        return
    assert sum(map(len, boxes.values())) + len(problems) == len(rows)
    assert all(p.where.startswith("boxes.csv line ") for p in problems)


# ------------------------------------------------------- markup in printed text

MARKUP = ["[/]", "[bold]x", "x[/red]", "a\\", "[link=file:///etc]x[/link]", "[@click]y", "\\[/]\\"]


def _render(markup: str) -> str:
    console = Console(file=io.StringIO(), width=10_000, color_system=None, emoji=False, highlight=False)
    console.print(markup, soft_wrap=True)
    return console.file.getvalue()[:-1]  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=500)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab[]/\\@#=:. x\n")), max_size=24),
    template=st.sampled_from(["[bold]{}[/] end", "{}[bold] end[/]", "{} end", "x{}y", "[red]a{}b[/]"]),
)
def test_plain_prints_any_text_as_itself_whatever_markup_surrounds_it(text: str, template: str) -> None:
    expected = template.replace("[bold]", "").replace("[red]", "").replace("[/]", "").format(text)
    assert _render(template.format(plain(text))) == expected


def test_plain_shows_terminal_control_characters_as_escapes() -> None:
    """A DICOM field or file name holding ESC sequences must not recolour or move the terminal."""
    shown = _render(plain("a\x1b[31mred\x07\x9b2J b\nc"))
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert shown == "a\\x1b[31mred\\x07\\x9b2J b\nc"


@settings(max_examples=100, deadline=500)
@given(text=st.text(max_size=30))
def test_plain_text_in_a_table_never_breaks_rendering(text: str) -> None:
    table = Table(title=plain(text))
    table.add_column(plain(text))
    table.add_row(plain(text))
    _render_table = Console(file=io.StringIO(), width=200, emoji=False)
    _render_table.print(table)


def _site_with(tmp_path: Path, folder: str, manifest_edit: Callable[[list[str]], list[str]] | None = None) -> Path:
    site = write_site(tmp_path / folder, synthetic_site(0, 12, seed=1))
    if manifest_edit is not None:
        lines = (site / "manifest.csv").read_text().splitlines()
        (site / "manifest.csv").write_text("\n".join(manifest_edit(lines)) + "\n")
    return site


def _dicom_site_with_description(tmp_path: Path, text: str) -> Path:
    site = _site_with(tmp_path, "dicom-site")
    write = _dicom(_set(SeriesDescription=text, Modality=text[:16], InstitutionName=text))
    write(site / "images" / "d.dcm")
    lines = (site / "manifest.csv").read_text().splitlines()
    lines[1] = "images/d.dcm" + lines[1][lines[1].index(",") :]
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    return site


def _markup_cases() -> list[tuple[str, Callable[[Path, str], tuple[list[str], int, str]]]]:
    """(id, build): build(tmp_path, text) -> (CLI args, exit code, word the output must hold)."""

    def folder_name(tmp: Path, text: str) -> tuple[list[str], int, str]:
        return ["data", "check", str(_site_with(tmp, f"site{text}"))], 0, "samples, all readable"

    def missing_image(tmp: Path, text: str) -> tuple[list[str], int, str]:
        site = _site_with(tmp, "s", lambda lines: [lines[0], f"images/{text}.png,0,train", *lines[2:]])
        return ["data", "check", str(site)], 1, f"images/{text}.png"

    def label_cell(tmp: Path, text: str) -> tuple[list[str], int, str]:
        site = _site_with(
            tmp,
            "s",
            lambda lines: [
                lines[0],
                lines[1].replace(",0,", f",{text},", 1).replace(",1,", f",{text},", 1),
                *lines[2:],
            ],
        )
        return ["data", "check", str(site)], 1, "is not a class index"

    def split_cell(tmp: Path, text: str) -> tuple[list[str], int, str]:
        site = _site_with(
            tmp, "s", lambda lines: [lines[0], *(line.replace("train", text, 1) for line in lines[1:3]), *lines[3:]]
        )
        return ["data", "check", str(site)], 1, "is not one of"

    def dicom_fields(tmp: Path, text: str) -> tuple[list[str], int, str]:
        return ["data", "check", str(_dicom_site_with_description(tmp, text))], 0, "modalities"

    def class_names(tmp: Path, text: str) -> tuple[list[str], int, str]:
        site = write_site(tmp / "boxes", synthetic_detection_site(0, 12, 32, seed=1))
        return (
            ["data", "check", str(site), "--task", "detection", "--image-size", "32", "--class-names", f"{text},b"],
            0,
            "images and boxes",
        )

    def predict_out(tmp: Path, text: str) -> tuple[list[str], int, str]:
        image = tmp / "scan.png"
        image.write_bytes(_photo(".png"))
        return (
            ["predict", "--model", "CHECKPOINT", "--input", str(image), "--out", str(tmp / f"out{text}")],
            0,
            "predictions.csv",
        )

    def predict_input_name(tmp: Path, text: str) -> tuple[list[str], int, str]:
        image = tmp / "in" / f"scan{text}.png"
        image.parent.mkdir(parents=True)
        image.write_bytes(_photo(".png"))
        return (
            ["predict", "--model", "CHECKPOINT", "--input", str(image), "--out", str(tmp / "out")],
            0,
            "predictions.csv",
        )

    def evaluate_folder(tmp: Path, text: str) -> tuple[list[str], int, str]:
        return (
            ["evaluate", "--model", "CHECKPOINT", "--data", str(_site_with(tmp, f"eval{text}")), "--split", "all"],
            0,
            "auroc",
        )

    def synth_out(tmp: Path, text: str) -> tuple[list[str], int, str]:
        return ["data", "synth", "--out", str(tmp / f"synth{text}"), "--sites", "1", "--samples", "10"], 0, "hospital-1"

    def status_dir(tmp: Path, text: str) -> tuple[list[str], int, str]:
        return ["site", "status", "--state-dir", str(tmp / f"state{text}")], 0, "no ledger"

    def fail_message(tmp: Path, text: str) -> tuple[list[str], int, str]:
        return ["simulate", str(tmp / f"missing{text}.toml")], 2, "config file not found"

    return [
        ("folder-name", folder_name),
        ("missing-image", missing_image),
        ("label-cell", label_cell),
        ("split-cell", split_cell),
        ("dicom-description-modality", dicom_fields),
        ("class-names", class_names),
        ("predict-out", predict_out),
        ("predict-input-name", predict_input_name),
        ("evaluate-folder", evaluate_folder),
        ("synth-out", synth_out),
        ("site-status-dir", status_dir),
        ("fail-message", fail_message),
    ]


MARKUP_CASES = [(f"{name}-{k}", build, text) for name, build in _markup_cases() for k, text in enumerate(MARKUP)]


@pytest.mark.parametrize(("name", "build", "text"), MARKUP_CASES, ids=[c[0] for c in MARKUP_CASES])
def test_markup_in_any_printed_field_prints_as_itself(
    name: str, build: Callable[[Path, str], tuple[list[str], int, str]], text: str, checkpoint: Path, tmp_path: Path
) -> None:
    args, code, word = build(tmp_path, text)  # a '/' in a file or folder name makes nested folders
    args = [str(checkpoint) if a == "CHECKPOINT" else a for a in args]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    assert word in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("text", MARKUP)
def test_the_simulation_summary_prints_site_names_as_themselves(text: str) -> None:
    report = {
        "primary_metric": "auroc",
        "sites": [f"north{text}", "south"],
        "rounds": [{"metrics": {f"north{text}": {"auroc": 0.5}}}],
        "final": {
            "per_site": {f"north{text}": {"auroc": 0.7}, "south": {"auroc": 0.6}},
            "operating_point": {"threshold": 0.5, "method": "youden", "per_site": {f"north{text}": {"threshold": 0.4}}},
            "cross_site": {"metric": "auroc", "models": [f"north{text}", "global"], "sites": [f"north{text}", "south"], "matrix": [[0.5, 0.6], [0.7, 0.8]]},
        },
        "privacy": {},
        "config": {"privacy": {"enabled": True}},
    }  # fmt: skip
    recorded = Console(file=io.StringIO(), width=300, emoji=False, color_system=None)
    print_summary(recorded, report)
    assert f"north{text}" in recorded.file.getvalue()  # type: ignore[attr-defined]


def test_mask_preprocess_default_is_the_config_default() -> None:
    assert DEFAULT_PREPROCESS.max_pixels == tiny_config().data.max_pixels == 64 * 1024 * 1024


def test_a_data_error_lists_a_size_bomb_among_the_site_problems(tmp_path: Path) -> None:
    from medfed.data import read_site
    from medfed.data.preflight import problem_kind

    site = _site_with(tmp_path, "site")
    (site / "images" / "bomb.png").write_bytes(_png_bytes(20000, 20000))
    lines = (site / "manifest.csv").read_text().splitlines()
    lines[1] = "images/bomb.png" + lines[1][lines[1].index(",") :]
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as raised:
        read_site(site, SiteReading(28, 2))
    assert "bomb.png" in str(raised.value)
    assert problem_kind(raised.value.problems[0]) == "image larger than data.max-pixels"
