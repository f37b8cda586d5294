"""What the benchmarks share: pooled training on the union of the sites, a FedAvg run summarised,
and DP vs non-DP training throughput, for any task (the metric is the task's primary one)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medfed.config import Config
from medfed.data import PrivacyUnitDataset, SiteArrays
from medfed.privacy import default_delta, make_private
from medfed.simulation import simulate
from medfed.tasks import get_task
from medfed.training import build_optimizer, evaluate, train

__all__ = ["fedavg", "pooled", "throughput", "union"]


def union(sites: list[SiteArrays]) -> SiteArrays:
    """All sites' samples as one site (box targets padded to the longest box list)."""
    targets = [s.targets for s in sites]
    if sites[0].target_key == "boxes":
        rows = max(t.shape[1] for t in targets)
        targets = [np.pad(t, ((0, 0), (0, rows - t.shape[1]), (0, 0)), constant_values=-1) for t in targets]
    pids = None if any(s.patient_ids is None for s in sites) else np.concatenate([s.patient_ids for s in sites])
    return SiteArrays(
        np.concatenate([s.images for s in sites]),
        np.concatenate(targets),
        np.concatenate([s.splits for s in sites]),
        pids,
        sites[0].target_key,
        np.concatenate([s.spacing for s in sites]),
    )


def _loader(config: Config, site: SiteArrays) -> DataLoader:
    task = get_task(config.run.task)
    _, units = site.privacy_units("train")
    data = PrivacyUnitDataset(site.split("train"), units, task.train_transform(config))
    return DataLoader(data, batch_size=min(config.train.batch_size, len(data)), shuffle=True)


def pooled(config: Config, sites: list[SiteArrays], private: bool, epochs: int = 0) -> dict[str, Any]:
    """One model trained on the union of the sites' training data; the task's metric on each site's test split.

    Trains for ``epochs`` passes (default: as many as a site makes in the federation, rounds x
    local-epochs) or, with ``train.local-steps`` set, rounds x local-steps steps; with DP, noise
    is calibrated for ε = ``privacy.target-epsilon`` over those steps at δ = 1/(10 n).
    """
    task = get_task(config.run.task)
    torch.manual_seed(config.run.seed)
    model = task.build_model(config)
    pool = union(sites)
    loader = _loader(config, pool)
    units = len(loader.dataset)
    unit, _ = pool.privacy_units("train")
    optimizer = build_optimizer(model, config.train)
    epochs = epochs or config.run.rounds * config.train.local_epochs
    steps = config.run.rounds * config.train.local_steps if config.train.local_steps else epochs * len(loader)
    sigma = None
    if private:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=config.privacy.target_epsilon,
            target_delta=default_delta(units),
            sample_rate=1 / len(loader),
            steps=steps,
            accountant="rdp",
        )
        model, optimizer, loader = make_private(model, optimizer, loader, sigma, config.privacy.max_grad_norm)
    started = time.perf_counter()
    train(task, model, loader, optimizer, torch.device("cpu"), epochs=epochs, max_steps=steps)
    seconds = time.perf_counter() - started
    model = getattr(model, "_module", model)
    results = {
        f"site-{i + 1}": evaluate(task, model, s.split("test"), config, torch.device("cpu"))
        for i, s in enumerate(sites)
    }
    metric = task.PRIMARY_METRIC
    per_site = {site: r[metric] for site, r in results.items()}
    return {"per_site": per_site, "mean": float(np.mean(list(per_site.values()))), "units": units, "unit": unit,
            "steps": steps, "noise_multiplier": sigma, "seconds": seconds, "metrics": results}  # fmt: skip


def fedavg(config: Config, out: Path) -> dict[str, Any]:
    """``medfed simulate`` with ``config``: per-site test metric, local-only diagonal, ε and σ per site."""
    started = time.perf_counter()
    report = simulate(config, out)
    metric = report["primary_metric"]
    per_site = {s: m[metric] for s, m in report["final"]["per_site"].items()}
    cross = report["final"].get("cross_site") or {}
    local = {
        m: row[cross["sites"].index(m)] for m, row in zip(cross.get("models", []), cross.get("matrix", []), strict=True)
        if m != "global"
    }  # fmt: skip
    privacy = report["privacy"]
    return {
        "per_site": per_site,
        "mean": float(np.mean(list(per_site.values()))),
        "local_only_on_own_test": local,
        "local_only_mean": float(np.mean(list(local.values()))) if local else None,
        "epsilon": {s: p["epsilon"] for s, p in privacy.items()},
        "unit": {s: p.get("unit") for s, p in privacy.items()},
        "noise_multiplier": {s: p["noise_multiplier"] for s, p in privacy.items()},
        "seconds": time.perf_counter() - started,
        "metrics": report["final"]["per_site"],
    }


def throughput(config: Config, site: SiteArrays, steps: int = 20) -> dict[str, float]:
    """Training samples per second at one site, without and with DP-SGD (same model, batch, data), and their ratio."""
    task = get_task(config.run.task)
    result: dict[str, float] = {}
    for private in (False, True):
        torch.manual_seed(config.run.seed)
        model = task.build_model(config)
        loader = _loader(config, site)
        optimizer = build_optimizer(model, config.train)
        if private:
            model, optimizer, loader = make_private(model, optimizer, loader, 1.0, config.privacy.max_grad_norm)
        train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=2)  # warm-up
        stats = train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=steps)
        result["dp_samples_per_s" if private else "samples_per_s"] = stats.examples / stats.seconds
    result["dp_ratio"] = result["dp_samples_per_s"] / result["samples_per_s"]
    return result
