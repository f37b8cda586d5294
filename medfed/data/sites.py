"""Which sites a simulation has, and each site's data, from the ``[data]`` config section."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from medfed.config import Config, ConfigError
from medfed.data.arrays import SiteArrays
from medfed.data.boxes import load_box_site, read_voc
from medfed.data.decode import Preprocess
from medfed.data.heart_uci import FEATURES, heart_sites
from medfed.data.manifest import SiteReading, folder_signature, read_site
from medfed.data.medmnist import read_medmnist
from medfed.data.pairs import ImagePair, deal_to_sites, find_pairs, read_pairs
from medfed.data.partition import assign_splits, dirichlet_partition, iid_partition
from medfed.data.synthetic import synthetic_multilabel_site, with_channels
from medfed.data.tabular import read_feature_site
from medfed.data.vocabulary import MANIFEST
from medfed.tasks import get_task

__all__ = ["load_simulated_site", "simulated_site_names"]


def simulated_site_names(config: Config) -> list[str]:
    """Names of the simulated sites, in partition order, without those ``data.leave-out`` names.

    Raises :class:`ConfigError` (key ``data.leave-out``) when it names a site the data does not
    give, or leaves fewer than ``run.min-sites`` sites."""
    names = _all_site_names(config)
    left_out = config.data.leave_out
    unknown = [name for name in left_out if name not in names]
    if unknown:
        raise ConfigError(
            f"data.leave-out names {_listed(unknown)}, which the data does not give: its sites are {_listed(names)}",
            "data.leave-out",
        )
    kept = [name for name in names if name not in left_out]
    if left_out and len(kept) < config.run.min_sites:
        raise ConfigError(
            f"data.leave-out = {_listed(list(left_out))} leaves {len(kept)} of the {len(names)} sites, fewer than "
            f"run.min-sites = {config.run.min_sites}",
            "data.leave-out",
        )
    return kept


def _all_site_names(config: Config) -> list[str]:
    """Every site the data gives, ``data.leave-out`` or not."""
    if config.data.source == "sites":
        return [p.name for p in _site_folders(Path(config.data.path))]
    if config.data.site:
        return [source.name for source in config.data.site]
    if config.data.source == "heart-uci":
        return list(heart_sites(config.data.path, config.run.seed)[0])
    return [f"site-{i + 1}" for i in range(config.data.sites)]


def _listed(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def load_simulated_site(config: Config, index: int) -> tuple[str, SiteArrays]:
    """Return ``(name, data)`` of simulated site ``index`` (deterministic in the run seed), with
    ``data.channels`` image channels (synthetic sites: see :func:`with_channels`).

    A simulated site answers several messages per round; its arrays are kept in memory for the
    next one (the last few sites loaded), keyed by the ``[data]`` settings, the seed and the name,
    size and modification time of every file under ``data.path``: decoding three datasets of
    full-size photos again for every message would take longer than training on them. Within a
    simulation (:func:`medfed.simulation.simulate`) they are also kept on disk in the run's scratch
    folder (``MEDFED_SIMULATION_CACHE``), which the simulation's worker processes share and which is
    deleted when it ends.

    ``index`` counts the sites :func:`simulated_site_names` gives; a site gets the same data
    whichever others ``data.leave-out`` names (partitions and seeds use its place among all sites).
    """
    key = (config.data, config.run.seed, config.run.task, index, _files_signature(config))
    if key not in _LOADED:
        while len(_LOADED) >= _KEEP_LOADED:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = _shared_copy(key, config, index)
    return _LOADED[key]


_LOADED: dict[tuple, tuple[str, SiteArrays]] = {}
_KEEP_LOADED = 6
SIMULATION_CACHE = "MEDFED_SIMULATION_CACHE"  # environment: a scratch folder a simulation's processes share


def _shared_copy(key: tuple, config: Config, index: int) -> tuple[str, SiteArrays]:
    """The site from the simulation's scratch folder when another process has loaded it, else loaded
    (and left there for the others: written to a temporary name, then renamed, so never read half-written)."""
    folder = os.environ.get(SIMULATION_CACHE)
    if not folder:
        return _load_simulated_site(config, index)
    path = Path(folder) / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            pids = saved.get("patient_ids")
            site = SiteArrays(saved["images"], saved["targets"], saved["splits"], pids, str(saved["target_key"]),
                              saved["spacing"], tuple(str(line) for line in saved["card"]), saved.get("labelled"))  # fmt: skip
            return str(saved["name"]), site
    name, site = _load_simulated_site(config, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
    assert site.spacing is not None  # filled in by SiteArrays.__post_init__
    # Any: numpy types savez's keywords as arrays or its bool allow_pickle, and ** could fill either
    arrays: dict[str, Any] = {"patient_ids": site.patient_ids} if site.patient_ids is not None else {}
    arrays |= {"labelled": site.labelled} if site.labelled is not None else {}
    np.savez(partial, name=name, images=site.images, targets=site.targets, splits=site.splits,
             target_key=site.target_key, spacing=site.spacing, card=np.asarray(site.card, dtype=str), **arrays)  # fmt: skip
    os.replace(partial, path)
    return name, site


def _files_signature(config: Config) -> str:
    """A hash of the name, size and modification time of the files a simulation reads (none: synthetic)."""
    data = config.data
    if data.source == "synthetic":
        return ""
    root = Path(data.path)
    roots = [root / (s.folder or s.name) for s in data.site] if data.site else [root]
    entries: list[Any] = []
    for top in roots:
        if top.is_dir():
            entries.append((str(top), folder_signature(top)))
        elif top.exists():
            stat = top.stat()
            entries.append((str(top), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(repr(entries).encode()).hexdigest()  # the same in every process (hash() is not)


def _load_simulated_site(config: Config, index: int) -> tuple[str, SiteArrays]:
    data = config.data
    kept = simulated_site_names(config)
    if not 0 <= index < len(kept):
        raise IndexError(f"site index {index} out of range: this simulation has {len(kept)} sites")
    names = _all_site_names(config)
    index = names.index(kept[index])
    task = get_task(config.run.task)
    target = task.TARGET
    if data.source == "synthetic" and data.multi_label:
        site = synthetic_multilabel_site(index, data.samples_per_site, data.image_size, data.num_classes,
                                         config.run.seed)  # fmt: skip
    elif data.source == "synthetic":
        site = task.synthetic_site(
            index,
            data.samples_per_site,
            data.image_size,
            data.num_classes,
            config.run.seed,
            spatial_dims=data.spatial_dims,
        )
    elif data.source == "sites":
        site = read_site(Path(data.path) / names[index], SiteReading.from_config(data, target))
    elif data.source == "heart-uci":
        if config.run.task != "tabular":
            raise ValueError("data.source = 'heart-uci' holds tables: it feeds run.task = 'tabular' only")
        rows = heart_sites(data.path, config.run.seed)[0][names[index]]
        site = read_feature_site(Path(data.path), ["label", "split", *FEATURES], rows, data.features, data.num_classes)
    elif data.source == "voc":
        if target != "boxes":
            raise ValueError("data.source = 'voc' holds bounding boxes: it feeds run.task = 'detection' only")
        site = _voc_site(config, index)
    elif data.source == "pairs":
        if target != "mask":
            raise ValueError(
                "data.source = 'pairs' holds image/mask pairs: it feeds run.task = 'segmentation' only, "
                f"not '{config.run.task}'"
            )
        mine, fov_masks = _pairs_of_site(config, index)
        splits = assign_splits(mine, config.run.seed + index)
        preprocess = Preprocess.from_config(data)
        site = read_pairs(mine, splits, data.image_size, data.num_classes, data.spatial_dims, preprocess,
                          data.channels, fov_masks)  # fmt: skip
    elif target != "label":
        raise ValueError(
            f"data.source = 'medmnist' holds class labels, not {'masks' if target == 'mask' else target}: "
            f"it cannot feed run.task = '{config.run.task}'"
        )
    else:
        pooled = read_medmnist(data.path, data.channels, data.max_pixels)
        if len(pooled.targets) and not 0 <= pooled.targets.min() <= pooled.targets.max() < data.num_classes:
            raise ValueError(
                f"{data.path} holds labels {pooled.targets.min()}..{pooled.targets.max()}: expected class indices "
                f"in [0, data.num-classes - 1 = {data.num_classes - 1}]"
            )
        if pooled.images.shape[-1] != data.image_size:
            raise ValueError(
                f"data.image-size = {data.image_size} but {data.path} holds "
                f"{pooled.images.shape[-1]}px images: set data.image-size = {pooled.images.shape[-1]}"
            )
        if data.partitioner == "dirichlet":
            # every site keeps both classes in its val and test splits, or it could not be scored
            parts = dirichlet_partition(
                pooled.class_labels(), data.sites, data.alpha, config.run.seed, strata=pooled.splits, min_per_class=3
            )
        elif data.partitioner == "iid":
            parts = iid_partition(pooled.class_labels(), data.sites, config.run.seed)
        else:
            raise ValueError("data.partitioner = 'natural' needs data.source = 'sites' (one folder per site)")
        mask = np.zeros(len(pooled.targets), dtype=bool)
        mask[parts[index]] = True
        site = pooled.subset(mask)
    if data.source == "synthetic":
        site = with_channels(site, data.channels)
    return names[index], _cap(site, data.max_samples_per_site, config.run.seed + index)


def _pairs_of_site(config: Config, index: int) -> tuple[list[ImagePair], dict[Path, Path] | None]:
    """Site ``index``'s image/mask pairs, and its field-of-view masks by image when it has a folder of
    them: its own dataset (a ``[data.site.NAME]`` table), else its share of ``data.path``'s patients."""
    data = config.data
    if not data.site:
        root = Path(data.path)
        return deal_to_sites(find_pairs(root / data.images, root / data.masks, data.patient_pattern), data.sites)[
            index
        ], None
    source = data.site[index]
    root = Path(data.path) / (source.folder or source.name)
    if not root.is_dir():
        raise FileNotFoundError(f"data.site.{source.name}: {root} is not a folder (data.path / folder)")
    images = root / (source.images or data.images)
    pairs = find_pairs(images, root / (source.masks or data.masks), source.patient_pattern or data.patient_pattern)
    if not source.fov_masks or data.field_of_view == "whole":
        return pairs, None
    return pairs, {pair.image: pair.mask for pair in find_pairs(images, root / source.fov_masks)}


def _voc_site(config: Config, index: int) -> SiteArrays:
    """Site ``index`` of a Pascal VOC set (``Annotations/``, ``JPEGImages/``): images in name order
    dealt to contiguous blocks, one per site, then split train/val/test at image level."""
    data = config.data
    root = Path(data.path)
    records = read_voc(root / "Annotations", root / "JPEGImages")
    if not data.class_names:
        found = sorted({str(box.label) for record in records for box in record.boxes})
        raise ValueError(
            f"data.path = {root} names its classes {found}: set data.class-names to them in class-index order "
            f"(and data.num-classes = {len(found)})"
        )
    mine = deal_to_sites(records, data.sites)[index]  # deals by .patient: the image name when no patient id
    splits = assign_splits(mine, config.run.seed + index)
    return load_box_site(
        mine,
        splits,
        data.image_size,
        data.class_names,
        data.num_classes,
        origin=root,
        preprocess=Preprocess.from_config(data),
        channels=data.channels,
    )


def _site_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"data.path = {root}: not a folder of site folders")
    folders = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
    if not folders:
        raise FileNotFoundError(f"data.path = {root}: no subfolder holds a {MANIFEST} (one folder per site expected)")
    return folders


def _cap(site: SiteArrays, limit: int, seed: int) -> SiteArrays:
    """Keep at most ``limit`` samples (stratified by split), for quick runs on large data."""
    if limit <= 0 or len(site.targets) <= limit:
        return site
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(site.targets), dtype=bool)
    for split in np.unique(site.splits):
        idx = np.flatnonzero(site.splits == split)
        take = max(1, int(round(limit * len(idx) / len(site.targets))))
        keep[rng.choice(idx, size=min(take, len(idx)), replace=False)] = True
    return site.subset(keep)
