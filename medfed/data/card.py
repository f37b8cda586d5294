"""A site's data card: what the files are (formats, modalities, sizes, voxel sizes) and what the
targets hold (tabular sites: the feature count and missing values instead of files), for the pre-flight check a hospital runs before joining a federation. It reads only
headers and pixels of the site's own files and stays at the site."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medfed.data.arrays import SiteArrays
from medfed.data.decode import is_photo
from medfed.data.manifest import image_paths
from medfed.data.medical_io import DEFAULT_MAX_PIXELS, GREY_BANDS, read_channels
from medfed.data.vocabulary import MANIFEST

__all__ = ["DataCard", "data_card"]


@dataclass
class DataCard:
    """Counts and ranges over a site's images, and how its targets are distributed."""

    formats: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    spacings: list[tuple[float, ...]] = field(default_factory=list)
    channels: str = ""
    target_notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The card as short human-readable lines."""
        if not self.formats:  # a features manifest: rows, no files
            return self.target_notes
        out = [
            "formats: " + ", ".join(f"{k} {v}" for k, v in self.formats.most_common()),
            "modalities: " + ", ".join(f"{k} {v}" for k, v in self.modalities.most_common()),
            f"channels: {self.channels}",
        ]
        if self.shapes:
            out.append(f"image sizes: {_range(self.shapes, '{:d}')} (pixels per axis, as stored)")
        if self.spacings:
            out.append(f"voxel sizes: {_range(self.spacings, '{:.3g}')} mm (the manifest's spacing, else the file's)")
        return out + self.target_notes


def data_card(site_dir: str | Path, site: SiteArrays, max_pixels: int = DEFAULT_MAX_PIXELS) -> DataCard:
    """The data card of a site folder that :func:`medfed.data.read_site` has loaded as ``site``
    (its channel count is that of ``site``'s images; sizes are the first channel's), its files read
    again under the same ``max_pixels`` (``data.max-pixels``)."""
    site_dir = Path(site_dir)
    with (site_dir / MANIFEST).open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    card = DataCard()
    if rows and "image" not in rows[0]:  # a features manifest (tabular): the reader's lines say it all
        card.target_notes = [*site.card, *_target_notes(site)]
        return card
    channels, spatial_dims = site.images.shape[1], site.images.ndim - 2
    kinds: Counter[str] = Counter()
    for row in rows:
        paths = [site_dir / p for p in image_paths(row["image"])]
        path = paths[0]
        scan = read_channels(path, 1 if len(paths) > 1 else channels, spatial_dims, max_pixels)[0]
        kinds[_channel_kind(paths, channels)] += 1
        card.formats.update(_format(p) for p in paths)
        stated_modality = (row.get("modality") or "").strip().upper()
        card.modalities[scan.modality or stated_modality or ("photo" if is_photo(path) else "not stated")] += 1
        card.shapes.append(tuple(int(n) for n in scan.array.shape if n > 1))
        stated = [float(v) for v in (row.get("spacing") or "").lower().split("x") if v.strip()]
        own = tuple(float(s) for s, n in zip(scan.spacing, scan.array.shape, strict=False) if n > 1)
        card.spacings.append(tuple(stated * len(own)) if len(stated) == 1 else tuple(stated) or own)
    shown = ", ".join(kind if len(kinds) == 1 else f"{kind} {n}" for kind, n in kinds.most_common())
    card.channels = f"{channels} ({shown})"
    card.target_notes = _target_notes(site)
    return card


def _channel_kind(paths: list[Path], channels: int) -> str:
    """How one case's files give its channels, for the card (a colour photo turned grey is worth saying)."""
    if channels == 1:
        return "colour photos turned grey" if any(_is_colour(p) for p in paths) else "grey"
    if len(paths) > 1:
        return "one file per channel"
    return "RGB" if is_photo(paths[0]) else "in one file"


def _is_colour(path: Path) -> bool:
    """A colour photo (from its header only)."""
    if not is_photo(path):
        return False
    with Image.open(path) as img:
        return not set(img.getbands()) <= GREY_BANDS


def _format(path: Path) -> str:
    if path.is_dir():
        return "DICOM series"
    name = path.name.lower()
    return "NIfTI" if name.endswith((".nii", ".nii.gz")) else path.suffix.lstrip(".").upper() or "no extension"


def _range(values: list[tuple], fmt: str) -> str:
    dims = {len(v) for v in values}
    if len(dims) != 1:
        return f"mixed dimensionality {sorted(dims)}"
    array = np.asarray(values, dtype=float)
    low, high = array.min(axis=0), array.max(axis=0)
    show = lambda v: " x ".join(fmt.format(int(x) if "d" in fmt else x) for x in v)  # noqa: E731
    return show(low) if np.allclose(low, high) else f"{show(low)} to {show(high)}"


def _target_notes(site: SiteArrays) -> list[str]:
    if site.target_key == "instances":
        objects = [len(np.unique(t)) - int((t == 0).any()) for t in site.targets]
        return [f"objects per image: {min(objects)} to {max(objects)} (mean {np.mean(objects):.1f})"]
    if site.target_key == "mask":
        masks = site.targets.reshape(len(site.targets), -1)
        empty = int((masks.max(axis=1) == 0).sum())
        classes, counts = np.unique(masks, return_counts=True)
        share = ", ".join(f"class {c} {n / masks.size:.2%}" for c, n in zip(classes, counts, strict=True))
        return [f"mask voxels: {share}", f"masks without foreground: {empty} of {len(masks)}"]
    if site.target_key == "boxes":
        valid = site.targets[..., -1] >= 0
        dims = site.images.ndim - 2
        sides = site.targets[..., dims : 2 * dims] - site.targets[..., :dims]
        per_image = valid.sum(axis=1)
        return [
            f"boxes per image: {per_image.min()} to {per_image.max()} (mean {per_image.mean():.1f})",
            f"box sides at model input: median {np.median(sides[valid]):.1f} {'px' if dims == 2 else 'voxels'}"
            if valid.any()
            else "no boxes",
        ]
    if site.targets.ndim == 2:  # multi-label: multi-hot rows
        counts = site.targets.sum(axis=0)
        found = ", ".join(f"class {k} {int(n)}" for k, n in enumerate(counts))
        none = int((site.targets.sum(axis=1) == 0).sum())
        return [f"findings (images holding each): {found}; images without any {none}"]
    labels, counts = np.unique(site.targets, return_counts=True)
    return ["labels: " + ", ".join(f"class {k} {n}" for k, n in zip(labels, counts, strict=True))]
