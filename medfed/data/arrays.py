"""In-memory site data: the common form every loader and generator produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SPLITS", "ArrayDataset", "SiteArrays"]

SPLITS = ("train", "val", "test")


@dataclass
class SiteArrays:
    """One site's samples: images ``(N, C, *spatial)`` float32, integer targets and split names.

    Targets are class indices ``(N,)`` (``target_key = "label"``) or label masks ``(N, 1, *spatial)``
    (``target_key = "mask"``). ``patient_ids`` (optional) are kept only for leakage-free
    splitting; they never leave the site.
    """

    images: np.ndarray
    targets: np.ndarray
    splits: np.ndarray
    patient_ids: np.ndarray | None = None
    target_key: str = "label"

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim < 4:
            raise ValueError(f"images must be (N, C, *spatial), got shape {self.images.shape}")
        if len(self.targets) != n or len(self.splits) != n:
            raise ValueError(f"{n} images but {len(self.targets)} targets and {len(self.splits)} split entries")
        bad = sorted(set(self.splits.tolist()) - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split names {bad}; expected {list(SPLITS)}")

    def split(self, name: str) -> ArrayDataset:
        """The samples of one split as a dataset of ``{"image", target_key}`` dicts."""
        keep = self.splits == name
        return ArrayDataset(self.images[keep], self.targets[keep], self.target_key)

    def subset(self, mask: np.ndarray) -> SiteArrays:
        pids = None if self.patient_ids is None else self.patient_ids[mask]
        return SiteArrays(self.images[mask], self.targets[mask], self.splits[mask], pids, self.target_key)

    def class_labels(self) -> np.ndarray:
        """One class per sample, for stratifying and partitioning: the label, or a mask's largest class."""
        if self.targets.ndim == 1:
            return self.targets
        return self.targets.reshape(len(self.targets), -1).max(axis=1)


class ArrayDataset(Dataset):
    """Samples ``{"image": (C, *spatial) float tensor, target_key: long tensor}``."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, target_key: str = "label") -> None:
        self.images = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.target_key = target_key

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], self.target_key: self.targets[index]}
