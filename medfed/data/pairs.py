"""Image + mask folders as hospitals export them: ``images/`` and ``masks/`` matched by file name.

A mask belongs to the image whose name it repeats: ``case7.nii.gz`` <-> ``case7.nii.gz``,
``case7_0000.nii.gz`` <-> ``case7.nii.gz`` (nnU-Net layout) or ``Image_01L.jpg`` <->
``Image_01L_1stHO.png`` (a suffix after ``_`` or ``-``). Patients are read from file names with
a regular expression (its first group, or the whole match; matched without the risk of a hang, see
:class:`~medfed.data.import_guard.PatientPattern`), so that splits, sites and the DP privacy unit
are patient-level; without one every image is its own patient. A file that is a symlink leading
out of its folder, a broken link or a symlink loop is an error, never read.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from medfed.data.arrays import SiteArrays
from medfed.data.decode import (
    DEFAULT_PREPROCESS,
    Preprocess,
    load_field_of_view_case,
    load_image,
    load_mask,
    note_rescaled,
)
from medfed.data.field_of_view import field_of_view_card
from medfed.data.import_guard import PatientPattern, copy_inside, folder_files, require_training
from medfed.data.medical_io import file_stem
from medfed.data.partition import OfPatient, assign_splits
from medfed.data.vocabulary import MANIFEST, DataError, DataProblem

__all__ = [
    "ImagePair",
    "deal_to_sites",
    "find_pairs",
    "import_pairs",
    "read_pairs",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".dcm")


class ImagePair(NamedTuple):
    """An image, its mask and the patient it belongs to."""

    image: Path
    mask: Path
    patient: str


def _files(folder: Path, what: str, problems: list[DataProblem]) -> list[Path]:
    """The image files of ``folder`` (resolved), adding those that lead out of it to ``problems``."""
    real = Path(os.path.realpath(folder))
    if not real.is_dir():
        raise DataError(folder, [DataProblem(str(folder), f"{what} folder not found")])
    files, unsafe = folder_files(real, IMAGE_SUFFIXES, what)
    if not files and not unsafe:
        raise DataError(folder, [DataProblem(str(folder), f"no image files in the {what} folder ({IMAGE_SUFFIXES})")])
    problems += unsafe
    return files


def find_pairs(
    images_dir: str | Path, masks_dir: str | Path, patient_pattern: str | PatientPattern = ""
) -> list[ImagePair]:
    """Match every image to exactly one mask; raise :class:`DataError` listing every unmatched file
    and every file that is not safe to read. ValueError for a patient pattern that is invalid or
    too slow (:class:`~medfed.data.import_guard.PatientPattern`)."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    if isinstance(patient_pattern, PatientPattern):
        pattern: PatientPattern | None = patient_pattern
    else:
        pattern = PatientPattern(patient_pattern, "patient pattern") if patient_pattern else None
    problems: list[DataProblem] = []
    masks = {file_stem(m): m for m in _files(masks_dir, "masks", problems)}
    matched, used = [], set()
    for image in _files(images_dir, "images", problems):
        stem = file_stem(image)
        base = re.sub(r"_0000$", "", stem)
        candidates = [m for s, m in masks.items() if s in (stem, base) or re.match(re.escape(base) + r"[_-]", s)]
        if len(candidates) != 1:
            found = (
                "no mask" if not candidates else f"{len(candidates)} masks ({', '.join(c.name for c in candidates)})"
            )
            problems.append(DataProblem(image.name, f"{found} in {masks_dir.name}/ match this image's name"))
            continue
        used.add(candidates[0])
        matched.append((image, candidates[0], base))
    stems = [file_stem(image) for image, _, _ in matched]
    patients = pattern.patients(stems) if pattern else [base for _, _, base in matched]
    no_patient = f"{pattern.option} {pattern.pattern!r} finds no patient id" if pattern else ""
    pairs = []
    for (image, mask, _), patient in zip(matched, patients, strict=True):
        if patient is None:
            problems.append(DataProblem(image.name, no_patient))
        else:
            pairs.append(ImagePair(image, mask, patient))
    problems += [DataProblem(m.name, "mask without an image") for m in masks.values() if m not in used]
    if problems:
        raise DataError(images_dir.parent, problems)
    return pairs


_Sample = TypeVar("_Sample", bound=OfPatient)


def deal_to_sites(samples: Sequence[_Sample], sites: int) -> list[list[_Sample]]:
    """Split patients, in name order, into ``sites`` contiguous groups (a natural, patient-level partition)."""
    patients = sorted({p.patient for p in samples})
    if len(patients) < sites:
        raise ValueError(f"{len(patients)} patients cannot make {sites} sites (each site needs at least one)")
    groups = np.array_split(np.arange(len(patients)), sites)
    owner = {patients[i]: site for site, group in enumerate(groups) for i in group}
    return [[p for p in samples if owner[p.patient] == site] for site in range(sites)]


def read_pairs(
    pairs: list[ImagePair],
    splits: list[str],
    image_size: int,
    num_classes: int,
    spatial_dims: int = 2,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
    channels: int = 1,
    fov_masks: dict[Path, Path] | None = None,
) -> SiteArrays:
    """Load matched pairs into arrays (images with ``channels`` channels: 3 keeps a colour photo's
    RGB); raise :class:`DataError` listing every unreadable file.

    ``preprocess.field_of_view`` (``data.field-of-view``) ``mask`` or ``crop`` marks pixels outside
    each photo's field of view as not scored (from ``fov_masks``, image -> mask file, else found in the photo;
    see :func:`~medfed.data.decode.load_field_of_view_case`); the data card then says each
    photo's field-of-view diameter and scale."""
    images, masks, spacings, diameters, problems = [], [], [], [], []
    rescaled: list[Path] = []
    field_of_view = preprocess.field_of_view
    for pair in pairs:
        try:
            if field_of_view == "whole":
                image, spacing, geometry = load_image(
                    pair.image, image_size, spatial_dims, preprocess=preprocess, channels=channels
                )
                mask = load_mask(pair.mask, image_size, num_classes, spatial_dims, geometry, preprocess, rescaled)
            else:
                fov = (fov_masks or {}).get(pair.image)
                case = load_field_of_view_case(pair.image, pair.mask, fov, image_size, num_classes, preprocess,
                                               channels, rescaled)  # fmt: skip
                image, spacing, mask = case.image, case.spacing, case.mask
                diameters.append(case.diameter)
        except Exception as err:  # noqa: BLE001 - every unreadable file is reported
            problems.append(DataProblem(f"{pair.image.name} / {pair.mask.name}", str(err)))
            continue
        images.append(image)
        masks.append(mask)
        spacings.append(spacing)
    if problems:
        raise DataError(pairs[0].image.parent.parent, problems)
    note_rescaled(pairs[0].mask.parent, rescaled, len(masks))
    card: tuple[str, ...] = ()
    if diameters:
        card = field_of_view_card(diameters, image_size, field_of_view, given=bool(fov_masks))
    return SiteArrays(
        np.stack(images),
        np.stack(masks),
        np.asarray(splits, dtype=str),
        np.asarray([p.patient for p in pairs], dtype=str),
        target_key="mask",
        spacing=np.asarray(spacings, dtype=np.float32),
        card=card,
    )


def import_pairs(
    images_dir: str | Path,
    masks_dir: str | Path,
    site_dir: str | Path,
    patient_pattern: str | PatientPattern = "",
    seed: int = 0,
    fractions: tuple[float, float] = (0.2, 0.2),
) -> Path:
    """Make a site folder (copies under ``images/`` and ``masks/`` plus ``manifest.csv``) from two
    folders; :class:`DataError` when the split would leave no patient to train on."""
    pairs = find_pairs(images_dir, masks_dir, patient_pattern)
    splits = assign_splits(pairs, seed, fractions)
    require_training(pairs, splits, fractions, Path(images_dir))
    site_dir = Path(os.path.realpath(site_dir))
    if (site_dir / MANIFEST).exists():
        raise FileExistsError(f"{site_dir / MANIFEST} exists: choose an empty output folder")
    for sub in ("images", "masks"):
        (site_dir / sub).mkdir(parents=True, exist_ok=True)
    with (site_dir / MANIFEST).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "split", "patient_id"])
        for pair, split in zip(pairs, splits, strict=True):
            copy_inside(pair.image, pair.image.parent, site_dir, f"images/{pair.image.name}")
            copy_inside(pair.mask, pair.mask.parent, site_dir, f"masks/{pair.mask.name}")
            writer.writerow([f"images/{pair.image.name}", f"masks/{pair.mask.name}", split, pair.patient])
    return site_dir
