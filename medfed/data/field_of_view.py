"""The field of view of a photo (a fundus camera's bright disc on a black frame) and a common scale.

Retinal cameras differ in resolution by 3-4x (CHASE_DB1 ~960 px across the field of view, HRF
~3000 px), so a model trained at one site sees another site's vessels at another width. Cropping
every photo to the square around its field of view and resizing that square to the model's size
gives every site the same field-of-view diameter in pixels: one physical scale. Pixels outside the
field of view hold no anatomy: their label becomes :data:`IGNORE`, and neither the loss nor the
metrics count them (the usual convention for retinal benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from medfed.data.medical_io import DEFAULT_MAX_PIXELS, open_photo

__all__ = [
    "IGNORE",
    "SquareBox",
    "computed_field_of_view",
    "crop_square",
    "field_of_view_card",
    "field_of_view_square",
    "read_field_of_view",
    "read_photo",
]

IGNORE = -1  # mask label of a pixel outside the field of view: not learned, not scored
BRIGHTNESS_FRACTION = 0.15  # a pixel is inside when its brightest channel exceeds this share of the 99th percentile
MIN_BRIGHTNESS = 10 / 255  # ... and is above the camera's black level
ANALYSIS_SIZE = 1024  # pixels across the copy the field of view is found on


class SquareBox(NamedTuple):
    """A square in a photo's pixel grid (it may reach outside the photo: padded with zeros)."""

    top: int
    left: int
    side: int


def read_photo(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A photo's pixels ``(H, W, C)`` in [0, 1] (grey photos: C = 1), its size checked before decoding."""
    with open_photo(path, max_pixels) as img:
        pixels = np.asarray(img.convert("RGB" if img.mode not in ("L", "1", "I;16", "I") else "L"), dtype=np.float32)
    pixels = pixels / (65535.0 if pixels.max(initial=0) > 255 else 255.0)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def computed_field_of_view(pixels: np.ndarray) -> np.ndarray:
    """The field of view of a photo ``(H, W, C)`` in [0, 1]: the largest connected bright region,
    holes filled (``(H, W)`` bool). Bright: the brightest channel above 15 % of its 99th percentile
    and above 10/255, so a dim vignetted rim stays inside and the black frame and scanner noise
    stay out."""
    step = max(1, -(-max(pixels.shape[:2]) // ANALYSIS_SIZE))  # found on a copy ~1000 px across, then scaled back
    brightness = pixels[::step, ::step].max(axis=-1)
    threshold = max(MIN_BRIGHTNESS, BRIGHTNESS_FRACTION * float(np.percentile(brightness, 99)))
    bright = ndimage.binary_opening(brightness > threshold, iterations=2)
    labels, count = ndimage.label(bright)
    if count == 0:
        raise ValueError("no field of view found: the photo is dark everywhere")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    fov = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    rows, cols = (np.arange(n) // step for n in pixels.shape[:2])
    return fov[np.ix_(rows, cols)]


def read_field_of_view(path: Path, shape: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A field-of-view mask file (non-zero inside) as ``(H, W)`` bool; ValueError unless it has ``shape``."""
    with open_photo(path, max_pixels) as img:
        mask = np.asarray(img.convert("L")) > 0
    if mask.shape != shape:
        raise ValueError(f"field-of-view mask {path.name} is {mask.shape[1]}x{mask.shape[0]} pixels, its image "
                         f"{shape[1]}x{shape[0]}")  # fmt: skip
    if not mask.any():
        raise ValueError(f"field-of-view mask {path.name} is empty (no pixel inside)")
    return mask


def field_of_view_square(fov: np.ndarray) -> SquareBox:
    """The square centred on the field of view whose side is its diameter (its larger extent: a
    disc cut at the top and bottom of the frame, as STARE's is, keeps its full width)."""
    rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
    if not len(rows):
        raise ValueError("the field of view is empty")
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    side = int(max(height, width))
    centre_row, centre_col = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    return SquareBox(int(round(centre_row - side / 2)), int(round(centre_col - side / 2)), side)


def crop_square(array: np.ndarray, box: SquareBox) -> np.ndarray:
    """The ``box`` square of a 2D array (its first two axes), zero outside the array."""
    out = np.zeros((box.side, box.side, *array.shape[2:]), dtype=array.dtype)
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.side, array.shape[0]), min(box.left + box.side, array.shape[1])
    if bottom > top and right > left:
        out[top - box.top : bottom - box.top, left - box.left : right - box.left] = array[top:bottom, left:right]
    return out


def field_of_view_card(diameters: list[int], image_size: int, mode: str, given: bool) -> tuple[str, ...]:
    """Data card lines: where the field of view came from, its diameter and the scale the model sees."""
    low, median, high = np.min(diameters), int(np.median(diameters)), np.max(diameters)
    source = "field-of-view masks" if given else "found in each photo (bright region)"
    lines = [f"field of view: {source}; diameter {low}-{high} px (median {median}) in the photos as stored"]
    if mode == "crop":
        lines.append(
            f"scale: each photo cropped to its field of view and resized to {image_size} px, "
            f"x{image_size / median:.3f} (median): the field of view spans {image_size} px at every site"
        )
    lines.append("metrics and loss count pixels inside the field of view only")
    return tuple(lines)
