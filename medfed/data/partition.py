"""Split one dataset into simulated sites (IID, Dirichlet label skew, or a natural site column) and a
site's samples into patient-level train/val/test splits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["OfPatient", "assign_splits", "dirichlet_partition", "iid_partition", "natural_partition"]


class OfPatient(Protocol):
    """A sample that belongs to one patient (an image/mask pair, an annotated image, a DICOM series)."""

    @property
    def patient(self) -> str: ...


def iid_partition(labels: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal indices into ``num_sites`` near-equal parts."""
    _check_sites(len(labels), num_sites)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet_partition(
    labels: np.ndarray,
    num_sites: int,
    alpha: float,
    seed: int,
    min_per_site: int = 2,
    strata: np.ndarray | None = None,
    min_per_class: int = 0,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, site shares are drawn from Dirichlet(alpha).

    Small ``alpha`` (e.g. 0.1) gives sites dominated by one class; large ``alpha`` tends to IID.
    ``strata`` (e.g. each sample's official train/val/test split) deals each class's samples of
    every stratum by the same shares, so a site keeps the official split of its samples. Draws are
    repeated (seeded) until every site has at least ``min_per_site`` samples and, in every stratum,
    at least ``min_per_class`` samples of every class: a site whose test split held one class could
    not be scored by AUROC, sensitivity or specificity.
    """
    _check_sites(len(labels), num_sites)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).ravel()
    strata = np.zeros(len(labels), dtype=int) if strata is None else np.asarray(strata).ravel()
    groups = [(cls, stratum) for cls in np.unique(labels) for stratum in np.unique(strata)]
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        enough = True
        for cls in np.unique(labels):
            shares = rng.dirichlet(np.full(num_sites, alpha))
            for stratum in np.unique(strata):
                idx = rng.permutation(np.flatnonzero((labels == cls) & (strata == stratum)))
                cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
                for site, chunk in enumerate(np.split(idx, cuts)):
                    parts[site].extend(chunk.tolist())
                    enough &= len(chunk) >= min_per_class
        if enough and min(len(p) for p in parts) >= min_per_site:
            return [np.sort(np.asarray(p, dtype=int)) for p in parts]
    per_class = f" and >= {min_per_class} of each of {len(groups)} class/split groups" if min_per_class else ""
    raise ValueError(
        f"could not draw a Dirichlet(alpha={alpha}) split of {len(labels)} samples into {num_sites} "
        f"sites with >= {min_per_site} samples each{per_class}; raise data.alpha or lower data.sites"
    )


def assign_splits(samples: Sequence[OfPatient], seed: int, fractions: tuple[float, float] = (0.2, 0.2)) -> list[str]:
    """Patient-level train/val/test split (``fractions`` = val, test; at least one patient each when >= 3)."""
    patients = sorted({s.patient for s in samples})
    order = np.random.default_rng(seed).permutation(len(patients))
    n = len(patients)
    n_val = max(1, round(fractions[0] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[1] * n)) if n >= 3 else 0
    split_of = {}
    for rank, index in enumerate(order):
        split_of[patients[index]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return [split_of[s.patient] for s in samples]


def natural_partition(site_column: np.ndarray) -> dict[str, np.ndarray]:
    """One part per distinct value of a site column (real multi-hospital data)."""
    values = np.asarray(site_column).astype(str)
    return {name: np.flatnonzero(values == name) for name in sorted(set(values.tolist()))}


def _check_sites(n: int, num_sites: int) -> None:
    if num_sites < 1 or num_sites > n:
        raise ValueError(f"cannot split {n} samples into {num_sites} sites")
