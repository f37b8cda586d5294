"""MedMNIST ``.npz`` files (official train/val/test) as in-memory site data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfed.data.arrays import SPLITS, SiteArrays

__all__ = ["read_medmnist"]

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PIL's RGB -> L weights


def read_medmnist(path: str | Path, channels: int = 1) -> SiteArrays:
    """Read a 2D MedMNIST ``.npz`` (keys ``{split}_images``, ``{split}_labels``) into [0, 1] float images.

    Grey sets ``(N, H, W)`` give 1 channel; colour sets ``(N, H, W, 3)`` (PathMNIST, DermaMNIST, ...)
    keep their RGB with ``channels = 3`` and are turned grey as PIL turns a photo grey (ITU-R 601-2
    luma) with ``channels = 1``. Another ``channels`` is a ValueError naming the file.
    """
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
            imgs = npz[f"{split}_images"].astype(np.float32) / 255.0
            if imgs.ndim == 4 and imgs.shape[-1] == 3:
                imgs = (imgs @ LUMA)[:, None] if channels == 1 else np.moveaxis(imgs, -1, 1)
            elif imgs.ndim == 3:
                imgs = imgs[:, None]
            else:
                raise ValueError(f"{path}: expected 2D grey (N, H, W) or RGB (N, H, W, 3) images, got {imgs.shape}")
            if imgs.shape[1] != channels:
                found = "grey, 1 channel" if imgs.shape[1] == 1 else "RGB, 3 channels"
                raise ValueError(
                    f"{path} holds {found} images: data.channels = {channels} expects {channels}; "
                    f"set data.channels = {imgs.shape[1]}"
                )
            images.append(imgs)
            labels.append(npz[f"{split}_labels"].reshape(-1).astype(np.int64))
            splits.append(np.full(len(imgs), split))
    return SiteArrays(np.concatenate(images), np.concatenate(labels), np.concatenate(splits))
