"""MedMNIST ``.npz`` files (official train/val/test) as in-memory site data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfed.data.arrays import SPLITS, SiteArrays

__all__ = ["read_medmnist"]


def read_medmnist(path: str | Path) -> SiteArrays:
    """Read a 2D MedMNIST ``.npz`` (keys ``{split}_images``, ``{split}_labels``) into [0, 1] float images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path}")
    with np.load(path) as npz:
        expected = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
        missing = [k for k in expected if k not in npz]
        if missing:
            raise ValueError(f"{path}: not a MedMNIST .npz, missing arrays {missing}")
        images, labels, splits = [], [], []
        for split in SPLITS:
            imgs = npz[f"{split}_images"]
            if imgs.ndim != 3:
                raise ValueError(f"{path}: expected 2D grayscale images (N, H, W), got {imgs.shape}")
            images.append(imgs.astype(np.float32)[:, None] / 255.0)
            labels.append(npz[f"{split}_labels"].reshape(-1).astype(np.int64))
            splits.append(np.full(len(imgs), split))
    return SiteArrays(np.concatenate(images), np.concatenate(labels), np.concatenate(splits))
