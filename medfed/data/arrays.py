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
    """One site's samples: images ``(N, C, H, W)`` float32, integer labels ``(N,)`` and split names.

    ``patient_ids`` (optional) are kept only for leakage-free splitting; they never leave the site.
    """

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    patient_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {self.images.shape}")
        if len(self.labels) != n or len(self.splits) != n:
            raise ValueError(f"{n} images but {len(self.labels)} labels and {len(self.splits)} split entries")
        bad = sorted(set(self.splits.tolist()) - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split names {bad}; expected {list(SPLITS)}")

    def split(self, name: str) -> ArrayDataset:
        """The samples of one split as a dataset of ``{"image", "label"}`` dicts."""
        keep = self.splits == name
        return ArrayDataset(self.images[keep], self.labels[keep])

    def subset(self, mask: np.ndarray) -> SiteArrays:
        pids = None if self.patient_ids is None else self.patient_ids[mask]
        return SiteArrays(self.images[mask], self.labels[mask], self.splits[mask], pids)


class ArrayDataset(Dataset):
    """Samples ``{"image": (C, H, W) float tensor, "label": long tensor}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}
