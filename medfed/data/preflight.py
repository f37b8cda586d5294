"""The pre-flight check a site runs before it joins a run: errors that block, warnings that do not.

``medfed data check`` prints it for hospital IT; the site client runs the same check when a run
first reaches it and, instead of crashing, tells the server *kinds* of problems with counts
(:meth:`Preflight.summary`): fixed phrases that hold no file name, patient or value of the data.
The full list, with files and reasons, stays in the site's own log.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfed.data.arrays import SPLITS, SiteArrays, image_copies
from medfed.data.decode import DEFAULT_PREPROCESS, Preprocess
from medfed.data.label_map import LABEL_MAP, LabelMap, read_label_map
from medfed.data.manifest import SiteReading, read_site
from medfed.data.vocabulary import DataError, DataProblem

__all__ = ["Preflight", "problem_kind", "run_preflight"]

# A problem's kind from its reason: (phrase in the reason, kind). First match wins, so specific first.
KINDS = (
    ("no training samples", "no training split"),
    ("is listed again on line", "image listed on several rows"),
    ("in the train split, read differently", "copies of an image read differently"),
    ("copies of another training image", "copied training images"),
    ("nothing to learn", "no foreground in any training mask"),
    ("read as 0/1", "masks stored as 0/255 read as 0/1"),
    ("data.max-pixels", "image larger than data.max-pixels"),
    ("expected voxel sizes in mm", "bad voxel size in a file header"),
    ("data.channels", "wrong number of image channels"),
    ("share one grid", "channel files on different grids"),
    ("box dropped", "boxes dropped"),
    ("empty val split", "empty val split"),
    ("empty test split", "empty test split"),
    ("training samples: DP noise", "few training samples"),
    ("never occur in the training split", "classes missing from training"),
    ("have no foreground", "masks without foreground"),
    ("appear identically", "same image in two splits"),
    ("voxel sizes at the model differ", "voxel sizes differ"),
    ("NaN or Inf", "NaN/Inf pixels"),
    ("does not match its image's shape", "image/mask shape mismatch"),
    ("mask voxel size", "image/mask voxel size mismatch"),
    ("DICOM-SEG", "DICOM-SEG mask unusable"),
    ("mask values must be class indices", "mask with unknown classes"),
    ("not in label-map.toml", "value not in the site's label map"),
    ("file not found", "missing file"),
    ("leaves the site folder", "file outside the site folder"),
    ("not a usable file name", "bad file name"),
    ("several splits", "patient in several splits"),
    ("is not a class index", "unknown label"),
    ("unknown class", "unknown box class"),
    ("split ", "bad split value"),
    ("spacing ", "bad spacing value"),
    ("missing column", "manifest columns missing"),
    ("a site folder needs manifest.csv", "manifest missing"),
    ("a box site needs boxes.csv", "box table missing"),
    ("must be numbers (pixels)", "bad box coordinates"),
    ("is not in manifest.csv", "box for an image not in the manifest"),
    ("no rows", "manifest empty"),
    ("not a UTF-8 CSV", "manifest unreadable"),
    ("not a UTF-8 box table", "box table unreadable"),
    ("expected a 2D image", "wrong dimensionality"),
    ("expected a 3D volume", "wrong dimensionality"),
    ("unreadable", "unreadable or truncated file"),
)
MIN_TRAIN_SAMPLES = 10


def problem_kind(problem: DataProblem) -> str:
    """A fixed, data-free phrase for what kind of problem this is (safe to send off-site)."""
    if problem.where.startswith(LABEL_MAP):
        return "bad label map"
    return next((kind for phrase, kind in KINDS if phrase in problem.reason), "other data problem")


@dataclass
class Preflight:
    """The check's outcome: the loaded site (None when it has errors), errors and warnings, and the
    site's label map (None: it has none, or it is broken)."""

    site: SiteArrays | None
    errors: list[DataProblem] = field(default_factory=list)
    warnings: list[DataProblem] = field(default_factory=list)
    label_map: LabelMap | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """Counts per kind of error, else per kind of warning: e.g. ``3 missing file; 1 NaN/Inf pixels``."""
        problems = self.errors or self.warnings
        counts = Counter(problem_kind(p) for p in problems)
        return "; ".join(f"{n} {kind}" for kind, n in counts.most_common())


def run_preflight(site_dir: str | Path, reading: SiteReading) -> Preflight:
    """Read and validate a site folder as :func:`read_site` does (its label map too), then look for
    what would make the site's training or evaluation useless or misleading (see :func:`site_findings`). Images holding
    another number of channels than ``reading.channels`` are errors naming the file."""
    notices: list[DataProblem] = []  # dropped boxes, masks read as 0/1: with their files, for the operator
    try:
        site = read_site(site_dir, reading, notices)
    except DataError as err:
        return Preflight(None, err.problems)
    errors, warnings = site_findings(site, reading.num_classes, reading.preprocess)
    label_map = read_label_map(Path(site_dir), reading.num_classes, reading.class_names, reading.target)
    return Preflight(None if errors else site, errors, notices + warnings, label_map)


def site_findings(
    site: SiteArrays, num_classes: int, preprocess: Preprocess = DEFAULT_PREPROCESS
) -> tuple[list[DataProblem], list[DataProblem]]:
    """Errors and warnings about data that loads: no training samples, no foreground in any training
    mask (errors); copies of an image within the training split (one privacy unit), empty val/test
    splits, tiny training sets, classes never seen in training, masks without foreground, the same
    image in two splits, voxel sizes that differ a lot while scans are resized whole (warnings)."""
    errors: list[DataProblem] = []
    found: list[DataProblem] = []
    counts = {split: int(np.sum(site.splits == split)) for split in SPLITS}
    if counts["train"] == 0:
        errors.append(DataProblem("train", "no training samples: the site needs manifest rows with split train"))
    for split in ("val", "test"):
        if counts[split] == 0:
            found.append(DataProblem(split, f"empty {split} split: the server gets no {split} metrics from this site"))
    copies = image_copies(site.images[site.splits == "train"])
    if copies:
        found.append(
            DataProblem(
                "train",
                f"{copies} image(s) are copies of another training image (identical pixels): each image and "
                "its copies count as one privacy unit",
            )
        )
    if 0 < counts["train"] < MIN_TRAIN_SAMPLES:
        found.append(DataProblem("train", f"only {counts['train']} training samples: DP noise will dominate"))
    train = site.splits == "train"
    if site.target_key in ("mask", "instances"):
        foreground = site.targets.reshape(len(site.targets), -1).max(axis=1) > 0
        empty = int(np.sum(~foreground))
        if train.any() and not foreground[train].any():
            errors.append(DataProblem("train", "every training mask is empty: nothing to learn"))
        elif empty:
            found.append(DataProblem("masks", f"{empty} of {len(foreground)} masks have no foreground (negatives)"))
        present = set(np.unique(site.targets[train]).tolist()) if train.any() else set()
        if site.target_key == "instances":  # object ids: any id > 0 is the object class
            present = {min(k, 1) for k in present}
    elif site.target_key == "boxes":
        present = {int(c) + 1 for c in np.unique(site.targets[train][..., -1]) if c >= 0} | {0}
        num_classes += 1  # class 0 stands for "no box" here
    elif site.targets.ndim == 2:  # multi-label: multi-hot rows, one column per finding
        present = set(np.flatnonzero(site.targets[train].any(axis=0)).tolist()) if train.any() else set()
    else:
        present = set(np.unique(site.targets[train]).tolist())
    unlabelled = set() if site.labelled is None else set(np.flatnonzero(~site.labelled).tolist())
    missing = sorted(set(range(num_classes)) - present - unlabelled)  # unlabelled classes are not missing
    if train.any() and missing:
        shown = [m - 1 for m in missing] if site.target_key == "boxes" else missing
        found.append(DataProblem("train", f"class(es) {shown} never occur in the training split"))
    found.extend(_duplicates(site))
    if not preprocess.spacing and site.spacing is not None and len(site.spacing):
        volumes = np.prod(site.spacing, axis=1)
        if volumes.max() > 4 * volumes.min():
            found.append(
                DataProblem(
                    "spacing",
                    f"voxel sizes at the model differ up to {volumes.max() / volumes.min():.0f}x between scans: "
                    "consider data.target-spacing so that a millimetre is the same at every scan",
                )
            )
    return errors, found


def _duplicates(site: SiteArrays) -> list[DataProblem]:
    """Identical model inputs in different splits: the test split would measure memorisation."""
    first_split: dict[str, str] = {}
    leaks: Counter[tuple[str, str]] = Counter()
    for image, split in zip(site.images, site.splits, strict=True):
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        seen = first_split.setdefault(digest, split)
        if seen != split:
            leaks[tuple(sorted((seen, split)))] += 1
    return [
        DataProblem("splits", f"{n} image(s) appear identically in both {a} and {b}") for (a, b), n in leaks.items()
    ]
