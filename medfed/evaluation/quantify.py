"""Per-case quantification of a segmentation: how many structures, how large, how wrong.

Sizes use the real voxel size: area in mm² for 2D images, volume in mL for 3D volumes. A
structure is a connected component of the foreground (any class > 0; face-connected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "HU_STATISTICS",
    "density",
    "remove_small_structures",
    "size_unit",
    "structure_count",
    "structure_size",
    "quantify_case",
]

HU_STATISTICS = ("hu_mean", "hu_std", "hu_min", "hu_max")


def size_unit(spatial_dims: int) -> str:
    """``mm2`` for images, ``mL`` for volumes."""
    return "mL" if spatial_dims == 3 else "mm2"


def structure_size(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Foreground size of a label map: area in mm² (2D) or volume in mL (3D)."""
    if mask.ndim != len(spacing):
        raise ValueError(f"mask has {mask.ndim} axes but spacing has {len(spacing)} values")
    voxel = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    size = float(np.count_nonzero(mask)) * voxel
    return size / 1000.0 if mask.ndim == 3 else size


def structure_count(mask: np.ndarray) -> int:
    """Number of connected foreground structures (lesions, vessels trees, organs)."""
    return int(ndimage.label(mask > 0)[1])


def remove_small_structures(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` with every connected foreground structure of fewer than ``min_size`` pixels (voxels)
    set to background: specks of noise would otherwise count as lesions. 0 keeps everything."""
    if min_size <= 0:
        return labels
    components, count = ndimage.label(labels > 0)
    if count == 0:
        return labels
    sizes = np.bincount(components.ravel())
    small = sizes < min_size
    small[0] = False  # the background stays
    return np.where(small[components], 0, labels)


def density(intensities: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation (population), minimum and maximum of ``intensities`` where ``inside``
    (:data:`HU_STATISTICS`: for CT, Hounsfield units as stored, before any windowing); NaN for
    an empty region."""
    values = np.asarray(intensities, dtype=np.float64)[np.asarray(inside, dtype=bool)]
    if values.size == 0:
        return dict.fromkeys(HU_STATISTICS, math.nan)
    return dict(zip(HU_STATISTICS, (values.mean(), values.std(), values.min(), values.max()), strict=True))


def quantify_case(prediction: np.ndarray, reference: np.ndarray | None, spacing: Sequence[float]) -> dict[str, float]:
    """Count and size of the predicted structures, and against a reference when one is given.

    ``rel_size_error`` is (predicted - reference) / reference size, NaN when the reference is empty.
    """
    out = {"count": float(structure_count(prediction)), "size": structure_size(prediction, spacing)}
    if reference is not None:
        ref_size = structure_size(reference, spacing)
        out["reference_count"] = float(structure_count(reference))
        out["reference_size"] = ref_size
        out["rel_size_error"] = (out["size"] - ref_size) / ref_size if ref_size > 0 else math.nan
    return out
