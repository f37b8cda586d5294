"""In-memory site data: the common form every loader and generator produces."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SPLITS", "ArrayDataset", "PrivacyUnitDataset", "SiteArrays"]

SPLITS = ("train", "val", "test")

Sample = dict[str, torch.Tensor]


@dataclass
class SiteArrays:
    """One site's samples: images ``(N, C, *spatial)`` float32, targets and split names.

    Targets are class indices ``(N,)`` (``target_key = "label"``), label masks ``(N, 1, *spatial)``
    (``target_key = "mask"``), instance label images ``(N, 1, H, W)`` (``"instances"``: one integer
    per object, 0 = background) or boxes ``(N, M, 2 * spatial_dims + 1)`` float32 (``target_key =
    "boxes"``): rows ``[x1, y1, x2, y2, class]`` (3D: ``[x1, y1, z1, x2, y2, z2, class]``) in
    model-input voxels (x along the last axis, z the first of a volume), object classes from 0,
    padding rows of zeros with class -1; M is the most boxes of any image (at least 1). ``spacing``
    ``(N, spatial_dims)`` is the voxel size in mm along each spatial axis after resampling (1 mm where the files do not say). ``patient_ids`` (optional)
    keep a patient in one split and make the patient the privacy unit; they never leave the site.
    ``card``: lines for the data card on how the files became these arrays (e.g. each camera's
    scale), aggregate only. ``labelled`` ``(num_classes,)`` bool says which classes the site labels
    (its label map, :mod:`medfed.data.label_map`), or ``(N, num_classes)`` which each sample's site
    labels (sites pooled, :func:`medfed.central.union`); None: every class.
    """

    images: np.ndarray
    targets: np.ndarray
    splits: np.ndarray
    patient_ids: np.ndarray | None = None
    target_key: str = "label"
    spacing: np.ndarray | None = None
    card: tuple[str, ...] = ()
    labelled: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim < 4:
            raise ValueError(f"images must be (N, C, *spatial), got shape {self.images.shape}")
        if len(self.targets) != n or len(self.splits) != n:
            raise ValueError(f"{n} images but {len(self.targets)} targets and {len(self.splits)} split entries")
        bad = sorted(set(self.splits.tolist()) - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split names {bad}; expected {list(SPLITS)}")
        columns = 2 * (self.images.ndim - 2) + 1
        if self.target_key == "boxes" and (
            self.targets.ndim != 3 or self.targets.shape[1] < 1 or self.targets.shape[2] != columns
        ):
            raise ValueError(
                f"box targets must be (N, M >= 1, {columns}) rows [corners, class] for images {self.images.shape}; "
                f"got targets {self.targets.shape}"
            )
        if self.spacing is None:
            self.spacing = np.ones((n, self.images.ndim - 2), dtype=np.float32)
        if self.spacing.shape != (n, self.images.ndim - 2):
            raise ValueError(
                f"spacing must be (N, spatial_dims) = {(n, self.images.ndim - 2)}, got {self.spacing.shape}"
            )

    def split(self, name: str) -> ArrayDataset:
        """The samples of one split as a dataset of ``{"image", target_key, "spacing"}`` dicts."""
        keep = self.splits == name
        assert self.spacing is not None  # filled in by __post_init__
        return ArrayDataset(self.images[keep], self.targets[keep], self.target_key, self.spacing[keep],
                            self._labelled(keep))  # fmt: skip

    def subset(self, mask: np.ndarray) -> SiteArrays:
        assert self.spacing is not None  # filled in by __post_init__
        pids = None if self.patient_ids is None else self.patient_ids[mask]
        return SiteArrays(
            self.images[mask],
            self.targets[mask],
            self.splits[mask],
            pids,
            self.target_key,
            self.spacing[mask],
            self.card,
            self._labelled(mask),
        )

    def _labelled(self, keep: np.ndarray) -> np.ndarray | None:
        """``labelled`` for the samples ``keep`` selects: the site's vector, or their rows."""
        return self.labelled if self.labelled is None or self.labelled.ndim == 1 else self.labelled[keep]

    def with_box_rows(self, rows: int) -> SiteArrays:
        """Box targets padded to ``rows`` rows per image with zeros and class -1 (so that sites with
        different most-boxes-per-image can share a batch); other targets as they are."""
        if self.target_key != "boxes" or self.targets.shape[1] >= rows:
            return self
        columns = self.targets.shape[2]
        empty = np.zeros(columns, self.targets.dtype)
        empty[-1] = -1
        padding = np.broadcast_to(empty, (len(self.targets), rows - self.targets.shape[1], columns))
        return dataclasses.replace(self, targets=np.concatenate([self.targets, padding], axis=1))

    def class_labels(self) -> np.ndarray:
        """One class per sample, for stratifying and partitioning: the label, a mask's largest class,
        or for instance label images 1 when the image holds an object.

        For boxes: 0 for an image without boxes, else 1 + the largest object class in the image (as
        for masks, 0 means "nothing found" and higher values rarer, later classes).
        """
        if self.target_key == "boxes":
            return (self.targets[:, :, -1].max(axis=1) + 1).astype(np.int64)
        if self.targets.ndim == 1:
            return self.targets
        largest = self.targets.reshape(len(self.targets), -1).max(axis=1)
        return (largest > 0).astype(np.int64) if self.target_key == "instances" else largest  # objects: class 1

    def privacy_units(self, split: str = "train", unit: str = "patient") -> tuple[str, list[np.ndarray]]:
        """The privacy unit of ``split`` and its samples grouped by unit (indices into the split).

        With ``unit = "patient"`` the unit is the patient when every sample of the split has a
        patient id, else the image; with ``unit = "image"`` it is always the image. Units that
        hold the same image (identical pixels: a copied file, an image listed under two names or
        two patients) are one unit, so that copies cannot make the stated ε weaker than it says.
        """
        keep = self.splits == split
        ids = None if self.patient_ids is None else self.patient_ids[keep]
        if unit == "image" or ids is None or len(ids) == 0 or any(not str(i) for i in ids):
            return "image", _merge_copies([np.array([i]) for i in range(int(keep.sum()))], self.images[keep])
        _, inverse = np.unique(ids, return_inverse=True)
        units = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        return "patient", _merge_copies(units, self.images[keep])


def image_copies(images: np.ndarray) -> int:
    """How many of ``images`` are exact copies (identical pixels) of an earlier one."""
    return len(images) - len({_pixels_digest(image) for image in images})


def _pixels_digest(image: np.ndarray) -> bytes:
    digest = hashlib.blake2b(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def _merge_copies(units: list[np.ndarray], images: np.ndarray) -> list[np.ndarray]:
    """``units`` (sample indices into ``images``) with every set of units that share an identical
    image merged into one, in the order of their first unit; unchanged when nothing is copied."""
    root = list(range(len(units)))

    def find(unit: int) -> int:
        while root[unit] != unit:
            root[unit] = root[root[unit]]
            unit = root[unit]
        return unit

    first_with: dict[bytes, int] = {}
    for unit, members in enumerate(units):
        for index in members:
            earlier = find(first_with.setdefault(_pixels_digest(images[index]), unit))
            root[max(earlier, find(unit))] = min(earlier, find(unit))
    if all(find(unit) == unit for unit in range(len(units))):
        return units
    merged: dict[int, list[np.ndarray]] = {}
    for unit, members in enumerate(units):
        merged.setdefault(find(unit), []).append(members)
    return [np.sort(np.concatenate(parts)) for parts in merged.values()]


class ArrayDataset(Dataset):
    """Samples ``{"image": (C, *spatial) float, target_key: ..., "spacing": (spatial_dims,) float}``.

    Targets are long (labels, masks) or float32 (``target_key = "boxes"``: ``(M, 2 * dims + 1)`` rows per image).
    With ``labelled`` (a site that labels only some classes: ``(K,)``, or ``(N, K)`` one row per
    sample) every sample also holds its classes, as ``"labelled"``: the tasks' losses and metrics
    leave the other classes alone.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        target_key: str = "label",
        spacing: np.ndarray | None = None,
        labelled: np.ndarray | None = None,
    ) -> None:
        self.images = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
        dtype = torch.float32 if target_key == "boxes" else torch.long
        self.targets = torch.as_tensor(np.asarray(targets), dtype=dtype)
        self.target_key = target_key
        if spacing is None:
            spacing = np.ones((len(self.targets), self.images.ndim - 2), dtype=np.float32)
        self.spacing = torch.as_tensor(np.asarray(spacing), dtype=torch.float32)
        self.labelled = None if labelled is None else torch.as_tensor(np.asarray(labelled, dtype=bool))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Sample:
        sample = {"image": self.images[index], self.target_key: self.targets[index], "spacing": self.spacing[index]}
        if self.labelled is not None:
            sample["labelled"] = self.labelled if self.labelled.ndim == 1 else self.labelled[index]
        return sample


class PrivacyUnitDataset(Dataset):
    """Training view with one item per privacy unit: a random image of the unit, then ``transform``.

    With Poisson sampling over this dataset a unit (patient or image) contributes at most one
    sample (one image, one patch) to a step, so per-sample clipping bounds the unit's influence
    and the DP accounting over ``len(self)`` units holds at the unit level.

    ``views`` > 1 returns that many random views of the picked image, each value stacked along a
    new first axis (batches come out ``(B, views, ...)``): augmentation multiplicity, where the
    train loop averages a unit's per-view gradients before clipping.
    """

    def __init__(
        self,
        dataset: Dataset,
        units: list[np.ndarray],
        transform: Callable[[Sample], Sample] | None = None,
        views: int = 1,
    ) -> None:
        if views > 1 and transform is None:
            raise ValueError("several views of an image need a random transform")
        self.dataset = dataset
        self.units = units
        self.transform = transform
        self.views = views

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> Sample:
        members = self.units[index]
        pick = members[int(torch.randint(len(members), ()))] if len(members) > 1 else members[0]
        sample = self.dataset[int(pick)]
        if self.transform is None:
            return sample
        if self.views == 1:
            return self.transform(sample)
        views = [self.transform(sample) for _ in range(self.views)]
        return {key: torch.stack([torch.as_tensor(view[key]) for view in views]) for key in views[0]}
