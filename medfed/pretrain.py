"""Public initialisation: a starting model trained on data that holds no patient.

Under DP-SGD the noise a small site must add grows as its data shrinks; a federation that starts
from a model which already knows what vessels, lesions or cells look like needs far fewer noisy
steps. ``pretrain`` trains the run's own model (same ``[model]`` and ``[data]`` settings, so the
checkpoint fits ``run.initial-model``) without DP on either seeded synthetic hospitals (the
generators of :mod:`medfed.data.synthetic`, with scanner shifts; for segmentation ``lesions``,
fundus-like ``vessels``, microscopy-like ``nuclei`` or ``organs``), or public site folders the
coordinator points at (e.g. a public dataset written by ``medfed data import``). It never reads the run's own data source, and nothing is
downloaded. The checkpoint's metadata records its provenance; a run's report repeats it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, default_collate

from medfed.config import Config
from medfed.data import PrivacyUnitDataset, SiteArrays
from medfed.data.manifest import SiteReading, read_site
from medfed.data.synthetic import synthetic_nuclei_site, synthetic_organ_site, synthetic_vessel_site, with_channels
from medfed.data.vocabulary import MANIFEST
from medfed.progress import Steps
from medfed.tasks import get_task, seeded_train_transform
from medfed.training import build_optimizer, resolve_device, train
from medfed.weights import model_to_arrays, save_checkpoint

__all__ = ["PHANTOMS", "Phantom", "pretrain", "public_sites"]

Phantom = Literal["lesions", "vessels", "nuclei", "organs"]
PHANTOMS: tuple[str, ...] = typing.get_args(Phantom)
ADAM_LR = 2e-3  # the no-DP recipes' Adam learning rate (segmentation, detection)
SYNTHETIC_SITE_OFFSET = 100  # synthetic pre-training hospitals are not the simulated run's sites 0, 1, 2...


def public_sites(
    config: Config, data: Path | None, sites: int, samples_per_site: int, phantom: Phantom
) -> tuple[list[SiteArrays], str]:
    """The pre-training data and a one-line description of it: public site folders under ``data``
    (one site folder, or a folder of them), else ``sites`` synthetic hospitals."""
    task = get_task(config.run.task)
    d = config.data
    if data is not None:
        folders = (
            [data] if (data / MANIFEST).is_file() else sorted(p for p in data.iterdir() if (p / MANIFEST).is_file())
        )
        if not folders:
            raise FileNotFoundError(f"--data {data}: no {MANIFEST} in it or in its subfolders (site folders expected)")
        reading = SiteReading.from_config(d, task.TARGET)
        arrays = [read_site(f, reading) for f in folders]
        counts = ", ".join(f"{f.name} ({len(a.targets)})" for f, a in zip(folders, arrays, strict=True))
        return arrays, f"public site folders at {data.resolve()}: {counts}"
    seed = config.run.seed
    indices = range(SYNTHETIC_SITE_OFFSET, SYNTHETIC_SITE_OFFSET + sites)
    if phantom == "vessels":
        if task.NAME != "segmentation" or d.spatial_dims != 2 or d.num_classes != 2:
            raise ValueError("vessel phantoms are 2D binary segmentation data (run.task = 'segmentation', 2 classes)")
        arrays = [synthetic_vessel_site(i, samples_per_site, d.image_size, seed) for i in indices]
    elif phantom in ("nuclei", "organs"):
        if task.NAME != "segmentation":
            raise ValueError(f"{phantom} phantoms are segmentation data (run.task = 'segmentation')")
        draw = synthetic_nuclei_site if phantom == "nuclei" else synthetic_organ_site
        arrays = [draw(i, samples_per_site, d.image_size, d.num_classes, seed, spatial_dims=d.spatial_dims)
                  for i in indices]  # fmt: skip
    else:
        arrays = [task.synthetic_site(i, samples_per_site, d.image_size, d.num_classes, seed,
                                      spatial_dims=d.spatial_dims) for i in indices]  # fmt: skip
    arrays = [with_channels(a, d.channels) for a in arrays]
    rows = max((a.targets.shape[1] for a in arrays if a.target_key == "boxes"), default=0)
    arrays = [a.with_box_rows(rows) for a in arrays]  # detection sites' images share batches
    kind = {"vessels": "vessel", "nuclei": "nucleus", "organs": "organ"}.get(phantom) or (
        "object" if task.TARGET == "boxes" else "lesion"
    )
    return arrays, f"synthetic {kind} phantoms: {sites} simulated scanners x {samples_per_site} images, seed {seed}"


def pretrain(
    config: Config,
    out: str | Path,
    data: Path | None = None,
    *,
    epochs: int = 5,
    steps: int = 0,
    sites: int = 3,
    samples_per_site: int = 200,
    phantom: Phantom = "lesions",
    lr: float = 0.0,
    momentum: float = 0.9,
    optimizer: Literal["sgd", "adam"] = "sgd",
    progress: Steps | None = None,
) -> Path:
    """Train ``config``'s model without DP on public data (see module doc); write the checkpoint
    ``out`` (.safetensors + .json with provenance) and return its path.

    All weights train, with SGD at ``lr`` (0: the config's ``train.lr``) and ``momentum``, or with
    ``optimizer`` "adam" at ``lr`` (0: 2e-3, the no-DP recipe's): the run's own ``[train]`` settings
    are often those of private fine-tuning (only biases and norms, no momentum), which cannot build a
    model from random weights. SGD suits the phantoms; on real public photos (CHASE_DB1 from STARE +
    HRF) SGD 0.3 with momentum collapsed to all-background where Adam learns. ``progress`` counts
    the training steps."""
    task = get_task(config.run.task)
    arrays, description = public_sites(config, data, sites, samples_per_site, phantom)
    parts = [(a, s) for a in arrays for s in ("train", "val") if (a.splits == s).any()]
    datasets = [PrivacyUnitDataset(a.split(s), a.privacy_units(s)[1], seeded_train_transform(task, config, config.run.seed * 1000 + i))
                for i, (a, s) in enumerate(parts)]  # fmt: skip
    dataset: torch.utils.data.ConcatDataset[dict[str, torch.Tensor]] = torch.utils.data.ConcatDataset(datasets)
    torch.manual_seed(config.run.seed)
    model = task.build_model(config)
    device = resolve_device(config.train.device)
    model.to(device)
    batch_size = min(config.train.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=_counted(progress))
    if progress is not None:
        progress.update(0, "pre-training steps", total=steps or epochs * len(loader))
    lr = lr or (ADAM_LR if optimizer == "adam" else config.train.lr)
    settings = dataclasses.replace(
        config.train, trainable="all", optimizer=optimizer, lr=lr, momentum=momentum,
        augmentations=1, physical_batch_size=0,
    )  # fmt: skip
    stats = train(task, model, loader, build_optimizer(model, settings), device, epochs=epochs, max_steps=steps)
    model_settings = {"model": config.to_public_dict()["model"], "data": config.to_public_dict()["data"]}
    provenance: dict[str, Any] = {
        "data": description,
        "images": len(dataset),
        "epochs": epochs if not steps else None,
        "steps": stats.steps,
        "final_train_loss": stats.loss,
        "optimizer": {
            "name": optimizer,
            "lr": settings.lr,
            "momentum": momentum if optimizer == "sgd" else None,
            "batch_size": loader.batch_size,
        },  # fmt: skip
        "task": config.run.task,
        "model_settings_sha256": hashlib.sha256(json.dumps(model_settings, sort_keys=True).encode()).hexdigest(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "patient_data": False,
    }
    return save_checkpoint(
        Path(out),
        model_to_arrays(model.cpu()),
        {"round": 0, "task": config.run.task, "config": config.to_public_dict(), "provenance": provenance},
    )


def _counted(progress: Steps | None) -> Callable[[list[Any]], Any]:
    """torch's default batching, counting each batch made as a step (the loader makes a batch for
    every step and no more: one process, no prefetch)."""

    def collate(samples: list[Any]) -> Any:
        if progress is not None:
            progress.advance()
        return default_collate(samples)

    return collate
