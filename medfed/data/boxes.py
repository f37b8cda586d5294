"""Bounding boxes for object detection in 2D images and 3D volumes: Pascal VOC and COCO readers,
box checks, box sites.

Annotations give boxes in the ORIGINAL image's pixels; the model sees the image resampled to
``image_size`` x ``image_size``. Boxes stay in original pixels (and are checked there, against the
image file's real size) until :func:`load_box_site` scales each with its image, so one rule serves
every source. Public sets carry broken boxes (BCCD has two of zero area); a box with unusable
geometry is dropped, since the rest of the image is still good: named with its file for the
site's operator (``medfed data check``, ``medfed data import``), counted by kind only in the log
of training and evaluation, which a simulation's coordinator sees. A class that cannot be mapped is an error: dropping it would silently change what the
model learns. A site folder of boxes holds ``manifest.csv`` (``image``, ``split``, optional
``patient_id``, ``spacing``) and ``boxes.csv`` (``image``, ``label``, ``xmin``, ``ymin``,
``xmax``, ``ymax``, one row per box); an image without rows in ``boxes.csv`` is a negative.

Volumes (``data.spatial-dims = 3``: NIfTI files, DICOM series folders) need ``zmin`` and ``zmax``
too: a 3D site whose table lacks them, or a row without them, is refused naming the file and line.
3D boxes are in VOXELS of the stored volume, as 2D boxes are in pixels: x along its last array
axis (a DICOM column; a NIfTI's third axis), y along the one before (a DICOM row), z along the first
(the DICOM slice, in the order of the slice positions; a NIfTI's first axis), a voxel i spanning
[i, i + 1). A box in mm (LUNA16's world coordinates and diameter) becomes voxels through the
volume's own affine, which ``medfed predict`` applies the other way round.

Annotation files name their images; a name is read only when it resolves inside the images folder
(no ``../``, absolute path or symlink out: :func:`~medfed.data.import_guard.resolve_inside`), and
an import copies each image once, inside the output folder.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfed.data.arrays import SiteArrays
from medfed.data.decode import DEFAULT_PREPROCESS, Preprocess, load_image
from medfed.data.import_guard import UnsafePath, copy_inside, folder_files, require_training, resolve_inside
from medfed.data.medical_io import read_scan
from medfed.data.partition import assign_splits
from medfed.data.vocabulary import MANIFEST, DataError, DataProblem

__all__ = [
    "BOXES",
    "AnnotatedImage",
    "Box",
    "class_index",
    "import_coco",
    "import_voc",
    "load_box_site",
    "read_box_table",
    "read_coco",
    "read_voc",
    "validate_boxes",
    "write_box_table",
]

BOXES = "boxes.csv"
BOX_COLUMNS = ("image", "label", "xmin", "ymin", "xmax", "ymax")
Z_COLUMNS = ("zmin", "zmax")
log = logging.getLogger("medfed.data")


@dataclass(frozen=True)
class Box:
    """One object: its class (a name, or an index) and its corners in original image pixels (a 3D
    box also ``zmin`` and ``zmax``, in voxels)."""

    label: str | int
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    zmin: float | None = None
    zmax: float | None = None

    @classmethod
    def from_corners(cls, label: str | int, corners: Sequence[float]) -> Box:
        """A box from ``[x1, y1, x2, y2]`` or ``[x1, y1, z1, x2, y2, z2]`` (the model's row order)."""
        if len(corners) == 6:
            x1, y1, z1, x2, y2, z2 = (float(v) for v in corners)
            return cls(label, x1, y1, x2, y2, z1, z2)
        x1, y1, x2, y2 = (float(v) for v in corners)
        return cls(label, x1, y1, x2, y2)

    @property
    def corners(self) -> tuple[float, ...]:
        """``(xmin, ymin, xmax, ymax)``, or ``(xmin, ymin, zmin, xmax, ymax, zmax)`` for a 3D box."""
        if self.zmin is None or self.zmax is None:
            return (self.xmin, self.ymin, self.xmax, self.ymax)
        return (self.xmin, self.ymin, self.zmin, self.xmax, self.ymax, self.zmax)

    def __str__(self) -> str:
        return f"{self.label} ({', '.join(f'{v:g}' for v in self.corners)})"


@dataclass(frozen=True)
class AnnotatedImage:
    """One image file and its boxes (none: a negative image).

    ``patient_id`` ("" = unknown) keeps a patient's images in one split and one site. ``size`` is
    the (width, height) the annotation states, checked against the file; ``source`` names the
    annotation file, for messages; ``spacing`` (mm per pixel, row and column) is for files that do
    not carry it.
    """

    image: Path
    boxes: list[Box] = field(default_factory=list)
    patient_id: str = ""
    size: tuple[int, int] | None = None
    source: str = ""
    spacing: tuple[float, ...] | None = None

    @property
    def patient(self) -> str:
        """The unit kept in one split and one site: the patient when known, else the image itself."""
        return self.patient_id or self.image.name

    @property
    def where(self) -> str:
        """The image and its annotation file, for messages."""
        return f"{self.image.name} (boxes from {self.source})" if self.source else self.image.name


def validate_boxes(
    boxes: Iterable[Box],
    width: float,
    height: float,
    where: str,
    dropped: list[DataProblem] | None = None,
    depth: float | None = None,
) -> list[Box]:
    """The boxes with usable geometry in a ``width`` x ``height`` image (x ``depth`` slices: a
    volume). The others are dropped: appended to ``dropped`` (``where``, the box and why), or, without it, each logged as a warning
    naming ``where`` (for the site's operator, as ``medfed data import`` does).

    Usable: finite corners, ``xmin < xmax`` and ``ymin < ymax`` (and ``zmin < zmax``), every corner
    inside ``[0, width] x [0, height]`` (x ``[0, depth]``; pixel edges: a box may end at ``width``).
    """
    kept = []
    for box in boxes:
        problem = _geometry_problem(box, (width, height) if depth is None else (width, height, depth))
        if not problem:
            kept.append(box)
        elif dropped is not None:
            dropped.append(DataProblem(where, f"{DROPPED} {box}: {problem}"))
        else:
            log.warning("%s: dropped box %s: %s", where, box, problem)
    return kept


DROPPED = "box dropped:"
NOT_FINITE = "a coordinate is not a finite number"
EMPTY = "empty: needs xmin < xmax and ymin < ymax (and zmin < zmax)"


def _geometry_problem(box: Box, size: tuple[float, ...]) -> str:
    corners = box.corners
    dims = len(corners) // 2
    if not all(math.isfinite(v) for v in corners):
        return NOT_FINITE
    if any(low >= high for low, high in zip(corners[:dims], corners[dims:], strict=True)):
        return EMPTY
    if min(corners) < 0 or any(high > n for high, n in zip(corners[dims:], size, strict=False)):
        return f"outside the {'x'.join(f'{n:g}' for n in size)} {'image' if len(size) == 2 else 'volume'}"
    return ""


def dropped_summary(dropped: Sequence[DataProblem]) -> str:
    """Dropped boxes (from :func:`validate_boxes`) counted by kind, naming no file or value: e.g.
    ``12 box(es) dropped at this site: 10 outside the image, 2 empty``. What training and
    evaluation log, which a simulation's coordinator sees."""
    kinds = Counter(
        "not finite" if p.reason.endswith(NOT_FINITE) else "empty" if p.reason.endswith(EMPTY) else "outside the image"
        for p in dropped
    )
    shown = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    return f"{len(dropped)} box(es) dropped at this site: {shown}"


def class_index(label: str | int, class_names: Sequence[str], num_classes: int) -> int | None:
    """The class index of ``label``: its position in ``class_names``, else the label itself when it
    is an integer (or integer text, as in a CSV) in ``[0, num_classes - 1]``; None when neither."""
    if isinstance(label, str) and label in class_names:
        return list(class_names).index(label)
    try:
        value = int(str(label).strip())
    except ValueError:
        return None
    return value if 0 <= value < num_classes else None


def _unknown_class(label: str | int, class_names: Sequence[str], num_classes: int) -> str:
    indices = f"a class index in [0, {num_classes - 1}]"
    if class_names:
        return f"class {label!r} is neither one of the class names {list(class_names)} nor {indices}"
    return f"class {label!r} is not {indices} (class names need data.class-names)"


def read_voc(annotations_dir: str | Path, images_dir: str | Path) -> list[AnnotatedImage]:
    """Parse every Pascal VOC ``*.xml`` of ``annotations_dir`` (in name order), images in ``images_dir``.

    Reads ``<filename>``, ``<size>`` and each ``<object>``'s ``<name>`` and ``<bndbox>`` corners
    as written. Objects marked ``<difficult>1</difficult>`` are kept as ordinary boxes (ignore
    regions are not supported yet). Box geometry is checked later, against the image file. Raises
    :class:`DataError` listing every unparsable file, malformed object, missing image, and every
    annotation or image name that leads outside its folder.
    """
    annotations_dir = Path(os.path.realpath(annotations_dir))
    images_dir = Path(os.path.realpath(images_dir))
    files, problems = (
        folder_files(annotations_dir, (".xml",), annotations_dir.name) if annotations_dir.is_dir() else ([], [])
    )
    if not files and not problems:
        raise DataError(annotations_dir, [DataProblem(str(annotations_dir), "no Pascal VOC *.xml files found")])
    records: list[AnnotatedImage] = []
    for path in files:
        record = _parse_voc(path, images_dir, problems)
        if record is not None:
            records.append(record)
    if problems:
        raise DataError(annotations_dir.parent, problems)
    return records


def _parse_voc(path: Path, images_dir: Path, problems: list[DataProblem]) -> AnnotatedImage | None:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, RecursionError) as err:
        problems.append(DataProblem(path.name, f"not a readable Pascal VOC xml file: {err}"))
        return None
    filename = (root.findtext("filename") or "").strip()
    if not filename:
        problems.append(DataProblem(path.name, "no <filename>: cannot tell which image it annotates"))
        return None
    try:
        image = resolve_inside(images_dir, filename)
        if not image.is_file():
            raise UnsafePath("is not a file")
    except UnsafePath as err:
        problems.append(DataProblem(path.name, f"its image {filename} is not in {images_dir}: it {err}"))
        return None
    boxes = []
    for number, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        corners = [obj.findtext(f"bndbox/{key}", default="") for key in BOX_COLUMNS[2:]]
        try:
            boxes.append(Box(name, *(float(v) for v in corners)))
        except (TypeError, ValueError):
            problems.append(
                DataProblem(path.name, f"object {number} ({name!r}): <bndbox> needs numbers xmin, ymin, xmax, ymax")
            )
        if not name:
            problems.append(DataProblem(path.name, f"object {number} has no <name>"))
    width, height = (_positive_int(root.findtext(f"size/{key}")) for key in ("width", "height"))
    size = (width, height) if width and height else None
    return AnnotatedImage(image, boxes, size=size, source=path.name)


def _positive_int(text: str | None) -> int:
    """An image size as annotated; 0 when absent or unreadable (then the file's own size counts)."""
    try:
        return max(int(float(text or "")), 0)
    except ValueError:
        return 0


def read_coco(json_path: str | Path, images_dir: str | Path) -> list[AnnotatedImage]:
    """Parse a COCO detection file: ``images`` (``id``, ``file_name``, optional ``width``/``height``),
    ``categories`` (``id``, ``name``) and ``annotations`` (``image_id``, ``category_id``, ``bbox`` =
    ``[x, y, width, height]`` in pixels), images in ``images_dir``.

    Labels are the category names; an image without annotations is a negative. Raises
    :class:`DataError` listing every malformed annotation, unknown id and missing image.
    """
    json_path, images_dir = Path(json_path), Path(os.path.realpath(images_dir))
    where = json_path.name
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        categories = {c["id"]: str(c["name"]) for c in data["categories"]}
        images = {i["id"]: i for i in data["images"]}
        annotations = list(data["annotations"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        expected = "JSON with lists 'images' (id, file_name), 'categories' (id, name) and 'annotations'"
        raise DataError(
            json_path.parent, [DataProblem(where, f"not a COCO detection file ({expected}): {err!r}")]
        ) from None
    problems: list[DataProblem] = []
    boxes: dict[object, list[Box]] = {image_id: [] for image_id in images}
    for number, ann in enumerate(annotations):
        at = f"{where} annotation {number}"
        try:
            image_id, category, (x, y, w, h) = ann["image_id"], ann["category_id"], (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.append(DataProblem(at, "needs image_id, category_id and bbox = [x, y, width, height]"))
            continue
        if image_id not in images:
            problems.append(DataProblem(at, f"image_id {image_id!r} is not among the images"))
        elif category not in categories:
            problems.append(DataProblem(at, f"category_id {category!r} is not among the categories"))
        else:
            boxes[image_id].append(Box(categories[category], x, y, x + w, y + h))
    records = []
    for image_id, entry in images.items():
        name = entry.get("file_name")
        try:
            image = resolve_inside(images_dir, name if isinstance(name, str) else "")
            if not image.is_file():
                raise UnsafePath("is not a file")
        except UnsafePath as err:
            problems.append(DataProblem(where, f"image {name!r} (id {image_id!r}) not found in {images_dir}: it {err}"))
            continue
        width, height = (_positive_int(str(entry.get(key, ""))) for key in ("width", "height"))
        size = (width, height) if width and height else None
        records.append(AnnotatedImage(image, boxes[image_id], size=size, source=where))
    if problems:
        raise DataError(json_path.parent, problems)
    return records


def load_box_site(
    records: Sequence[AnnotatedImage],
    splits: Sequence[str],
    image_size: int,
    class_names: Sequence[str],
    num_classes: int,
    origin: str | Path | None = None,
    problems: list[DataProblem] | None = None,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
    channels: int = 1,
    notices: list[DataProblem] | None = None,
    spatial_dims: int = 2,
) -> SiteArrays:
    """Load images as ``(N, channels, S, S)`` in [0, 1] (3: a colour photo's RGB, see
    :func:`medfed.data.decode.load_image`), or volumes as ``(N, channels, S, S, S)``
    (``spatial_dims = 3``), and their boxes as ``(N, M, 2 * spatial_dims + 1)`` model-input targets.

    Each box is checked against the image file's real size (:func:`validate_boxes`: broken ones
    are dropped with a warning), its label mapped by :func:`class_index`, and its corners scaled
    with the image: x by ``image_size / width``, y by ``image_size / height`` (z by ``image_size /
    slices``). Raises
    :class:`DataError` (headed by ``origin``, default the first image's folder) listing every
    unreadable image, size mismatch and unknown class, together with ``problems`` found before.
    Pixel values become model inputs as ``preprocess`` says (CT window), as in :func:`read_site`.
    Dropped boxes are appended to ``notices`` with their files (the pre-flight check's warnings);
    without it they are logged as one count-only warning (:func:`dropped_summary`).
    """
    problems = [] if problems is None else problems
    dropped: list[DataProblem] = []
    origin = Path(origin) if origin else Path(records[0].image.parent if records else ".")
    images, spacings, rows, kept_splits, patients = [], [], [], [], []
    for record, split in zip(records, splits, strict=True):
        try:
            array, spacing, geometry = load_image(
                record.image, image_size, spatial_dims, record.spacing, preprocess, channels=channels
            )
        except Exception as err:  # noqa: BLE001 - every unreadable file is reported
            problems.append(DataProblem(record.where, f"image unreadable: {err}"))
            continue
        size = tuple(reversed(geometry.shape))  # along x, y (z)
        problems.extend(
            DataProblem(record.where, f"box {box}: {_unknown_class(box.label, class_names, num_classes)}")
            for box in record.boxes
            if class_index(box.label, class_names, num_classes) is None
        )
        scale = np.array([image_size / n for n in size] * 2)
        rows.append(
            [
                [*(np.array(box.corners) * scale), index]
                for box in _usable_boxes(record, size, problems, dropped)
                if (index := class_index(box.label, class_names, num_classes)) is not None
            ]
        )
        images.append(array)
        spacings.append(spacing)
        kept_splits.append(split)
        patients.append(record.patient_id)
    if not images and not problems:
        problems.append(DataProblem(str(origin), "no images to load"))
    if problems:
        raise DataError(origin, problems)
    if notices is not None:
        notices.extend(dropped)
    elif dropped:
        log.warning("%s", dropped_summary(dropped))
    targets = np.zeros((len(rows), max([1, *map(len, rows)]), 2 * spatial_dims + 1), dtype=np.float32)
    targets[:, :, -1] = -1
    for i, image_rows in enumerate(rows):
        if image_rows:
            targets[i, : len(image_rows)] = image_rows
    return SiteArrays(
        np.stack(images).astype(np.float32),
        targets,
        np.asarray(kept_splits, dtype=str),
        np.asarray(patients, dtype=str),
        target_key="boxes",
        spacing=np.asarray(spacings, dtype=np.float32),
    )


def _usable_boxes(
    record: AnnotatedImage,
    size: tuple[int, ...],
    problems: list[DataProblem],
    dropped: list[DataProblem] | None = None,
) -> list[Box]:
    """The record's boxes with usable geometry in its real image of ``size`` (width, height[, slices])
    (the others go to ``dropped``, or are logged with the file: see :func:`validate_boxes`)."""
    if record.size is not None and record.size != size[:2]:
        stated, real = "x".join(map(str, record.size)), "x".join(map(str, size))
        problems.append(DataProblem(record.where, f"the annotation is for a {stated} image; the file is {real}"))
        return []
    depth = size[2] if len(size) == 3 else None
    return validate_boxes(record.boxes, size[0], size[1], record.where, dropped, depth=depth)


def read_box_table(
    path: Path, images: Collection[str], spatial_dims: int = 2
) -> tuple[dict[str, list[Box]], list[DataProblem]]:
    """The boxes of a site folder's ``boxes.csv`` by ``image`` entry, and the problems found.

    ``images`` are the manifest's ``image`` entries; a row naming another image is a problem.
    The table is read as the manifest is: UTF-8, with or without the BOM that Excel writes. For
    volumes (``spatial_dims = 3``) every row needs ``zmin`` and ``zmax`` too (voxels); a 2D table
    may carry them empty or not at all.
    """
    columns = (*BOX_COLUMNS, *(Z_COLUMNS if spatial_dims == 3 else ()))
    if not path.is_file():
        return {}, [
            DataProblem(path.name, f"missing: a box site needs {BOXES} beside {MANIFEST} (columns {list(columns)})")
        ]
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                why = " (3D volumes, data.spatial-dims = 3, need zmin and zmax in voxels)" if spatial_dims == 3 else ""
                return {}, [
                    DataProblem(f"{path.name} line 1", f"missing column(s) {missing}{why}; found {reader.fieldnames}")
                ]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        return {}, [DataProblem(path.name, f"not a UTF-8 box table (save it as CSV UTF-8): {err}")]
    boxes: dict[str, list[Box]] = {}
    problems = []
    for line, row in enumerate(rows, start=2):
        where = f"{path.name} line {line}"
        if row["image"] not in images:
            problems.append(DataProblem(where, f"image {row['image']!r} is not in {MANIFEST}"))
            continue
        try:
            corners = [float(row[key]) for key in BOX_COLUMNS[2:]]
        except (TypeError, ValueError):
            problems.append(DataProblem(where, "xmin, ymin, xmax, ymax must be numbers (pixels)"))
            continue
        if spatial_dims == 3:
            try:
                zmin, zmax = (float(row[key]) for key in Z_COLUMNS)
            except (TypeError, ValueError):
                problems.append(DataProblem(where, "zmin and zmax must be numbers (voxels) for a 3D volume"))
                continue
            box = Box(row["label"], corners[0], corners[1], corners[2], corners[3], zmin, zmax)
        else:
            box = Box(row["label"], *corners)
        boxes.setdefault(row["image"], []).append(box)
    return boxes, problems


def write_box_table(path: Path, rows: Iterable[tuple[str, Box]]) -> None:
    """Write ``boxes.csv``: one row per ``(image entry, box)``; integer coordinates stay integers.
    3D boxes add ``zmin`` and ``zmax`` columns."""
    rows = list(rows)
    volumes = any(box.zmin is not None for _, box in rows)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*BOX_COLUMNS, *(Z_COLUMNS if volumes else ())])
        for image, box in rows:
            z = (box.zmin, box.zmax) if volumes else ()
            writer.writerow([image, box.label, *(_number(v) for v in (box.xmin, box.ymin, box.xmax, box.ymax, *z))])


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def import_voc(
    annotations_dir: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    fractions: tuple[float, float] = (0.2, 0.2),
) -> Path:
    """Make a box site folder from Pascal VOC: image copies under ``images/``, ``manifest.csv`` with
    seeded image-level splits (``fractions`` = val, test) and ``boxes.csv`` with the class names.

    Boxes with unusable geometry are dropped with a warning; anything else wrong is a :class:`DataError`.
    """
    return _write_box_folder(read_voc(annotations_dir, images_dir), Path(images_dir), Path(out_dir), seed, fractions)


def import_coco(
    json_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    fractions: tuple[float, float] = (0.2, 0.2),
) -> Path:
    """Make a box site folder from a COCO detection file, as :func:`import_voc` does (labels = category names)."""
    return _write_box_folder(read_coco(json_path, images_dir), Path(images_dir), Path(out_dir), seed, fractions)


def _write_box_folder(
    records: list[AnnotatedImage], images_dir: Path, out_dir: Path, seed: int, fractions: tuple[float, float]
) -> Path:
    """The box site folder of ``records`` (resolved images inside ``images_dir``), each image copied once."""
    images_dir, out_dir = Path(os.path.realpath(images_dir)), Path(os.path.realpath(out_dir))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new or empty output folder")
    problems: list[DataProblem] = []
    if not records:
        problems.append(DataProblem(str(images_dir), "no annotated images"))
    first: dict[Path, AnnotatedImage] = {}
    kept = []
    for record in records:
        if record.image in first:
            problems.append(DataProblem(record.where, f"annotated again: also in {first[record.image].source}"))
            continue
        first[record.image] = record
        size = _width_height(record, problems)
        kept.append(_usable_boxes(record, size, problems) if size else [])
    if problems:
        raise DataError(images_dir, problems)
    splits = assign_splits(records, seed, fractions)
    require_training(records, splits, fractions, images_dir)
    table: list[tuple[str, Box]] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / MANIFEST).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split", "patient_id"])
        for record, boxes, split in zip(records, kept, splits, strict=True):
            entry = Path("images") / record.image.relative_to(images_dir)
            copy_inside(record.image, images_dir, out_dir, entry)
            writer.writerow([entry.as_posix(), split, record.patient_id])
            table.extend((entry.as_posix(), box) for box in boxes)
    write_box_table(out_dir / BOXES, table)
    return out_dir


def _width_height(record: AnnotatedImage, problems: list[DataProblem]) -> tuple[int, int] | None:
    """The image file's real (width, height), or None (with a problem) when it is not a readable 2D image."""
    try:
        shape = [n for n in read_scan(record.image).array.shape if n > 1]
    except Exception as err:  # noqa: BLE001 - every unreadable file is reported
        problems.append(DataProblem(record.where, f"image unreadable: {err}"))
        return None
    if len(shape) != 2:
        problems.append(DataProblem(record.where, f"expected a 2D image, got shape {shape}"))
        return None
    return shape[1], shape[0]
