"""A generated corpus of hostile input to ``medfed data import``: what an adversary or a careless
user feeds each import surface (Pascal VOC, COCO, image + mask folders, an image folder with a
labels table, a DICOM export, MedMNIST, and the options). Every case ends with exit code 2 (a
setting is wrong) or 1 (the data is), or 0 where the input is legitimately fine (said per case),
never with a traceback, a hang, a file created or changed outside the output folder, or a byte of
the files planted outside the source in the output. Plus property tests (hypothesis) of the
boundary functions: the path resolver, the patient-pattern matcher, the split fractions."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from medfed.cli import app
from medfed.data.import_guard import PatientPattern, UnsafePath, check_fractions, resolve_inside
from medfed.data.medical_io import write_dicom_series
from medfed.data.pseudonyms import pseudonym, site_key
from tests.conftest import time_limit

SENTINEL = b"ZZOUTSIDE-SECRET-7731"  # planted in every file outside the source: must never reach the output
PATIENT_ID = "ZZPATIENT-0042"
DESCRIPTION = "ZZDESCRIPTION [bold]Smith follow-up[/]"
Build = Callable[[Path], list[str]]  # writes a case's input under a root folder, returns the import arguments


@dataclass(frozen=True)
class Case:
    """One hostile input: ``build`` writes it, the import must exit with ``code`` and print ``words``
    (short key words: a console may wrap long paths); ``verify`` checks the root afterwards."""

    name: str
    build: Build
    code: int
    words: tuple[str, ...] = ()
    verify: Callable[[Path], None] | None = None
    slow: bool = False


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """Any single case taking over 60 s is a hang."""
    with time_limit(60, "a hostile input"):
        yield


# ---------------------------------------------------------------------------------------------
# Writers of inputs


def _png(path: Path, size: tuple[int, int] = (40, 30), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


def _outside(root: Path) -> Path:
    """Files an adversary points the import at, each carrying :data:`SENTINEL` (a PNG ignores bytes after its end)."""
    folder = root / "outside"
    _png(folder / "evil.png")
    with (folder / "evil.png").open("ab") as handle:
        handle.write(SENTINEL)
    (folder / "evil.xml").write_bytes(
        b"<annotation><filename>evil.png</filename><!-- " + SENTINEL + b" --></annotation>"
    )
    (folder / "secret.txt").write_bytes(SENTINEL)
    return folder


def _voc_xml(filename: str, boxes: str = "") -> str:
    body = (
        boxes
        or "<object><name>cell</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>12</xmax><ymax>13</ymax></bndbox></object>"
    )
    return f"<annotation><filename>{filename}</filename><size><width>40</width><height>30</height></size>{body}</annotation>"


def _voc(root: Path, images: int = 4) -> Path:
    """A Pascal VOC folder of ``images`` annotated PNGs, plus the planted outside files."""
    _outside(root)
    voc = root / "src" / "voc"
    for k in range(images):
        _png(voc / "JPEGImages" / f"i{k}.png", value=60 + 10 * k)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"i{k}.xml").write_text(_voc_xml(f"i{k}.png"))
    return voc


def _import_args(source: Path, kind: str, root: Path, *extra: str) -> list[str]:
    return [str(source), "--from", kind, "--out", str(root / "out"), *extra]


def _coco(root: Path, file_names: list[object] | None = None, **replace: object) -> Path:
    """A COCO file of 4 images (``images/`` beside it) with one box each; ``replace`` swaps top-level keys."""
    _outside(root)
    folder = root / "src" / "coco"
    for k in range(4):
        _png(folder / "images" / f"c{k}.png", value=50 + 20 * k)
    names = file_names if file_names is not None else [f"c{k}.png" for k in range(4)]
    data: dict[str, object] = {
        "images": [{"id": k, "file_name": name, "width": 40, "height": 30} for k, name in enumerate(names)],
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": [{"image_id": k, "category_id": 1, "bbox": [2, 3, 10, 10]} for k in range(len(names))],
    }
    data.update(replace)
    (folder / "instances.json").write_text(json.dumps(data))
    return folder / "instances.json"


def _pairs(root: Path, names: tuple[str, ...] = ("case_0", "case_1", "case_2", "case_3")) -> Path:
    """An ``images/`` + ``masks/`` folder pair, one PNG each per name (a square in the mask)."""
    _outside(root)
    src = root / "src" / "pairs"
    (src / "masks").mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        _png(src / "images" / f"{name}.png", (24, 24), 40 + 30 * k)
        mask = np.zeros((24, 24), np.uint8)
        mask[4:12, 4:12] = 1
        Image.fromarray(mask).save(src / "masks" / f"{name}.png")
    return src


def _labelled(root: Path, rows: list[list[str]] | str | bytes, images: int = 4) -> list[str]:
    """An image folder of ``images`` PNGs and a labels table (rows below the header, or raw text/bytes)."""
    _outside(root)
    folder = root / "src" / "photos"
    for k in range(images):
        _png(folder / f"p{k}.png", (24, 24), 40 + 30 * k)
    table = root / "src" / "labels.csv"
    if isinstance(rows, bytes):
        table.write_bytes(rows)
    elif isinstance(rows, str):
        table.write_text(rows, encoding="utf-8")
    else:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["image", "label"], *rows])
        table.write_text(buffer.getvalue(), encoding="utf-8")
    return _import_args(folder, "image-mask", root, "--labels", str(table))


def _good_rows(images: int = 4) -> list[list[str]]:
    return [[f"p{k}.png", str(k % 2)] for k in range(images)]


_DICOM_TEMPLATE: dict[str, Path] = {}


def _dicom_template(root: Path) -> Path:
    """A PACS-like export of 3 CT series of 3 patients (no file extensions), written once per session."""
    if "export" in _DICOM_TEMPLATE:
        return _DICOM_TEMPLATE["export"]
    template = root.parent / "dicom-template"
    volume = np.full((3, 12, 12), -500, np.int16)
    volume[1, 3:8, 3:8] = 300
    for k in range(3):
        paths = write_dicom_series(volume + 10 * k, template / f"tmp{k}", spacing=(2.0, 0.8, 0.8))
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName, ds.AccessionNumber = f"{PATIENT_ID}-{k}", "Zyx^Sentinel", f"ACC{k}"
            ds.SeriesDescription = DESCRIPTION
            target = template / "export" / f"study{k}" / path.stem
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
        shutil.rmtree(template / f"tmp{k}")
    labels = template / "labels.csv"
    labels.write_text("AccessionNumber,label\nACC0,0\nACC1,1\nACC2,0\n")
    _DICOM_TEMPLATE["export"] = template / "export"
    return template / "export"


def _dicom(root: Path, *extra: str) -> list[str]:
    """A copy of the DICOM template export under ``root/src``, imported for classification by its labels table."""
    _outside(root)
    template = _dicom_template(root)
    export = root / "src" / "export"
    shutil.copytree(template, export)
    shutil.copy(template.parent / "labels.csv", root / "src" / "labels.csv")
    return _import_args(export, "dicom", root, "--labels", str(root / "src" / "labels.csv"), *extra)


def _outside_dicom(root: Path) -> Path:
    """A DICOM file outside the export, of a patient the export must not bring in."""
    export = _dicom_template(root)
    evil = root / "outside" / "evil.dcm"
    ds = pydicom.dcmread(next(export.glob("study0/*")))
    ds.PatientID = SENTINEL.decode()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(evil, enforce_file_format=True)
    return evil


def _medmnist(root: Path, writer: Callable[[Path], None]) -> list[str]:
    path = root / "src" / "set.npz"
    path.parent.mkdir(parents=True)
    writer(path)
    return _import_args(path, "medmnist", root)


def _valid_npz(path: Path, **arrays: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    content = {}
    for split in ("train", "val", "test"):
        content[f"{split}_images"] = rng.integers(0, 255, (6, 8, 8), dtype=np.uint8)
        content[f"{split}_labels"] = rng.integers(0, 2, (6, 1))
    content.update(arrays)
    np.savez(path, **content)


# ---------------------------------------------------------------------------------------------
# Checks run after cases that are legitimately fine


def _manifest(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _rows(count: int) -> Callable[[Path], None]:
    def verify(root: Path) -> None:
        assert len(_manifest(root / "out")) == count

    return verify


def _dicom_without_free_text(root: Path) -> None:
    """No description, name or patient id reached the site folder; patients are the site key's HMACs."""
    key = site_key(root / "keys" / "site.key", root / "out")
    rows = _manifest(root / "out")
    assert {row["patient_id"] for row in rows} == {pseudonym(key, f"{PATIENT_ID}-{k}") for k in range(3)}
    unsalted = {"p-" + hashlib.sha256(f"{PATIENT_ID}-{k}".encode()).hexdigest()[:12] for k in range(3)}
    assert not unsalted & {row["patient_id"] for row in rows}
    for path in (root / "out").rglob("*"):
        data = path.read_bytes() if path.is_file() else b""
        data = gzip.decompress(data) if path.name.endswith(".gz") else data
        for secret in (b"ZZDESCRIPTION", b"Smith", PATIENT_ID.encode(), b"Sentinel", b"ZZUIDTEXT"):
            assert secret not in data, f"{secret!r} in {path.name}"


def _key_mode_600(root: Path) -> None:
    assert stat.S_IMODE((root / "keys" / "site.key").stat().st_mode) == 0o600


# ---------------------------------------------------------------------------------------------
# The corpus

# A name an annotation, a COCO file or a labels table may give an image: (name, key word of the
# error). ``{root}`` and ``{images}`` are filled in per case; the images folder also holds the
# links and the folder that some names refer to (:func:`_plant`).
HOSTILE_NAMES: dict[str, tuple[str, str]] = {
    "dotdot-3-levels": ("../../../outside/evil.png", "outside"),
    "dotdot-1-level": ("../outside/evil.png", "outside"),
    "dotdot-40-levels": ("../" * 40 + "etc/hostname", "outside"),
    "dotdot-proc": ("../../../../../../proc/self/environ", "outside"),
    "dotdot-inner": ("sub/../../../../outside/evil.png", "outside"),
    "dotdot-dot-slash": ("./../../../outside/evil.png", "outside"),
    "dotdot-double-slash": ("..//..//..//outside//evil.png", "outside"),
    "dotdot-alone": ("..", "outside"),
    "absolute-outside": ("{root}/outside/evil.png", "absolute"),
    "absolute-etc": ("/etc/hostname", "absolute"),
    "absolute-dev-zero": ("/dev/zero", "absolute"),
    "absolute-inside": ("{images}/{first}", "absolute"),
    "dot": (".", "not"),
    "spaces-only": ("   ", ""),
    "long-256-bytes": ("x" * 252 + ".png", "255"),
    "long-4000-bytes": ("y" * 3996 + ".png", "255"),
    "long-multibyte": ("é" * 130 + ".png", "255"),
    "long-path-many-parts": ("/".join(["d" * 200] * 30) + "/x.png", "does not exist"),
    "backslashes": ("..\\..\\..\\outside\\evil.png", "does not exist"),
    "file-url": ("file:///etc/passwd", "does not exist"),
    "tilde-home": ("~/evil.png", "does not exist"),
    "percent-encoded": ("%2e%2e/%2e%2e/outside/evil.png", "does not exist"),
    "markup": ("[bold]scan[/].png", "[bold]scan[/].png"),
    "markup-close-only": ("[/]", "[/]"),
    "emoji-code": (":skull:.png", ":skull:.png"),
    "right-to-left": ("\u202egnp.evil", "does not exist"),
    "zero-width": ("i0\u200b.png", "does not exist"),
    "symlink-out": ("link-out.png", "outside"),
    "symlink-loop": ("loop.png", "loop"),
    "symlink-dangling": ("gone.png", "does not exist"),
    "symlink-folder-out": ("link-dir/evil.png", "outside"),
    "folder": ("sub", "not"),
    "fifo": ("pipe.png", "not"),
}


def _plant(images: Path, root: Path) -> None:
    """Links, a folder and a named pipe inside an images folder, for the names above to point at."""
    images.mkdir(parents=True, exist_ok=True)
    os.symlink(root / "outside" / "evil.png", images / "link-out.png")
    os.symlink("loop.png", images / "loop.png")
    os.symlink("nothing-here.png", images / "gone.png")
    os.symlink(root / "outside", images / "link-dir")
    (images / "sub").mkdir()
    os.mkfifo(images / "pipe.png")


def _fill(name: str, root: Path, images: Path, first: str) -> str:
    return name.replace("{root}", str(root)).replace("{images}", str(images)).replace("{first}", first)


def _voc_name_case(name: str) -> Build:
    def build(root: Path) -> list[str]:
        voc = _voc(root)
        _plant(voc / "JPEGImages", root)
        filled = _fill(name, root, voc / "JPEGImages", "i0.png")
        escaped = filled.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        (voc / "Annotations" / "hostile.xml").write_text(_voc_xml(escaped), encoding="utf-8")
        return _import_args(voc, "voc", root)

    return build


def _coco_name_case(name: str) -> Build:
    def build(root: Path) -> list[str]:
        folder = root / "src" / "coco"
        _plant(folder / "images", root)
        filled = _fill(name, root, folder / "images", "c0.png")
        return _import_args(_coco(root, ["c0.png", "c1.png", "c2.png", filled]), "coco", root)

    return build


def _labels_name_case(name: str) -> Build:
    def build(root: Path) -> list[str]:
        images = root / "src" / "photos"
        _plant(images, root)
        return _labelled(root, [*_good_rows(), [_fill(name, root, images, "p0.png"), "1"]])

    return build


def _name_cases() -> list[Case]:
    cases = []
    for key, (name, word) in HOSTILE_NAMES.items():
        cases.append(Case(f"voc-filename-{key}", _voc_name_case(name), 1, ("hostile.xml", word)))
        cases.append(Case(f"coco-file_name-{key}", _coco_name_case(name), 1, ("instances.json", word)))
        # a folder in a labels table is a DICOM series: this empty one is copied, then fails the check
        labels_words = ("fails the pre-flight check",) if key == "folder" else ("labels.csv line 6", word)
        cases.append(Case(f"labels-image-{key}", _labels_name_case(name), 1, labels_words))
    return cases


def _voc_cases() -> list[Case]:
    def with_annotation(name: str, content: str | bytes) -> Build:
        def build(root: Path) -> list[str]:
            voc = _voc(root)
            path = voc / "Annotations" / name
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
            return _import_args(voc, "voc", root)

        return build

    def changed(change: Callable[[Path, Path], None]) -> Build:
        def build(root: Path) -> list[str]:
            voc = _voc(root)
            change(voc, root)
            return _import_args(voc, "voc", root)

        return build

    laughs = (
        '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        + "".join(f'<!ENTITY {chr(98 + k)} "{("&" + chr(97 + k) + ";") * 10}">' for k in range(9))
        + "]><annotation><filename>&j;</filename></annotation>"
    )
    valid = _voc_xml("i0.png").encode()
    box = "<object><name>cell</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
    cases = [
        Case("voc-xml-empty", with_annotation("bad.xml", b""), 1, ("bad.xml", "not a readable")),
        Case("voc-xml-garbage", with_annotation("bad.xml", bytes(range(256)) * 4), 1, ("bad.xml",)),
        Case("voc-xml-truncated", with_annotation("bad.xml", valid[: len(valid) // 2]), 1, ("bad.xml",)),
        Case("voc-xml-is-json", with_annotation("bad.xml", '{"filename": "i0.png"}'), 1, ("bad.xml",)),
        Case("voc-xml-billion-laughs", with_annotation("bad.xml", laughs), 1, ("bad.xml",)),
        Case(
            "voc-xml-external-entity",
            with_annotation(
                "bad.xml",
                '<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation><filename>&x;</filename></annotation>',
            ),
            1,
            ("bad.xml",),
        ),
        Case("voc-xml-nested-20k", with_annotation("bad.xml", "<a>" * 20_000 + "</a>" * 20_000), 1, ("bad.xml",)),
        Case("voc-xml-nul-char-ref", with_annotation("bad.xml", _voc_xml("i0&#0;.png")), 1, ("bad.xml",)),
        Case(
            "voc-xml-no-filename", with_annotation("bad.xml", "<annotation><size/></annotation>"), 1, ("no <filename>",)
        ),
        Case("voc-xml-empty-filename", with_annotation("bad.xml", _voc_xml("")), 1, ("no <filename>",)),
        Case(
            "voc-xml-10mb-filename",
            with_annotation("bad.xml", _voc_xml("z" * 10_000_000)),
            1,
            ("bad.xml", "255"),
            slow=True,
        ),
        Case("voc-box-text", with_annotation("bad.xml", _voc_xml("i1.png", box.format("a", 1, 2, 3))), 1, ("numbers",)),
        Case(
            "voc-box-missing",
            with_annotation("bad.xml", _voc_xml("i1.png", "<object><name>x</name></object>")),
            1,
            ("numbers",),
        ),
        Case(
            "voc-object-without-name",
            with_annotation("bad.xml", _voc_xml("i1.png", box.format(1, 1, 5, 5).replace("<name>cell</name>", ""))),
            1,
            ("no <name>",),
        ),
        Case("voc-image-annotated-twice", with_annotation("again.xml", _voc_xml("i1.png")), 1, ("annotated again",)),
        Case(
            "voc-annotation-filename-is-an-xml",
            with_annotation("bad.xml", _voc_xml("../Annotations/i0.xml")),
            1,
            ("outside",),
        ),
        Case(
            "voc-annotation-symlink-out",
            changed(lambda voc, root: os.symlink(root / "outside" / "evil.xml", voc / "Annotations" / "link.xml")),
            1,
            ("link.xml", "outside"),
        ),
        Case(
            "voc-annotation-symlink-loop",
            changed(lambda voc, root: os.symlink("loop.xml", voc / "Annotations" / "loop.xml")),
            1,
            ("loop.xml", "loop"),
        ),
        Case(
            "voc-annotation-fifo-is-skipped-others-fine",
            changed(lambda voc, root: os.mkfifo(voc / "Annotations" / "pipe.xml")),
            0,
            verify=_rows(4),
        ),
        Case(
            "voc-annotations-folder-symlink-out",
            changed(
                lambda voc, root: (
                    shutil.rmtree(voc / "Annotations"),
                    os.symlink(root / "outside", voc / "Annotations"),
                )
            ),
            1,
            ("Annotations", "outside"),
        ),
        Case(
            "voc-images-folder-symlink-out",
            changed(
                lambda voc, root: (shutil.rmtree(voc / "JPEGImages"), os.symlink(root / "outside", voc / "JPEGImages"))
            ),
            1,
            ("JPEGImages", "outside"),
        ),
        Case(
            "voc-images-folder-loop",
            changed(
                lambda voc, root: (shutil.rmtree(voc / "JPEGImages"), os.symlink("JPEGImages", voc / "JPEGImages"))
            ),
            1,
            ("JPEGImages", "loop"),
        ),
        Case(
            "voc-no-annotations",
            changed(lambda voc, root: [p.unlink() for p in (voc / "Annotations").iterdir()]),
            1,
            ("no Pascal VOC",),
        ),
        Case(
            "voc-image-garbage",
            changed(lambda voc, root: (voc / "JPEGImages" / "i1.png").write_bytes(b"\x89PNG garbage")),
            1,
            ("i1.png", "unreadable"),
        ),
        Case(
            "voc-image-empty-file",
            changed(lambda voc, root: (voc / "JPEGImages" / "i1.png").write_bytes(b"")),
            1,
            ("i1.png",),
        ),
        Case(
            "voc-image-size-not-as-annotated",
            changed(lambda voc, root: _png(voc / "JPEGImages" / "i1.png", (20, 20))),
            1,
            ("i1.png", "40x30"),
        ),
        Case(
            "voc-markup-and-emoji-names-fine",
            changed(_voc_odd_names),
            0,
            verify=_rows(4),
        ),
    ]
    return cases


def _voc_odd_names(voc: Path, root: Path) -> None:
    """Rename the images and their annotations to names full of markup, emoji codes, commas and quotes."""
    for k, name in enumerate(["[bold]a[red]b", ":skull: b", 'c, "quoted"', "d\u202eé"]):
        (voc / "JPEGImages" / f"i{k}.png").rename(voc / "JPEGImages" / f"{name}.png")
        escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
        (voc / "Annotations" / f"i{k}.xml").write_text(_voc_xml(f"{escaped}.png"), encoding="utf-8")


def _coco_cases() -> list[Case]:
    def raw(text: str | bytes) -> Build:
        def build(root: Path) -> list[str]:
            path = _coco(root)
            path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
            return _import_args(path, "coco", root)

        return build

    def replaced(**keys: object) -> Build:
        return lambda root: _import_args(_coco(root, **keys), "coco", root)

    def named(names: list[object]) -> Build:
        return lambda root: _import_args(_coco(root, names), "coco", root)

    images = [{"id": k, "file_name": f"c{k}.png"} for k in range(4)]
    good = json.dumps({"images": images, "categories": [{"id": 1, "name": "c"}], "annotations": []})
    cases = [
        Case("coco-empty-file", raw(b""), 1, ("instances.json", "not a COCO")),
        Case("coco-truncated", raw(good[: len(good) // 2]), 1, ("instances.json", "not a COCO")),
        Case("coco-garbage-bytes", raw(bytes(range(256))), 1, ("instances.json",)),
        Case("coco-utf8-bom", raw(b"\xef\xbb\xbf" + good.encode()), 1, ("instances.json",)),
        Case("coco-top-level-list", raw("[1, 2, 3]"), 1, ("not a COCO",)),
        Case("coco-nested-100k", raw("[" * 100_000 + "]" * 100_000), 1, ("not a COCO",)),
        Case("coco-int-5000-digits", raw('{"images": ' + "1" * 5000 + "}"), 1, ("not a COCO",)),
        Case("coco-images-not-a-list", replaced(images=7), 1, ("not a COCO",)),
        Case("coco-images-a-dict", replaced(images={"a": 1}), 1, ("not a COCO",)),
        Case("coco-no-categories", raw(json.dumps({"images": images, "annotations": []})), 1, ("not a COCO",)),
        Case("coco-category-id-a-list", replaced(categories=[{"id": [1], "name": "c"}]), 1, ("not a COCO",)),
        Case("coco-image-id-a-dict", replaced(images=[{"id": {}, "file_name": "c0.png"}]), 1, ("not a COCO",)),
        Case(
            "coco-bbox-text",
            replaced(annotations=[{"image_id": 0, "category_id": 1, "bbox": ["a", 1, 2, 3]}]),
            1,
            ("annotation 0",),
        ),
        Case(
            "coco-bbox-3-numbers",
            replaced(annotations=[{"image_id": 0, "category_id": 1, "bbox": [1, 2, 3]}]),
            1,
            ("annotation 0",),
        ),
        Case(
            "coco-bbox-nested",
            replaced(annotations=[{"image_id": 0, "category_id": 1, "bbox": [[1], 2, 3, 4]}]),
            1,
            ("annotation 0",),
        ),
        Case(
            "coco-annotation-unknown-image",
            replaced(annotations=[{"image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4]}]),
            1,
            ("image_id 99",),
        ),
        Case(
            "coco-annotation-unknown-category",
            replaced(annotations=[{"image_id": 0, "category_id": 9, "bbox": [1, 2, 3, 4]}]),
            1,
            ("category_id 9",),
        ),
        Case("coco-file_name-a-number", named(["c0.png", "c1.png", "c2.png", 3]), 1, ("is empty",)),
        Case("coco-file_name-a-list", named(["c0.png", "c1.png", "c2.png", ["c3.png"]]), 1, ("is empty",)),
        Case("coco-file_name-null", named(["c0.png", "c1.png", "c2.png", None]), 1, ("is empty",)),
        Case("coco-file_name-nul-byte", named(["c0.png", "c1.png", "c2.png", "c3.png\u0000.txt"]), 1, ("NUL",)),
        Case("coco-file_name-lone-surrogate", raw(good.replace("c3.png", "\\ud800.png")), 1, ("UTF-8",)),
        Case("coco-duplicate-file_name", named(["c0.png", "c1.png", "c2.png", "c0.png"]), 1, ("annotated again",)),
        Case(
            "coco-duplicate-through-dotdot", named(["c0.png", "c1.png", "c2.png", "./c0.png"]), 1, ("annotated again",)
        ),
        Case("coco-no-images", replaced(images=[], annotations=[]), 1, ("no annotated images",)),
        Case("coco-src-is-a-folder", lambda root: _import_args(_coco(root).parent, "coco", root), 2, ("COCO .json",)),
        Case(
            "coco-images-folder-symlink-out",
            lambda root: _coco_images_out(root),
            1,
            ("images", "outside"),
        ),
        Case(
            "coco-images-option-missing",
            lambda root: [*_import_args(_coco(root), "coco", root), "--images", str(root / "nope")],
            2,
            ("--images",),
        ),
        Case(
            "coco-nan-and-infinite-boxes-dropped-fine",
            replaced(
                annotations=[
                    {"image_id": 0, "category_id": 1, "bbox": [float("nan"), 1, 2, 3]},
                    {"image_id": 1, "category_id": 1, "bbox": [float("inf"), 1, 2, 3]},
                    {"image_id": 2, "category_id": 1, "bbox": [2, 3, 10, 10]},
                ]
            ),
            0,
            verify=_rows(4),
        ),
    ]
    return cases


def _coco_images_out(root: Path) -> list[str]:
    path = _coco(root)
    shutil.rmtree(path.parent / "images")
    os.symlink(root / "outside", path.parent / "images")
    return _import_args(path, "coco", root)


def _pairs_cases() -> list[Case]:
    def changed(change: Callable[[Path, Path], object], names: tuple[str, ...] | None = None) -> Build:
        def build(root: Path) -> list[str]:
            src = _pairs(root, names) if names else _pairs(root)
            change(src, root)
            return _import_args(src, "image-mask", root)

        return build

    def relink(path: Path, target: Path | str) -> None:
        path.unlink()
        os.symlink(target, path)

    def replace_folder(src: Path, name: str, target: Path | str) -> None:
        shutil.rmtree(src / name)
        os.symlink(target, src / name)

    def outside_pairs(root: Path) -> Path:
        other = _pairs(root / "elsewhere")
        return other

    cases = [
        Case(
            "pairs-image-symlink-to-system-file",
            changed(lambda s, r: relink(s / "images" / "case_0.png", "/etc/hostname")),
            1,
            ("case_0.png", "outside"),
        ),
        Case(
            "pairs-image-symlink-out",
            changed(lambda s, r: relink(s / "images" / "case_0.png", r / "outside" / "evil.png")),
            1,
            ("case_0.png", "outside"),
        ),
        Case(
            "pairs-mask-symlink-out",
            changed(lambda s, r: relink(s / "masks" / "case_1.png", r / "outside" / "evil.png")),
            1,
            ("case_1.png", "outside"),
        ),
        Case(
            "pairs-image-symlink-relative-out",
            changed(lambda s, r: relink(s / "images" / "case_0.png", "../../../outside/evil.png")),
            1,
            ("case_0.png", "outside"),
        ),
        Case(
            "pairs-image-symlink-loop",
            changed(lambda s, r: relink(s / "images" / "case_0.png", "case_0.png")),
            1,
            ("case_0.png", "loop"),
        ),
        Case(
            "pairs-mask-symlink-loop-of-two",
            changed(
                lambda s, r: (
                    relink(s / "masks" / "case_0.png", "case_1.png"),
                    relink(s / "masks" / "case_1.png", "case_0.png"),
                )
            ),
            1,
            ("loop",),
        ),
        Case(
            "pairs-image-symlink-dangling",
            changed(lambda s, r: relink(s / "images" / "case_0.png", "missing.png")),
            1,
            ("case_0.png", "does not exist"),
        ),
        Case(
            "pairs-images-folder-symlink-out",
            changed(lambda s, r: replace_folder(s, "images", outside_pairs(r) / "images")),
            1,
            ("images", "outside"),
        ),
        Case(
            "pairs-masks-folder-symlink-out",
            changed(lambda s, r: replace_folder(s, "masks", outside_pairs(r) / "masks")),
            1,
            ("masks", "outside"),
        ),
        Case(
            "pairs-images-folder-loop",
            changed(lambda s, r: replace_folder(s, "images", "images")),
            1,
            ("images", "loop"),
        ),
        Case(
            "pairs-images-is-a-file",
            changed(lambda s, r: (shutil.rmtree(s / "images"), (s / "images").write_text("x"))),
            2,
            ("masks",),
        ),
        Case(
            "pairs-no-folders",
            lambda root: _import_args((root / "src").mkdir(parents=True) or root / "src", "image-mask", root),
            2,
            ("--masks",),
        ),
        Case(
            "pairs-images-empty",
            changed(lambda s, r: [p.unlink() for p in (s / "images").iterdir()]),
            1,
            ("no image files",),
        ),
        Case(
            "pairs-image-without-mask",
            changed(lambda s, r: (s / "masks" / "case_2.png").unlink()),
            1,
            ("case_2.png", "no mask"),
        ),
        Case(
            "pairs-mask-without-image",
            changed(lambda s, r: (s / "images" / "case_2.png").unlink()),
            1,
            ("case_2.png", "mask without an image"),
        ),
        Case(
            "pairs-two-masks-for-one-image",
            changed(lambda s, r: shutil.copy(s / "masks" / "case_1.png", s / "masks" / "case_1-b.png")),
            1,
            ("case_1.png", "2 masks"),
        ),
        Case(
            "pairs-image-garbage",
            changed(lambda s, r: (s / "images" / "case_1.png").write_bytes(os.urandom(64))),
            1,
            ("case_1.png",),
        ),
        Case(
            "pairs-image-empty-file",
            changed(lambda s, r: (s / "images" / "case_1.png").write_bytes(b"")),
            1,
            ("case_1.png",),
        ),
        Case(
            "pairs-mask-wrong-size",
            changed(lambda s, r: _png(s / "masks" / "case_1.png", (9, 5), 1)),
            1,
            ("case_1.png",),
        ),
        Case(
            "pairs-mask-values-out-of-range",
            changed(lambda s, r: _png(s / "masks" / "case_1.png", (24, 24), 200)),
            1,
            ("case_1.png",),
        ),
        Case(
            "pairs-image-is-a-fifo",
            changed(lambda s, r: ((s / "images" / "case_1.png").unlink(), os.mkfifo(s / "images" / "case_1.png"))),
            1,
            ("case_1.png", "mask without an image"),
        ),
        Case(
            "pairs-image-is-a-folder",
            changed(lambda s, r: ((s / "images" / "case_1.png").unlink(), (s / "images" / "case_1.png").mkdir())),
            1,
            ("case_1.png", "mask without an image"),
        ),
        Case("pairs-undecodable-file-name", changed(lambda s, r: _bytes_name_pair(s)), 1, ("UTF-8",)),
        Case(
            "pairs-nifti-only-refuses-png", lambda root: _import_args(_pairs(root), "nifti", root), 1, ("not a NIfTI",)
        ),
        Case(
            "pairs-image-symlink-inside-fine",
            changed(lambda s, r: relink(s / "images" / "case_0.png", "case_1.png")),
            0,
            verify=_rows(4),
        ),
        Case(
            "pairs-odd-names-fine",
            lambda root: _import_args(_pairs(root, ODD_NAMES), "image-mask", root),
            0,
            verify=_rows(4),
        ),
        Case("pairs-500-garbage-images", changed(_many_garbage), 1, ("error",), slow=True),
    ]
    return cases


ODD_NAMES = ("[bold]a[red]b", ":skull: b", 'c, "q"', "d\nnewline é\u202e")


def _bytes_name_pair(src: Path) -> None:
    for sub in ("images", "masks"):
        shutil.copy(src / sub / "case_0.png", os.path.join(os.fsencode(src / sub), b"case_\xff.png"))


def _many_garbage(src: Path, root: Path) -> None:
    for k in range(500):
        (src / "images" / f"g{k}.png").write_bytes(b"garbage")
        (src / "masks" / f"g{k}.png").write_bytes(b"garbage")


def _labels_cases() -> list[Case]:
    def folder_with_link_out(root: Path) -> list[str]:
        args = _labelled(root, [*_good_rows(), ["series", "1"]])
        (root / "src" / "photos" / "series").mkdir()
        _png(root / "src" / "photos" / "series" / "s0.png")
        os.symlink(root / "outside" / "secret.txt", root / "src" / "photos" / "series" / "s1.png")
        return args

    def folder_with_folder_link(root: Path) -> list[str]:
        args = _labelled(root, [*_good_rows(), ["series", "1"]])
        (root / "src" / "photos" / "series").mkdir()
        os.symlink(root / "src" / "photos", root / "src" / "photos" / "series" / "up")
        return args

    header = "image,label\n"
    return [
        Case(
            "labels-duplicate-row", lambda root: _labelled(root, [*_good_rows(), ["p1.png", "1"]]), 1, ("listed again",)
        ),
        Case(
            "labels-duplicate-through-dotdot",
            lambda root: _labelled(root, [*_good_rows(), ["./p1.png", "1"]]),
            1,
            ("listed again",),
        ),
        Case("labels-label-text", lambda root: _labelled(root, [["p0.png", "tumour"]]), 1, ("tumour",)),
        Case("labels-label-negative", lambda root: _labelled(root, [["p0.png", "-1"]]), 1, ("'-1'",)),
        Case("labels-label-empty", lambda root: _labelled(root, [["p0.png", ""]]), 1, ("line 2",)),
        Case("labels-label-markup", lambda root: _labelled(root, [["p0.png", "[bold]1[/]"]]), 1, ("[bold]1[/]",)),
        Case("labels-label-huge", lambda root: _labelled(root, [*_good_rows(), ["p0.png", "9" * 40]]), 1, ()),
        Case("labels-header-only", lambda root: _labelled(root, header), 1, ("no rows",)),
        Case("labels-empty-file", lambda root: _labelled(root, ""), 1, ("labels.csv",)),
        Case("labels-missing-columns", lambda root: _labelled(root, "file,class\np0.png,1\n"), 1, ("image and label",)),
        Case("labels-binary-garbage", lambda root: _labelled(root, bytes(range(256)) * 8), 1, ("labels.csv",)),
        Case(
            "labels-latin1", lambda root: _labelled(root, (header + "pö.png,1\n").encode("latin-1")), 1, ("labels.csv",)
        ),
        Case("labels-nul-in-name", lambda root: _labelled(root, header + "p0\x00.png,1\n"), 1, ("NUL",)),
        Case("labels-200k-field", lambda root: _labelled(root, header + "a" * 200_000 + ",1\n"), 1, ("labels.csv",)),
        Case("labels-short-rows", lambda root: _labelled(root, header + "p0.png\n\n,\n"), 1, ("labels.csv line 2",)),
        Case(
            "labels-1000-duplicate-rows",
            lambda root: _labelled(root, header + "p0.png,1\n" * 1000),
            1,
            ("listed again", "more"),
        ),
        Case(
            "labels-20k-duplicate-rows",
            lambda root: _labelled(root, header + "p0.png,1\n" * 20_000),
            1,
            ("listed again", "more"),
            slow=True,
        ),
        Case(
            "labels-option-missing",
            lambda root: [*_labelled(root, _good_rows())[:-1], str(root / "nope.csv")],
            2,
            ("--labels",),
        ),
        Case(
            "labels-option-a-folder",
            lambda root: [*_labelled(root, _good_rows())[:-1], str(root / "src")],
            2,
            ("--labels",),
        ),
        Case(
            "labels-images-option-missing",
            lambda root: [*_labelled(root, _good_rows()), "--images", str(root / "nope")],
            2,
            ("--images",),
        ),
        Case("labels-series-folder-with-link-out", folder_with_link_out, 1, ("series", "outside")),
        Case("labels-series-folder-with-folder-link", folder_with_folder_link, 1, ("series", "symlink to a folder")),
        Case(
            "labels-nifti-only",
            lambda root: ["nifti" if a == "image-mask" else a for a in _labelled(root, _good_rows())],
            1,
            ("not a NIfTI",),
        ),
        Case("labels-fine", lambda root: _labelled(root, _good_rows()), 0, verify=_rows(4)),
    ]


def _dicom_cases() -> list[Case]:
    def changed(change: Callable[[Path, Path], object], *extra: str) -> Build:
        def build(root: Path) -> list[str]:
            args = _dicom(root, *extra)
            change(Path(args[0]), root)
            return args

        return build

    def key_file(content: bytes | None, mode: int = 0o600, folder: bool = False) -> Build:
        def build(root: Path) -> list[str]:
            path = root / "keys" / "given.key"
            path.parent.mkdir(parents=True, exist_ok=True)
            if folder:
                path.mkdir()
            elif content is not None:
                path.write_bytes(content)
                path.chmod(mode)
            return _dicom(root, "--key-file", str(path))

        return build

    def hostile_headers(export: Path, root: Path) -> None:
        for path in export.glob("study1/*"):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = "1.2.3 ZZUIDTEXT [bold]"
            ds.save_as(path, enforce_file_format=True)

    def truncate_all(export: Path, root: Path) -> None:
        for path in export.rglob("*"):
            if path.is_file():
                path.write_bytes(path.read_bytes()[:200])

    good_key = (b"ab" * 32) + b"\n"
    return [
        Case(
            "dicom-file-symlink-out",
            changed(lambda e, r: os.symlink(_outside_dicom(r), e / "study0" / "extra")),
            1,
            ("extra", "outside"),
        ),
        Case(
            "dicom-file-symlink-to-system-file",
            changed(lambda e, r: os.symlink("/etc/hostname", e / "hostname")),
            1,
            ("hostname", "outside"),
        ),
        Case("dicom-file-symlink-loop", changed(lambda e, r: os.symlink("loop", e / "loop")), 1, ("loop",)),
        Case(
            "dicom-file-symlink-dangling",
            changed(lambda e, r: os.symlink("nowhere", e / "dangling")),
            1,
            ("dangling", "does not exist"),
        ),
        Case(
            "dicom-undecodable-file-name",
            changed(
                lambda e, r: (e / "x").write_bytes(b"") or os.rename(e / "x", os.path.join(os.fsencode(e), b"\xfe"))
            ),
            1,
            ("UTF-8",),
        ),
        Case(
            "dicom-folder-symlink-out-is-not-entered",
            changed(lambda e, r: (_outside_dicom(r), os.symlink(r / "outside", e / "linked"))),
            0,
            verify=_rows(3),
        ),
        Case(
            "dicom-hostile-headers-and-free-text-kept-out",
            changed(hostile_headers),
            0,
            verify=lambda root: (_dicom_without_free_text(root), _key_mode_600(root)),
        ),
        Case("dicom-all-files-truncated", changed(truncate_all), 1, ("no DICOM image series",)),
        Case(
            "dicom-only-junk",
            changed(lambda e, r: (shutil.rmtree(e), e.mkdir(), (e / "x.dcm").write_bytes(os.urandom(900)))),
            1,
            ("no DICOM image series",),
        ),
        Case(
            "dicom-export-is-a-file",
            changed(lambda e, r: (shutil.rmtree(e), e.write_bytes(b"x"))),
            2,
            ("not a folder",),
        ),
        Case("dicom-export-missing", changed(lambda e, r: shutil.rmtree(e)), 2, ("does not exist",)),
        Case("dicom-no-segmentation-in-export", lambda root: _dicom(root)[:5], 1, ("no series has a segmentation",)),
        Case(
            "dicom-labels-without-key-column",
            changed(lambda e, r: (r / "src" / "labels.csv").write_text("Name,label\nx,1\n")),
            1,
            ("key columns",),
        ),
        Case(
            "dicom-labels-two-labels",
            changed(lambda e, r: (r / "src" / "labels.csv").write_text("AccessionNumber,label\nACC0,0\nACC0,1\n")),
            1,
            ("two labels",),
        ),
        Case(
            "dicom-key-file-inside-out",
            lambda root: _dicom(root, "--key-file", str(root / "out" / "k")),
            2,
            ("--key-file", "inside"),
        ),
        Case("dicom-key-file-malformed", key_file(b"hello\n"), 2, ("--key-file", "not a medfed site key")),
        Case("dicom-key-file-empty", key_file(b""), 2, ("--key-file", "not a medfed site key")),
        Case("dicom-key-file-short", key_file(b"ab" * 8), 2, ("--key-file", "not a medfed site key")),
        Case("dicom-key-file-huge", key_file(b"ab" * 100_000), 2, ("--key-file", "not a medfed site key")),
        Case("dicom-key-file-binary", key_file(os.urandom(32)), 2, ("--key-file", "not a medfed site key")),
        Case("dicom-key-file-open-to-others", key_file(good_key, 0o644), 2, ("--key-file", "chmod 600")),
        Case("dicom-key-file-a-folder", key_file(None, folder=True), 2, ("--key-file", "not a regular file")),
        Case(
            "dicom-key-file-under-a-file",
            lambda root: _dicom(root, "--key-file", str(root / "src" / "labels.csv" / "k")),
            2,
            ("--key-file", "cannot be created"),
        ),
        Case(
            "dicom-key-file-fifo",
            lambda root: (
                os.makedirs(root / "keys"),
                os.mkfifo(root / "keys" / "pipe", 0o600),
                _dicom(root, "--key-file", str(root / "keys" / "pipe")),
            )[2],
            2,
            ("--key-file", "not a regular file"),
        ),
    ]


def _option_cases() -> list[Case]:
    def pairs(*extra: str, names: tuple[str, ...] | None = None) -> Build:
        return lambda root: _import_args(_pairs(root, names) if names else _pairs(root), "image-mask", root, *extra)

    long_a = tuple(f"case_{k}" + "a" * 40 + "!" for k in range(4))
    cases = []
    for val, test, word in [
        ("0.6", "0.6", "sum below 1"),
        ("0.5", "0.5", "sum below 1"),
        ("-0.5", "0.2", "--val"),
        ("0.2", "-0.1", "--test"),
        ("1", "0", "--val"),
        ("0", "1", "--test"),
        ("1.5", "0", "--val"),
        ("nan", "0.2", "--val"),
        ("0.2", "nan", "--test"),
        ("inf", "0", "--val"),
        ("0", "-inf", "--test"),
        ("1e300", "0", "--val"),
        ("abc", "0", "--val"),
    ]:
        cases.append(Case(f"split-val-{val}-test-{test}", pairs("--val", val, "--test", test), 2, (word,)))
    cases += [
        Case("split-leaves-no-training-patient", pairs("--val", "0.45", "--test", "0.45"), 1, ("none to train on",)),
        Case("split-0.99-leaves-no-training-patient", pairs("--val", "0.99", "--test", "0"), 1, ("none to train on",)),
        Case(
            "split-boxes-leave-no-training-image",
            lambda root: _import_args(_voc(root), "voc", root, "--val", "0.5", "--test", "0.4"),
            1,
            ("none to train on",),
        ),
        Case("split-zero-fractions-fine", pairs("--val", "0", "--test", "0"), 0, verify=_rows(4)),
    ]
    for key, pattern in {
        "open-group": "(",
        "close-group": ")",
        "open-class": "[",
        "bare-star": "*",
        "bare-plus": "+a",
        "bad-range": "[z-a]",
        "bad-repeat": "a{2,1}",
        "bad-group-name": "(?P<1>x)",
        "unknown-backreference": "(?P=nope)",
        "trailing-backslash": "\\",
        "variable-lookbehind": "(?<=a+)b",
        "nested-1500": "(" * 1500 + "a" + ")" * 1500,  # a RecursionError in the parser
        "markup": "[bold](x[/]",
    }.items():
        cases.append(
            Case(f"pattern-invalid-{key}", pairs("--patient-pattern", pattern), 2, ("--patient-pattern", "not a valid"))
        )
    for key, pattern, slow in [
        ("nested-plus", "(a+)+$", False),
        ("alternation-star", "(a|a)*$", True),
        ("star-star", "(a*)*b", True),
        ("words", r"(\w+\s?)+$", True),
        ("polynomial", r"a*a*a*a*a*a*a*a*b", True),
    ]:
        cases.append(
            Case(
                f"pattern-catastrophic-{key}",
                pairs("--patient-pattern", pattern, names=long_a),
                2,
                ("--patient-pattern", "took over"),
                slow=slow,
            )
        )
    cases += [
        Case("pattern-finds-nothing", pairs("--patient-pattern", "zzz"), 1, ("finds no patient id",)),
        Case("pattern-empty-match", pairs("--patient-pattern", "x*"), 1, ("finds no patient id",)),
        Case("pattern-group-not-taking-part", pairs("--patient-pattern", "(z)?case"), 1, ("finds no patient id",)),
        Case(
            "pattern-labels-finds-nothing",
            lambda root: [*_labelled(root, _good_rows()), "--patient-pattern", "zzz"],
            1,
            ("finds no patient id",),
        ),
        Case("pattern-fine", pairs("--patient-pattern", r"case_(\d)"), 0, verify=_rows(4)),
        Case("from-unknown", pairs("--from", "jpeg"), 2, ("expected one of",)),
        Case("from-empty", pairs("--from", ""), 2, ("expected one of",)),
        Case("from-markup", pairs("--from", "[bold]voc[/]"), 2, ("[bold]voc[/]",)),
        Case("task-not-of-layout", pairs("--task", "detection"), 2, ("not detection",)),
        Case("task-unknown", pairs("--task", "[/]"), 2, ("[/]",)),
        Case(
            "voc-with-classification",
            lambda root: _import_args(_voc(root), "voc", root, "--task", "classification"),
            2,
            ("not classification",),
        ),
        Case("src-missing", lambda root: _import_args(root / "nope", "image-mask", root), 2, ("does not exist",)),
        Case("src-markup-missing", lambda root: _import_args(root / "[bold]x[/]", "voc", root), 2, ("[bold]x[/]",)),
        Case(
            "src-a-file-for-folders",
            lambda root: _import_args(_outside(root) / "secret.txt", "voc", root),
            2,
            ("not a folder",),
        ),
        Case(
            "out-an-existing-file",
            lambda root: [*pairs()(root)[:-2], "--out", str(root / "outside" / "secret.txt")],
            2,
            ("not empty",),
        ),
        Case("out-not-empty", lambda root: [*pairs()(root)[:-2], "--out", str(root / "outside")], 2, ("not empty",)),
        Case(
            "out-under-a-file",
            lambda root: [*pairs()(root)[:-2], "--out", str(root / "outside" / "secret.txt" / "site")],
            2,
            ("is a file",),
        ),
        Case(
            "out-is-the-source",
            lambda root: [*pairs()(root)[:-2], "--out", str(root / "src" / "pairs")],
            2,
            ("not empty",),
        ),
        Case(
            "out-symlink-loop",
            lambda root: (os.symlink("loopy", root / "loopy"), pairs()(root)[:-2] + ["--out", str(root / "loopy")])[1],
            2,
            ("--out", "symlink loop"),
        ),
        Case("src-name-300-bytes", lambda root: _import_args(root / ("s" * 300), "voc", root), 2, ("SRC", "255")),
        Case(
            "out-name-300-bytes",
            lambda root: [*pairs()(root)[:-2], "--out", str(root / ("o" * 300))],
            2,
            ("--out", "255"),
        ),
        Case("masks-option-missing", pairs("--masks", "/nonexistent-masks"), 2, ("--masks",)),
        Case(
            "images-option-a-file",
            lambda root: pairs("--images", str(root / "outside" / "secret.txt"), "--masks", str(root / "src"))(root),
            2,
            ("--images",),
        ),
        Case(
            "out-with-markup-and-emoji-fine",
            lambda root: [*pairs()(root)[:-2], "--out", str(root / "[bold]site[red] :skull:")],
            0,
            ("[bold]site[red] :skull:",),
        ),
    ]
    return cases


def _medmnist_cases() -> list[Case]:
    def npz_missing_arrays(path: Path) -> None:
        np.savez(path, train_images=np.zeros((2, 8, 8), np.uint8))

    def pickled(path: Path) -> None:
        _valid_npz(path, train_images=np.array([{"a": 1}] * 6, dtype=object))

    def truncated(path: Path) -> None:
        _valid_npz(path)
        path.write_bytes(path.read_bytes()[:300])

    def zip_of_text(path: Path) -> None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("train_images.npy", "not an array")

    return [
        Case("medmnist-empty-file", lambda root: _medmnist(root, lambda p: p.write_bytes(b"")), 1, ("set.npz",)),
        Case(
            "medmnist-garbage", lambda root: _medmnist(root, lambda p: p.write_bytes(os.urandom(500))), 1, ("set.npz",)
        ),
        Case("medmnist-truncated", lambda root: _medmnist(root, truncated), 1, ("set.npz",)),
        Case("medmnist-missing-arrays", lambda root: _medmnist(root, npz_missing_arrays), 1, ("missing arrays",)),
        Case("medmnist-pickled-objects", lambda root: _medmnist(root, pickled), 1, ("set.npz",)),
        Case("medmnist-zip-of-text", lambda root: _medmnist(root, zip_of_text), 1, ("set.npz",)),
        Case(
            "medmnist-4d-images",
            lambda root: _medmnist(root, lambda p: _valid_npz(p, train_images=np.zeros((6, 2, 8, 8, 2)))),
            1,
            ("set.npz",),
        ),
        Case(
            "medmnist-is-a-folder",
            lambda root: _import_args((root / "src").mkdir() or root / "src", "medmnist", root),
            2,
            (".npz file",),
        ),
    ]


CORPUS = [
    *_name_cases(),
    *_voc_cases(),
    *_coco_cases(),
    *_pairs_cases(),
    *_labels_cases(),
    *_dicom_cases(),
    *_option_cases(),
    *_medmnist_cases(),
]


def test_the_corpus_is_large_and_named_uniquely() -> None:
    assert len(CORPUS) >= 200
    assert len({case.name for case in CORPUS}) == len(CORPUS)


def _snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[Path, tuple[int, int, int]]:
    """Every path under ``root`` but those under ``skip``: its type, size and modification time."""
    seen = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if Path(folder) / name not in skip]
        for name in subfolders + names:
            path = Path(folder) / name
            if path not in skip:
                status = path.lstat()
                seen[path] = (stat.S_IFMT(status.st_mode), status.st_size, status.st_mtime_ns)
    return seen


def _written(out: Path, before: dict[Path, tuple[int, int, int]]) -> Iterator[tuple[Path, bytes]]:
    """The content of each file the import wrote in ``out`` (none there ``before`` it, unchanged)."""
    for path, entry in _snapshot(out).items() if os.path.isdir(out) else []:
        if stat.S_ISREG(entry[0]) and before.get(path) != entry:
            data = path.read_bytes()
            yield path, gzip.decompress(data) if path.name.endswith(".gz") else data


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CORPUS]
)
def test_hostile_import_is_refused_cleanly(case: Case, tmp_path: Path) -> None:
    root = tmp_path / "case"
    root.mkdir()
    args = case.build(root)
    out = Path(args[args.index("--out") + 1]) if "--out" in args else root / "out"
    outside_out = (out, root / "keys")  # the key folder: a DICOM import makes the site key there
    before, out_before = _snapshot(root, outside_out), _snapshot(out) if os.path.isdir(out) else {}
    runner = CliRunner(env={"MEDFED_KEY_FILE": str(root / "keys" / "site.key")})
    result = runner.invoke(app, ["data", "import", *args])
    output = " ".join(result.output.split())
    assert result.exit_code == case.code, f"{case.name}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for word in case.words:
        assert " ".join(word.split()) in output, f"{case.name}: {word!r} not in\n{result.output}"
    assert _snapshot(root, outside_out) == before, "a file outside the output folder was created or changed"
    for path, data in _written(out, out_before):
        assert SENTINEL not in data, f"{path.name} holds a planted outside file"
    if case.verify is not None:
        case.verify(root)


# ---------------------------------------------------------------------------------------------
# Properties of the boundary functions


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with files, a sub-folder, links inside, out of it and in loops; and a sibling outside it."""
    base = tmp_path_factory.mktemp("resolver")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"b")
    (base / "outside.png").write_bytes(SENTINEL)
    os.symlink("../outside.png", root / "out.png")
    os.symlink(base, root / "outdir")
    os.symlink("a.png", root / "in.png")
    os.symlink("..", root / "sub" / "up")
    os.symlink("loop", root / "loop")
    return Path(os.path.realpath(root))


PIECES = ["..", ".", "", "a.png", "sub", "b.png", "out.png", "outdir", "in.png", "up", "loop", "x\x00", "é" * 200, "~"]


@settings(max_examples=150, deadline=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(PIECES), min_size=1, max_size=6), absolute=st.booleans())
def test_resolved_paths_never_leave_their_root(tree: Path, parts: list[str], absolute: bool) -> None:
    name = ("/" if absolute else "") + "/".join(parts)
    try:
        resolved = resolve_inside(tree, name)
    except UnsafePath as err:
        assert str(err)
    else:
        assert resolved.is_relative_to(tree) and resolved.exists() and not absolute
        assert not resolved.is_file() or resolved.read_bytes() != SENTINEL


SAFE_PATTERNS = [r"case_(\d+)", r"^(\w+?)_", r"[A-Z]{2}\d", r"(pat|case)-?(\d*)", r"^$", r"(\d)(\d)?"]


@settings(max_examples=12, deadline=5000)
@given(
    pattern=st.sampled_from(SAFE_PATTERNS),
    names=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=8),
)
def test_the_patient_matcher_agrees_with_re_on_safe_patterns(pattern: str, names: list[str]) -> None:
    compiled = re.compile(pattern)
    expected = []
    for name in names:
        match = compiled.search(name)
        found = None if match is None else match.group(1) if match.groups() else match.group(0)
        expected.append(found or None)
    assert PatientPattern(pattern).patients(names) == expected


@settings(max_examples=200, deadline=100)
@given(val=st.floats(allow_nan=True, allow_infinity=True), test=st.floats(allow_nan=True, allow_infinity=True))
def test_split_fractions_are_refused_outside_their_range(val: float, test: float) -> None:
    try:
        check_fractions(val, test)
    except ValueError as err:
        assert "--val" in str(err) or "--test" in str(err)
    else:
        assert 0 <= val < 1 and 0 <= test < 1 and val + test < 1


def test_a_catastrophic_pattern_is_stopped_within_its_time_limit() -> None:
    matcher = PatientPattern("(a+)+$", seconds=0.2)
    assert matcher.patients(["aaa"]) == ["aaa"]
    with pytest.raises(ValueError, match="took over 0.2 s"):
        matcher.patients(["short", "a" * 60 + "!"])


# ---------------------------------------------------------------------------------------------
# The site key


def test_the_site_key_is_created_once_private_and_keys_stable_pseudonyms(tmp_path: Path) -> None:
    path = tmp_path / "config" / "medfed" / "pseudonym.key"
    key = site_key(path, tmp_path / "site")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) == 32
    assert site_key(path, tmp_path / "other-site") == key  # the same key at every import of the site
    assert pseudonym(key, "PID-1") == pseudonym(key, "PID-1") != pseudonym(key, "PID-2")
    other = site_key(tmp_path / "elsewhere.key", tmp_path / "site")
    assert pseudonym(other, "PID-1") != pseudonym(key, "PID-1")  # meaningless at another site
    assert pseudonym(key, "PID-1") != "p-" + hashlib.sha256(b"PID-1").hexdigest()[:16]


def test_the_site_key_is_refused_when_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    site_key(path, tmp_path / "site")
    path.chmod(0o000)
    if os.access(path, os.R_OK):  # root reads any file
        pytest.skip("running as root: file permissions are not enforced")
    with pytest.raises(ValueError, match="cannot be read"):
        site_key(path, tmp_path / "site")


def test_import_help_says_where_the_key_lives() -> None:
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["data", "import", "--help"])
    text = " ".join(result.output.split())
    assert "--key-file" in text and "pseudonym.key" in text and "No free-text header" in text
