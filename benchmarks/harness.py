"""What the benchmarks share, for any task (the metric is the task's primary one): training on
the union of some sites (pooled, or one site alone), a federation run and its global model, the
metric on each site's test split with a bootstrap 95% confidence interval, DP vs non-DP training
throughput, traffic per round in float32 models, the peak memory of a process tree, and figures."""

from __future__ import annotations

import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfed.config import Config, load_config
from medfed.data import PrivacyUnitDataset, SiteArrays
from medfed.privacy import default_delta, make_private
from medfed.simulation import simulate
from medfed.tasks import get_task
from medfed.training import build_optimizer, evaluate, loop_options, lr_schedule, train
from medfed.weights import load_checkpoint

# where benchmarks write NAME.json and plots/NAME.png (tests point it at a temporary folder)
RESULTS = Path(os.environ.get("MEDFED_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

__all__ = [
    "RESULTS",
    "PeakMemory",
    "bench_config",
    "bootstrap_scores",
    "fedavg",
    "federated_model",
    "mean_of_sites",
    "model_bytes",
    "paired_ratio",
    "per_round",
    "pooled",
    "pyplot",
    "save_figure",
    "throughput",
    "train_central",
    "union",
    "without_draws",
]


def bench_config(file: str, data: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """``configs/FILE`` for a benchmark: cross-site matrix and example images off, ``data.path`` at
    ``data`` (None: the config's own synthetic data), then ``overrides``."""
    base: dict[str, Any] = {"evaluation.cross-site": False, "evaluation.example-images": 0}
    if data is not None:
        if not data.exists():
            raise SystemExit(f"data not found at {data} (the benchmarks read ../shared/data beside the repo)")
        base["data.path"] = str(data)
    return load_config(CONFIGS / file, base | (overrides or {}))


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
    _, units = site.privacy_units("train", config.privacy.unit)
    data = PrivacyUnitDataset(site.split("train"), units, task.train_transform(config), config.train.augmentations)
    return DataLoader(data, batch_size=min(config.train.batch_size, len(data)), shuffle=True)


def train_central(
    config: Config, sites: list[SiteArrays], private: bool, epochs: int = 0
) -> tuple[nn.Module, dict[str, Any]]:
    """One model trained on the union of ``sites``' training data (all sites: pooled; one: local-only).

    Trains for ``epochs`` passes (default: as many as a site makes in the federation, rounds x
    local-epochs) or, with ``train.local-steps`` set, rounds x local-steps steps; with DP, noise
    is calibrated for ε = ``privacy.target-epsilon`` over those steps at δ = 1/(10 n).
    """
    task = get_task(config.run.task)
    torch.manual_seed(config.run.seed)
    model = task.build_model(config)
    pool = union(sites) if len(sites) > 1 else sites[0]
    loader = _loader(config, pool)
    units = len(loader.dataset)
    unit, _ = pool.privacy_units("train", config.privacy.unit)
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
    schedule = lr_schedule(optimizer, config.train, 0, steps, steps // config.run.rounds)
    started = time.perf_counter()
    train(task, model, loader, optimizer, torch.device("cpu"), epochs=epochs, max_steps=steps,
          schedule=schedule, **loop_options(config.train))  # fmt: skip
    info = {"units": units, "unit": unit, "steps": steps, "noise_multiplier": sigma,
            "seconds": time.perf_counter() - started}  # fmt: skip
    return getattr(model, "_module", model), info


def pooled(config: Config, sites: list[SiteArrays], private: bool, epochs: int = 0) -> dict[str, Any]:
    """:func:`train_central` on all sites; the task's metric on each site's test split."""
    task = get_task(config.run.task)
    model, info = train_central(config, sites, private, epochs)
    results = {
        f"site-{i + 1}": evaluate(task, model, s.split("test"), config, torch.device("cpu"))
        for i, s in enumerate(sites)
    }
    per_site = {site: r[task.PRIMARY_METRIC] for site, r in results.items()}
    return {"per_site": per_site, "mean": float(np.mean(list(per_site.values()))), **info, "metrics": results}


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


def federated_model(config: Config, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``medfed simulate`` with ``config`` into ``out``: the final global model and the report."""
    report = simulate(config, out)
    model = get_task(config.run.task).build_model(config)
    state, _ = load_checkpoint(out / "checkpoints" / "global.safetensors")
    model.load_state_dict(state)
    return model, report


@torch.no_grad()
def _predictions(task: Any, model: nn.Module, dataset: Dataset, config: Config) -> tuple[torch.Tensor, dict]:
    """Every test case's decoded prediction and its targets (all but the image), in dataset order."""
    model.eval()
    predictions, targets = [], []
    for batch in DataLoader(dataset, batch_size=config.evaluation.batch_size, shuffle=False):
        predictions.append(task.decode(task.infer(model, batch["image"], config)).cpu())
        targets.append({k: v for k, v in batch.items() if k != "image"})
    return torch.cat(predictions), {k: torch.cat([t[k] for t in targets]) for k in targets[0]}


def _metric(task: Any, config: Config, predictions: torch.Tensor, targets: dict) -> float:
    accumulator = task.metrics(config)
    accumulator.update(predictions, targets)
    return float(accumulator.compute()[task.PRIMARY_METRIC])


def _replicates(task: Any, model: nn.Module, site: SiteArrays, config: Config, draws: np.ndarray) -> np.ndarray:
    """The primary metric on the test split and on each resample of its cases (``draws``: R x n indices)."""
    predictions, targets = _predictions(task, model, site.split("test"), config)
    if task.PRIMARY_METRIC_PER_IMAGE:  # a mean of per-image values: score each image once
        values = np.array([_metric(task, config, predictions[i : i + 1], {k: v[i : i + 1] for k, v in targets.items()})
                           for i in range(len(predictions))])  # fmt: skip
        return np.array([np.nanmean(values), *(np.nanmean(values[d]) for d in draws)])
    accumulator = task.metrics(config)
    accumulator.update(predictions, targets)
    metric = task.PRIMARY_METRIC
    return np.array([accumulator.compute()[metric], *(accumulator.resampled(d).compute()[metric] for d in draws)])


def bootstrap_scores(
    config: Config, model: nn.Module, sites: dict[str, SiteArrays], replicates: int = 200, seed: int = 0
) -> dict[str, Any]:
    """The task's primary metric on each site's test split with a 95% percentile bootstrap interval
    (the site's test cases resampled with replacement ``replicates`` times), and the mean over the
    sites with its interval (:func:`mean_of_sites`).

    A site's resamples depend only on ``seed``, the site's name and its number of test cases, so
    two models scored on the same site see the same resamples: differences and ratios between
    them can be bootstrapped pairwise (:func:`paired_ratio`). A resample where the metric is
    undefined (e.g. AUROC with one class drawn) is left out of the interval. Each site entry is
    ``{value, low, high, n, draws}``; :func:`without_draws` drops the draws for a results file.
    """
    task = get_task(config.run.task)
    per_site = {}
    for name, site in sites.items():
        n = int((site.splits == "test").sum())
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        values = _replicates(task, model, site, config, rng.integers(0, n, size=(replicates, n)))
        per_site[name] = {"value": float(values[0]), **_interval(values[1:]), "n": n, "draws": values[1:]}
    return {"per_site": per_site, "mean": mean_of_sites(list(per_site.values()))}


def mean_of_sites(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of per-site scores, with the interval of the per-draw mean (sites resampled independently)."""
    draws = np.mean([e["draws"] for e in entries], axis=0)
    return {"value": float(np.mean([e["value"] for e in entries])), **_interval(draws), "draws": draws}


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """``a / b`` of two scores bootstrapped on the same resamples, with its 95% interval."""
    return {"value": a["value"] / b["value"], **_interval(np.asarray(a["draws"]) / np.asarray(b["draws"]))}


def without_draws(result: Any) -> Any:
    """``result`` with every ``draws`` entry removed (for a results file)."""
    if isinstance(result, dict):
        return {k: without_draws(v) for k, v in result.items() if k != "draws"}
    if isinstance(result, list):
        return [without_draws(v) for v in result]
    return result


def _interval(draws: np.ndarray) -> dict[str, float]:
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return {"low": float("nan"), "high": float("nan")}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"low": float(low), "high": float(high)}


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
        options = loop_options(config.train)
        train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=2, **options)  # warm-up
        stats = train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=steps, **options)
        result["dp_samples_per_s" if private else "samples_per_s"] = stats.examples / stats.seconds
    result["dp_ratio"] = result["dp_samples_per_s"] / result["samples_per_s"]
    return result


def model_bytes(config: Config) -> int:
    """The size of ``config``'s model as float32 (numel x 4 over its state dict)."""
    model = get_task(config.run.task).build_model(config)
    return sum(t.numel() * 4 for t in model.state_dict().values())


def per_round(report: dict[str, Any], sites: int, model: int) -> list[dict[str, Any]]:
    """Per round of a report: wall seconds, the slowest site's local training seconds and their
    ratio, and the bytes down and up per site in units of the float32 model (``model`` bytes)."""
    rows = []
    for entry in report["rounds"]:
        slowest = max(entry["local_seconds"].values()) if entry["local_seconds"] else None
        rows.append(
            {
                "round": entry["round"],
                "wall_seconds": entry["seconds"],
                "slowest_local_seconds": slowest,
                "wall_over_local": entry["seconds"] / slowest if slowest else None,
                "down_models_per_site": entry["bytes_down"] / sites / model,
                "up_models_per_site": entry["bytes_up"] / sites / model,
                "sites_aggregated": entry["sites_aggregated"],
            }
        )
    return rows


def _tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
        rss[int(entry.name)] = int(line.split()[1])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 1024


class PeakMemory:
    """Samples this process tree's resident memory in a thread; ``peak_mib`` once stopped."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, _tree_rss_mib(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
