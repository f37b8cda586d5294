"""A model's score at each site with a bootstrap 95% confidence interval, for any task (the metric
is the task's primary one), and paired comparisons between models scored on the same resamples.

Scores are computed where the test cases are; what comes out is aggregate numbers (a value, an
interval, the number of cases and, for pairing, the per-resample values): no case, no id."""

from __future__ import annotations

import warnings
import zlib
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfed.config import Config
from medfed.data import SiteArrays
from medfed.tasks import MetricAccumulator, Task, get_task

__all__ = ["bootstrap_scores", "interval", "mean_of_sites", "paired_ratio", "site_draws", "without_draws"]


class _Resamplable(MetricAccumulator, Protocol):
    """Metrics over a whole split that can also be computed over a bootstrap draw of its cases."""

    def resampled(self, indices: np.ndarray) -> MetricAccumulator: ...


@torch.no_grad()
def _predictions(task: Task, model: nn.Module, dataset: Dataset, config: Config) -> tuple[torch.Tensor, dict]:
    """Every test case's decoded prediction and its targets (all but the image), in dataset order."""
    model.eval()
    predictions, targets = [], []
    for batch in DataLoader(dataset, batch_size=config.evaluation.batch_size, shuffle=False):
        predictions.append(task.decode(task.infer(model, batch["image"], config), config).cpu())
        targets.append({k: v for k, v in batch.items() if k != "image"})
    return torch.cat(predictions), {k: torch.cat([t[k] for t in targets]) for k in targets[0]}


def _metric(task: Task, config: Config, predictions: torch.Tensor, targets: dict) -> float:
    accumulator = task.metrics(config)
    accumulator.update(predictions, targets)
    return float(accumulator.compute()[task.PRIMARY_METRIC])


def _replicates(task: Task, model: nn.Module, site: SiteArrays, config: Config, draws: np.ndarray) -> np.ndarray:
    """The primary metric on the test split and on each resample of its cases (``draws``: R x n indices)."""
    predictions, targets = _predictions(task, model, site.split("test"), config)
    if task.PRIMARY_METRIC_PER_IMAGE:  # a mean of per-image values: score each image once
        values = np.array([_metric(task, config, predictions[i : i + 1], {k: v[i : i + 1] for k, v in targets.items()})
                           for i in range(len(predictions))])  # fmt: skip
        with warnings.catch_warnings():  # a resample of images that all lack the metric is NaN, and left out
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.array([np.nanmean(values), *(np.nanmean(values[d]) for d in draws)])
    # a task whose primary metric is not per image provides resampled metrics (see Task)
    accumulator = cast(_Resamplable, task.metrics(config))
    accumulator.update(predictions, targets)
    metric = task.PRIMARY_METRIC
    return np.array([accumulator.compute()[metric], *(accumulator.resampled(d).compute()[metric] for d in draws)])


def site_draws(name: str, n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """The ``replicates`` x ``n`` resample indices of site ``name``'s ``n`` test cases: they depend
    only on ``seed``, the name and ``n``, so every model scored at the site sees the same ones."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.integers(0, n, size=(replicates, n))


def bootstrap_scores(
    config: Config, model: nn.Module, sites: dict[str, SiteArrays], replicates: int = 200, seed: int = 0
) -> dict[str, Any]:
    """The task's primary metric on each site's test split with a 95% percentile bootstrap interval
    (the site's test cases resampled with replacement ``replicates`` times), and the mean over the
    sites with its interval (:func:`mean_of_sites`).

    A site's resamples depend only on ``seed``, the site's name and its number of test cases
    (:func:`site_draws`), so two models scored on the same site see the same resamples:
    differences and ratios between them can be bootstrapped pairwise (:func:`paired_ratio`). A
    resample where the metric is undefined (e.g. AUROC with one class drawn) is left out of the
    interval. Each site entry is ``{value, low, high, n, draws}``; :func:`without_draws` drops the
    draws for a results file.
    """
    task = get_task(config.run.task)
    per_site = {}
    for name, site in sites.items():
        n = int((site.splits == "test").sum())
        values = _replicates(task, model, site, config, site_draws(name, n, replicates, seed))
        per_site[name] = {"value": float(values[0]), **interval(values[1:]), "n": n, "draws": values[1:]}
    return {"per_site": per_site, "mean": mean_of_sites(list(per_site.values()))}


def mean_of_sites(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of per-site scores, with the interval of the per-draw mean (sites resampled independently)."""
    draws = np.mean([e["draws"] for e in entries], axis=0)
    return {"value": float(np.mean([e["value"] for e in entries])), **interval(draws), "draws": draws}


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """``a / b`` of two scores bootstrapped on the same resamples, with its 95% interval."""
    return {"value": a["value"] / b["value"], **interval(np.asarray(a["draws"]) / np.asarray(b["draws"]))}


def without_draws(result: Any) -> Any:
    """``result`` with every ``draws`` entry removed (for a results file)."""
    if isinstance(result, dict):
        return {k: without_draws(v) for k, v in result.items() if k != "draws"}
    if isinstance(result, list):
        return [without_draws(v) for v in result]
    return result


def interval(draws: np.ndarray) -> dict[str, float]:
    """The 95% percentile interval ``{low, high}`` of the finite ``draws`` (NaN when none is)."""
    finite = np.asarray(draws)[np.isfinite(draws)]
    if not len(finite):
        return {"low": float("nan"), "high": float("nan")}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"low": float(low), "high": float(high)}
