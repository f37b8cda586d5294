"""Training outside a federation, on data a researcher holds: one model on the union of some sites'
training splits (all sites: the pooled model; one site: its local-only model), with or without
DP, for the same budget as a site spends in the federation. The yardsticks a federation is
measured against (``medfed simulate --protocol cross-site``, ``benchmarks/``)."""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medfed.config import Config
from medfed.data import PrivacyUnitDataset, SiteArrays
from medfed.privacy import default_delta, make_private, quiet_accountant
from medfed.tasks import get_task
from medfed.training import build_optimizer, loop_options, lr_schedule, train

__all__ = ["train_central", "train_loader", "union"]


def union(sites: list[SiteArrays]) -> SiteArrays:
    """All sites' samples as one site (box targets padded to the longest box list). When a site
    labels only some classes, each sample keeps its own site's classes (``labelled`` rows)."""
    rows = max(s.targets.shape[1] for s in sites) if sites[0].target_key == "boxes" else 0
    targets = [s.with_box_rows(rows).targets for s in sites]
    pids = None if any(s.patient_ids is None for s in sites) else np.concatenate([s.patient_ids for s in sites])
    labelled = None
    partial = [s.labelled for s in sites if s.labelled is not None]
    if partial:
        labelled = np.concatenate([_labelled_rows(s, partial[0].shape[-1]) for s in sites])
    return SiteArrays(
        np.concatenate([s.images for s in sites]),
        np.concatenate(targets),
        np.concatenate([s.splits for s in sites]),
        pids,
        sites[0].target_key,
        np.concatenate([s.spacing for s in sites]),
        labelled=labelled,
    )


def _labelled_rows(site: SiteArrays, num_classes: int) -> np.ndarray:
    """One row of labelled classes per sample of ``site``."""
    n = len(site.targets)
    if site.labelled is None:
        return np.ones((n, num_classes), dtype=bool)
    return np.broadcast_to(site.labelled, (n, site.labelled.shape[-1])).copy()


def train_loader(config: Config, site: SiteArrays) -> DataLoader:
    """Shuffled batches of ``site``'s training split, one privacy unit per sample, with the task's
    training transform (``train.augmentations`` views of each)."""
    task = get_task(config.run.task)
    _, units = site.privacy_units("train", config.privacy.unit)
    data = PrivacyUnitDataset(site.split("train"), units, task.train_transform(config), config.train.augmentations)
    return DataLoader(data, batch_size=min(config.train.batch_size, len(data)), shuffle=True)


def train_central(
    config: Config, sites: list[SiteArrays], private: bool, epochs: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """One model trained on the union of ``sites``' training data (all sites: pooled; one: local-only),
    from the model a federation of ``config`` starts from (``run.initial-model`` when set).

    Trains for ``epochs`` passes (default: as many as a site makes in the federation, rounds x
    local-epochs) or, with ``train.local-steps`` set, rounds x local-steps steps; with DP, noise
    is calibrated for ε = ``privacy.target-epsilon`` over those steps at δ = 1/(10 n).

    Returns the model (on CPU) and ``{units, unit, steps, noise_multiplier, epsilon, delta,
    seconds}``: ``epsilon`` and ``delta`` are the guarantee the accountant gives for the steps
    taken (None without DP).
    """
    from medfed.federation import initial_model  # Flower's server side: imported only when needed

    task = get_task(config.run.task)
    model = initial_model(config)  # seeded random weights, or run.initial-model: the federation's start
    pool = union(sites) if len(sites) > 1 else sites[0]
    loader = train_loader(config, pool)
    units = len(cast(PrivacyUnitDataset, loader.dataset))
    unit, _ = pool.privacy_units("train", config.privacy.unit)
    optimizer = build_optimizer(model, config.train)
    epochs = epochs or config.run.rounds * config.train.local_epochs
    steps = config.run.rounds * config.train.local_steps if config.train.local_steps else epochs * len(loader)
    sigma = epsilon = delta = None
    if private:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        delta = default_delta(units)
        with quiet_accountant():
            sigma = get_noise_multiplier(
                target_epsilon=config.privacy.target_epsilon,
                target_delta=delta,
                sample_rate=1 / len(loader),
                steps=steps,
                accountant="rdp",
            )
            accountant = RDPAccountant()
            accountant.history = [(sigma, 1 / len(loader), steps)]
            epsilon = float(accountant.get_epsilon(delta))
        model, optimizer, loader = make_private(model, optimizer, loader, sigma, config.privacy.max_grad_norm)
    schedule = lr_schedule(optimizer, config.train, 0, steps, steps // config.run.rounds)
    started = time.perf_counter()
    train(task, model, loader, optimizer, torch.device("cpu"), epochs=epochs, max_steps=steps,
          schedule=schedule, **loop_options(config.train))  # fmt: skip
    info = {"units": units, "unit": unit, "steps": steps, "noise_multiplier": sigma, "epsilon": epsilon,
            "delta": delta, "seconds": time.perf_counter() - started}  # fmt: skip
    return getattr(model, "_module", model), info
