"""MedMNIST ``.npz`` files (official train/val/test) as in-memory site data."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from medfed.data.arrays import SPLITS, SiteArrays
from medfed.data.medical_io import DEFAULT_MAX_PIXELS, ImageTooLarge

__all__ = ["read_medmnist"]

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PIL's RGB -> L weights
# Stored images compress little (MedMNIST: under 2x); an archive may hold data.max-pixels values, or
# more only when its file is large enough to hold them at this ratio: a zip bomb of zeros is refused.
MAX_EXPANSION = 16


def read_medmnist(path: str | Path, channels: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> SiteArrays:
    """Read a 2D MedMNIST ``.npz`` (keys ``{split}_images``, ``{split}_labels``) into [0, 1] float images.

    Grey sets ``(N, H, W)`` give 1 channel; colour sets ``(N, H, W, 3)`` (PathMNIST, DermaMNIST, ...)
    keep their RGB with ``channels = 3`` and are turned grey as PIL turns a photo grey (ITU-R 601-2
    luma) with ``channels = 1``. Another ``channels`` is a ValueError naming the file.

    The arrays' headers are read first: one image may hold at most ``max_pixels`` pixels
    (``data.max-pixels``), all of them together that many or :data:`MAX_EXPANSION` times the
    file's bytes, whichever is more (:class:`ImageTooLarge` otherwise, before decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            expected = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
            missing = [k for k in expected if k not in npz]
            if missing:
                raise ValueError(f"{path}: not a MedMNIST .npz, missing arrays {missing}")
            _check_sizes(path, npz.zip, expected, max_pixels)
            return _read_splits(path, npz, channels)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as err:
        raise ValueError(f"{path} is not a readable MedMNIST .npz (a zip of .npy arrays): {err}") from None


def _check_sizes(path: Path, archive: zipfile.ZipFile, names: list[str], max_pixels: int) -> None:
    """Check the arrays' shapes and dtypes from their .npy headers, before any array is decoded."""
    total = 0
    for name in names:
        with archive.open(f"{name}.npy") as member:
            try:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
            except (ValueError, EOFError, SyntaxError, TypeError) as err:
                raise ValueError(f"{path}: array {name} is not a readable .npy array: {err}") from None
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
            raise ValueError(f"{path}: array {name} holds {dtype} values: expected numbers")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if name.endswith("_images") and len(shape) >= 3 and int(np.prod(shape[1:3], dtype=np.int64)) > max_pixels:
            raise ImageTooLarge(
                f"{path}: {name} holds {'x'.join(map(str, shape[1:3]))} images, more pixels than "
                f"data.max-pixels = {max_pixels:,}"
            )
        total += count
    allowed = max(max_pixels, MAX_EXPANSION * path.stat().st_size)
    if total > allowed:
        raise ImageTooLarge(
            f"{path} holds {total:,} values by its arrays' headers, more than data.max-pixels = {max_pixels:,} "
            f"and {MAX_EXPANSION} per byte of the file: refused before decoding (a compressed bomb, or raise "
            "data.max-pixels)"
        )


def _read_splits(path: Path, npz: np.lib.npyio.NpzFile, channels: int) -> SiteArrays:
    """The checked arrays of :func:`read_medmnist` as site data."""
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
        if not np.isfinite(imgs).all():
            raise ValueError(f"{path}: {split}_images holds NaN or Inf pixels")
        split_labels = npz[f"{split}_labels"].reshape(-1)
        if len(split_labels) != len(imgs):
            raise ValueError(
                f"{path}: {len(imgs)} {split} images but {len(split_labels)} {split} labels: expected one label each"
            )
        as_float = split_labels.astype(np.float64)
        if not (np.isfinite(as_float).all() and np.array_equal(as_float, np.round(as_float))):
            raise ValueError(f"{path}: {split}_labels holds values that are not class indices")
        images.append(imgs)
        labels.append(split_labels.astype(np.int64))
        splits.append(np.full(len(imgs), split))
    return SiteArrays(np.concatenate(images), np.concatenate(labels), np.concatenate(splits))
