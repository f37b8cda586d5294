"""A site folder on disk: ``manifest.csv`` plus the image files it names (design.md).

Columns: ``image`` (path relative to the folder), the target (``label``: a class index; with
``data.multi-label`` the findings of the image joined by ``|``, each a class index or a name from
``data.class-names``, e.g. ``effusion|nodule``, or ``none`` for an image without any; or
``mask``: a label-mask file of the image's size, 0 = background; ``instances``: an instance label
image, one integer per object, 0 = background, e.g. a 16-bit PNG), ``split``
(train/val/test) and optional ``patient_id`` (used only to keep a patient in one split; it never
leaves the site), ``spacing`` (mm per pixel, for files that do not state it) and ``modality``
(e.g. ``CT``, for files that do not state it: NIfTI converted from DICOM). Images may be PNG/JPEG, NumPy ``.npy``, DICOM ``.dcm`` or NIfTI ``.nii(.gz)``.
With ``data.channels`` = N > 1 an ``image`` cell names one file holding the N channels (a colour
photo for N = 3, a 4D NIfTI, a ``.npy`` with a channel axis) or N files, one per channel in order,
joined by ``;`` (``t1.nii.gz;t1c.nii.gz;t2.nii.gz;flair.nii.gz``).
Box targets (detection) have no manifest column: they sit in ``boxes.csv`` beside it
(see :mod:`medfed.data.boxes`). An optional ``label-map.toml`` says how the site's own label
values translate to the federation's classes and which classes it labels
(:mod:`medfed.data.label_map`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from medfed.config import STATE_FOLDER, DataConfig
from medfed.data.arrays import SPLITS, SiteArrays
from medfed.data.boxes import BOXES, AnnotatedImage, Box, load_box_site, read_box_table, write_box_table
from medfed.data.decode import (
    DEFAULT_PREPROCESS,
    FieldOfViewCase,
    Geometry,
    Preprocess,
    load_field_of_view_case,
    load_image,
    load_mask,
    note_rescaled,
)
from medfed.data.field_of_view import IGNORE, field_of_view_card
from medfed.data.label_map import LABEL_MAP, MAX_MASK_VALUE, labelled_vector, read_label_map, write_label_map
from medfed.data.medical_io import ChannelError
from medfed.data.tabular import read_feature_site
from medfed.data.vocabulary import MANIFEST, DataError, DataProblem

__all__ = ["STATE_FOLDER", "SiteReading", "folder_signature", "image_paths", "read_site", "read_table", "write_site"]

REQUIRED_COLUMNS = ("image", "split")
MASK_TARGETS = ("mask", "instances")  # targets held in a label-image file per row
T = TypeVar("T")


def image_paths(cell: str) -> list[str]:
    """The file(s) of a manifest ``image`` cell: one, or one per channel joined by ``;``."""
    return [part.strip() for part in cell.split(";")]


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A UTF-8 CSV table (a BOM is allowed) as its columns and rows; :class:`DataError` naming the file if unreadable."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path.parent, [DataProblem(path.name, f"not a readable CSV table: {err}")]) from None


@dataclass(frozen=True)
class SiteReading:
    """How a site folder is read (:func:`read_site`, the pre-flight check, a site's cache key).

    ``image_size`` pixels per axis and ``num_classes`` classes of the model; ``target`` is what the
    task learns (its ``TARGET``): the manifest column ``label``, ``mask`` or ``instances``, or ``boxes`` (from
    ``boxes.csv``, with labels that are names from ``class_names`` or class indices);
    ``spatial_dims`` 2 (images) or 3 (volumes); ``preprocess`` how files are decoded; ``channels``
    image channels per case; ``features`` the feature columns of a features manifest (tabular
    sites, see :mod:`medfed.data.tabular`; empty: the manifest names images).
    """

    image_size: int
    num_classes: int
    target: str = "label"
    spatial_dims: int = 2
    class_names: tuple[str, ...] = ()
    preprocess: Preprocess = DEFAULT_PREPROCESS
    channels: int = 1
    multi_label: bool = False
    features: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, data: DataConfig, target: str) -> SiteReading:
        """The reading a run's ``[data]`` section asks for, for a task whose target is ``target``."""
        return cls(
            data.image_size,
            data.num_classes,
            target,
            data.spatial_dims,
            data.class_names,
            Preprocess.from_config(data),
            data.channels,
            data.multi_label,
            data.features,
        )

    def key(self) -> tuple:
        """The settings as a flat tuple, in field order (a cache key)."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))


def read_site(site_dir: str | Path, reading: SiteReading, notices: list[DataProblem] | None = None) -> SiteArrays:
    """Load and validate a site folder as ``reading`` says; raise :class:`DataError` listing every bad row.

    CT images are windowed in Hounsfield units as ``reading.preprocess`` says, see
    :func:`~medfed.data.decode.model_input`. Images are ``(N, channels, *spatial)``: an ``image``
    cell names one file holding ``channels`` channels or ``channels`` files joined by ``;`` (see
    :func:`~medfed.data.decode.load_image`); a row whose images hold another number is an error.
    Masks stored as 0/255 are read as 0/1 with one warning per site. An optional ``spacing`` column
    gives the pixel size in mm for files that do not carry it (``0.5`` for isotropic pixels, or one
    value per axis: ``2.5x0.7x0.7``).

    What is read but worth a look (dropped boxes, masks read as 0/1) is appended to ``notices``
    naming the files, for the site's operator (the pre-flight check); without it, it is logged
    counted only, since training and evaluation logs reach a simulation's coordinator.
    """
    image_size, num_classes, target = reading.image_size, reading.num_classes, reading.target
    spatial_dims, preprocess, channels = reading.spatial_dims, reading.preprocess, reading.channels
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
    if reading.features:
        if not rows:
            raise DataError(site_dir, [DataProblem(MANIFEST, "no rows")])
        return read_feature_site(site_dir, columns, rows, reading.features, num_classes, _patient_leaks(rows))
    boxes = target == "boxes"
    missing = [c for c in (*REQUIRED_COLUMNS, *(() if boxes else (target,))) if c not in columns]
    if missing:
        raise DataError(site_dir, [DataProblem(MANIFEST, f"missing column(s) {missing}; found {columns}")])
    if not rows:
        raise DataError(site_dir, [DataProblem(MANIFEST, "no rows")])
    label_map = read_label_map(site_dir, num_classes, reading.class_names, target)
    if label_map is not None and reading.multi_label:
        problem = "a multi-label site names its findings in the manifest (data.class-names); remove the map"
        raise DataError(site_dir, [DataProblem(LABEL_MAP, problem)])
    if boxes:
        return _read_box_site(site_dir, rows, reading, notices)
    mask_classes = num_classes if label_map is None else MAX_MASK_VALUE + 1  # the map names the values it knows

    problems: list[DataProblem] = []
    images, targets, splits, patients, spacings, diameters = [], [], [], [], [], []
    rescaled: list[Path] = []
    for line, row in enumerate(rows, start=2):
        where = f"{MANIFEST} line {line}"
        value: int | np.ndarray | None
        loaded: tuple[np.ndarray, tuple[float, ...]] | tuple[np.ndarray, tuple[float, ...], Geometry] | None
        if row["split"] not in SPLITS:
            problems.append(DataProblem(where, f"split {row['split']!r} is not one of {list(SPLITS)}"))
        if target == "label" and reading.multi_label:
            value = _parse_labels(row["label"], num_classes, reading.class_names, where, problems)
        elif target == "label" and label_map is not None:
            value = label_map.label(row["label"])
            if value is None:
                known = ", ".join(repr(v) for v in list(label_map.values)[:10])
                problems.append(
                    DataProblem(where, f"label {row['label'][:40]!r} is not in {LABEL_MAP}; it maps {known}")
                )
        elif target == "label":
            value = _parse_label(row["label"], num_classes)
            if value is None:
                problems.append(
                    DataProblem(where, f"label {row['label']!r} is not a class index in [0, {num_classes - 1}]")
                )
        pixel_mm = _parse_spacing(row.get("spacing") or "", spatial_dims, where, problems)
        stated_modality = row.get("modality") or ""
        if target == "mask" and preprocess.field_of_view != "whole":  # image and mask read together
            files = [*image_paths(row["image"]), row["mask"], *([row["fov"]] if row.get("fov") else [])]
            case = _read_files(site_dir, files, where, problems, functools.partial(
                _field_of_view_case, image_files=len(image_paths(row["image"])), image_size=image_size,
                num_classes=mask_classes, preprocess=preprocess, channels=channels, rescaled=rescaled))  # fmt: skip
            loaded, value = (None, None) if case is None else ((case.image, case.spacing), case.mask)
            if case is not None:
                diameters.append(case.diameter)
        else:
            loaded = _read_files(site_dir, image_paths(row["image"]), where, problems, functools.partial(
                load_image, image_size=image_size, spatial_dims=spatial_dims, spacing=pixel_mm,
                preprocess=preprocess, modality=stated_modality, channels=channels))  # fmt: skip
            if target in MASK_TARGETS:
                value = _read_file(site_dir, row[target], where, problems, functools.partial(
                    load_mask, image_size=image_size, num_classes=mask_classes, spatial_dims=spatial_dims,
                    image=None if loaded is None else loaded[2], preprocess=preprocess, rescaled=rescaled,
                    instances=target == "instances"))  # fmt: skip
        if label_map is not None and isinstance(value, np.ndarray):  # a mask of the site's own values
            try:
                value = label_map.translate_mask(value)
            except ValueError as err:
                problems.append(DataProblem(where, f"{row['mask']}: {err}"))
                value = None
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
    card: tuple[str, ...] = ()
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
        labelled=None if label_map is None else labelled_vector(label_map.labelled, num_classes),
    )


def _read_box_site(
    site_dir: Path, rows: list[dict[str, str]], reading: SiteReading, notices: list[DataProblem] | None
) -> SiteArrays:
    """The box site of :func:`read_site`: manifest rows checked here, boxes from ``boxes.csv``."""
    boxes, problems = read_box_table(site_dir / BOXES, {row["image"] for row in rows}, reading.spatial_dims)
    records, splits = [], []
    for line, row in enumerate(rows, start=2):
        where = f"{MANIFEST} line {line}"
        if row["split"] not in SPLITS:
            problems.append(DataProblem(where, f"split {row['split']!r} is not one of {list(SPLITS)}"))
        pixel_mm = _parse_spacing(row.get("spacing") or "", reading.spatial_dims, where, problems)
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
        reading.image_size,
        reading.class_names,
        reading.num_classes,
        origin=site_dir,
        problems=problems,
        preprocess=reading.preprocess,
        channels=reading.channels,
        notices=notices,
        spatial_dims=reading.spatial_dims,
    )


def _field_of_view_case(
    paths: list[Path],
    image_files: int,
    image_size: int,
    num_classes: int,
    preprocess: Preprocess,
    channels: int,
    rescaled: list[Path],
) -> FieldOfViewCase:
    """The case of a manifest row whose files are its ``image_files`` image file(s), then its mask,
    then its field of view when the row gives one."""
    n = image_files
    fov = paths[n + 1] if len(paths) > n + 1 else None
    return load_field_of_view_case(paths[:n], paths[n], fov, image_size, num_classes, preprocess, channels, rescaled)


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
    """Write a site folder from arrays: manifest.csv plus 8-bit PNG images and PNG masks (2D;
    instance label images as 16-bit PNGs) with a ``spacing`` column, or NIfTI images and masks
    whose header holds the spacing (3D). Box targets go to ``boxes.csv`` with class indices as
    labels, in the written image's pixels. Several image channels become an RGB PNG (3 channels,
    2D), one PNG per channel joined by ``;`` (other counts, 2D) or a 4D NIfTI with the channels
    last (3D), as :func:`read_site` reads them back. 2D masks with pixels outside a field of view
    (:data:`~medfed.data.field_of_view.IGNORE`) get a ``fov`` column naming a mask of the field of
    view (255 inside), read back with ``data.field-of-view``. A site that labels only some classes
    gets a ``label-map.toml`` naming them."""
    site_dir = Path(site_dir)
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    masks = site.target_key in MASK_TARGETS
    if masks:
        (site_dir / "masks").mkdir(exist_ok=True)
    boxes = site.target_key == "boxes"
    box_rows: list[tuple[str, Box]] = []
    volumes = site.images.ndim == 5
    with_fov = masks and not volumes and bool((site.targets == IGNORE).any())  # a field of view: a fov column
    fov_cells: list[str] = []
    assert site.spacing is not None  # filled in by SiteArrays.__post_init__
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
                depth = np.uint16 if site.target_key == "instances" else np.uint8  # object ids: a 16-bit PNG
                Image.fromarray(np.maximum(target[0], 0).astype(depth)).save(site_dir / value)
                if with_fov:
                    fov_cells.append(f"fov/{i:06d}.png")
                    Image.fromarray(np.where(target[0] == IGNORE, 0, 255).astype(np.uint8)).save(
                        site_dir / fov_cells[-1]
                    )
            elif boxes:
                box_rows.extend((rel, Box.from_corners(int(row[-1]), row[:-1])) for row in target if row[-1] >= 0)
            elif np.ndim(target) == 1:  # multi-label: the findings present, joined by |
                value = "|".join(str(k) for k in np.flatnonzero(target)) or NO_FINDING
            else:
                value = str(int(target))
            pid = site.patient_ids[i] if site.patient_ids is not None else ""
            values = () if boxes else (value,)
            writer.writerow([rel, *values, split, pid, "" if volumes else "x".join(f"{v:g}" for v in spacing),
                             *(fov_cells[-1:] if with_fov else ())])  # fmt: skip
    if boxes:
        write_box_table(site_dir / BOXES, box_rows)
    if site.labelled is not None:  # the classes it labels, under their own indices
        write_label_map(site_dir, {str(k): int(k) for k in np.flatnonzero(site.labelled)})
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


NO_FINDING = "none"  # a multi-label cell of an image without any finding


def _parse_labels(
    text: str, num_classes: int, class_names: tuple[str, ...], where: str, problems: list[DataProblem]
) -> np.ndarray | None:
    """A multi-label cell as a multi-hot vector ``(num_classes,)``: findings joined by ``|``, each a
    class index or name, or ``none``; else None, with the problem recorded."""
    vector = np.zeros(num_classes, dtype=np.int64)
    if text.strip().lower() == NO_FINDING:
        return vector
    known = f"class indices 0..{num_classes - 1}" + (f" or names {list(class_names)}" if class_names else "")
    parts = [part.strip() for part in text.split("|")]
    for part in parts:
        if part in class_names:
            k = class_names.index(part)
        elif part.isascii() and part.isdigit() and int(part) < num_classes:
            k = int(part)
        else:
            what = "an empty finding" if not part else f"{part!r} is no known finding"
            problems.append(DataProblem(where, f"label {text!r}: {what}; expected {known} joined by '|', or "
                                               f"'{NO_FINDING}' for an image without any finding"))  # fmt: skip
            return None
        if vector[k]:
            problems.append(DataProblem(where, f"label {text!r} names finding {part!r} twice"))
            return None
        vector[k] = 1
    return vector


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


def folder_signature(folder: Path, state_dir: Path | None = None) -> tuple[tuple[str, int, int], ...]:
    """Name (relative to ``folder``), size and modification time of every file under ``folder``,
    leaving out site state (``state_dir`` and any :data:`STATE_FOLDER`): what a cache of the
    folder's decoded data is keyed on."""
    entries = []
    state = state_dir.resolve() if state_dir is not None else None
    for path in sorted(folder.rglob("*")):
        if state is not None and path.resolve().is_relative_to(state):
            continue
        if path.is_file() and STATE_FOLDER not in path.relative_to(folder).parts:
            stat = path.stat()
            entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)
