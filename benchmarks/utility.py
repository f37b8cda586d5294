"""What federating buys over training alone, and what it costs against pooling the data.

For each real dataset in ``../shared/data``, 3 sites with a declared split (MedMNIST: a
Dirichlet(1.0) label-skewed partition of the official splits, seed 0, which leaves every site
both classes in training and test, e.g. PneumoniaMNIST train normal/pneumonia 751/1151, 185/1671,
278/672; the configs' 0.5 leaves one site a single normal image; CHASE_DB1: children dealt to
sites, patient-level splits; BCCD: images dealt to sites in name order), no DP (the price of
privacy is the ``privacy`` benchmark), five ways to train the same model for the same number of
local epochs (or steps) per site:

- **pooled**: one model on the union of the three sites' training data (what centralising the
  data would give, usually impossible);
- **local-only**: each site trains alone, scored on its own test split;
- **FedAvg**, **FedProx** (mu = 0.01), **FedAdam** (server lr 0.01): ``medfed simulate`` with the
  config's strategy switched, final global model.

Score: the task's primary metric (AUROC, Dice, mAP@0.5) on each site's test split, with a 95%
bootstrap interval over that split's cases (200 resamples), the mean over sites with its
interval, and FedAvg / pooled as a paired-bootstrap ratio. Settings are the configs' own except
where a 15-minute budget on 2 CPU cores needs fewer rounds or a smaller image (``DATASETS``).

    .venv/bin/medfed bench utility [--quick] [--datasets pneumoniamnist breastmnist chasedb1 bccd]

Writes benchmarks/results/utility.json (``--quick``: BreastMNIST, 2 rounds, utility-quick.json)
and plots/utility.png, and prints each result as it comes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import federated_model, pyplot, results_path, save_figure, save_json, write_results
from medfed.central import train_central
from medfed.config import Config, load_config
from medfed.data.sites import load_simulated_site
from medfed.evaluation.bootstrap import bootstrap_scores, mean_of_sites, paired_ratio, without_draws
from medfed.tasks import get_task

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"

# dataset: (config, its data, overrides that fit the time budget)
DATASETS: dict[str, tuple[str, Path, dict[str, Any]]] = {
    "pneumoniamnist": (
        "classification-pneumoniamnist.toml",
        SHARED / "medmnist" / "pneumoniamnist.npz",
        {"data.alpha": 1.0, "run.rounds": 3, "train.local-epochs": 2},
    ),
    "breastmnist": (
        "classification-breastmnist.toml",
        SHARED / "medmnist" / "breastmnist.npz",
        {"data.alpha": 1.0},
    ),
    "chasedb1": ("segmentation-chasedb1.toml", SHARED / "chasedb1", {"run.rounds": 12}),
    "bccd": (
        "detection-bccd.toml",
        SHARED / "bccd" / "BCCD",
        {"data.image-size": 128, "run.rounds": 9, "train.local-epochs": 2},
    ),
}
STRATEGIES = {
    "fedavg": {"run.strategy": "fedavg"},
    "fedprox": {"run.strategy": "fedprox", "run.proximal-mu": 0.01},
    "fedadam": {"run.strategy": "fedadam", "run.server-lr": 0.01},
}
COMMON = {"privacy.enabled": False, "evaluation.cross-site": False, "evaluation.example-images": 0}


def dataset_config(name: str, quick: bool) -> Config:
    file, data, overrides = DATASETS[name]
    if not data.exists():
        raise SystemExit(f"{name}: data not found at {data} (the benchmarks read ../shared/data beside the repo)")
    quick_overrides = {"run.rounds": 2} if quick else {}
    return load_config(REPO / "configs" / file, {"data.path": str(data)} | overrides | COMMON | quick_overrides)


def run_dataset(name: str, config: Config, out: Path, replicates: int) -> dict[str, Any]:
    """Pooled, local-only and the three strategies on one dataset, each scored with intervals."""
    sites = dict(load_simulated_site(config, i) for i in range(config.data.sites))
    setups: dict[str, Any] = {}

    started = time.perf_counter()
    model, _ = train_central(config, list(sites.values()), private=False)
    setups["pooled"] = bootstrap_scores(config, model, sites, replicates) | {"seconds": time.perf_counter() - started}
    _show(name, "pooled", setups["pooled"])

    started, local = time.perf_counter(), {}
    for site_name, site in sites.items():
        model, _ = train_central(config, [site], private=False)
        local |= bootstrap_scores(config, model, {site_name: site}, replicates)["per_site"]
    setups["local-only"] = {
        "per_site": local,
        "mean": mean_of_sites(list(local.values())),
        "seconds": time.perf_counter() - started,
    }
    _show(name, "local-only", setups["local-only"])

    for strategy, overrides in STRATEGIES.items():
        started = time.perf_counter()
        model, _ = federated_model(config.with_overrides(overrides), out / name / strategy)
        setups[strategy] = bootstrap_scores(config, model, sites, replicates) | {
            "seconds": time.perf_counter() - started
        }
        _show(name, strategy, setups[strategy])

    return {
        "task": config.run.task,
        "metric": get_task(config.run.task).PRIMARY_METRIC,
        "settings": {
            "sites": config.data.sites,
            "rounds": config.run.rounds,
            "local_epochs": config.train.local_epochs,
            "local_steps": config.train.local_steps,
            "image_size": config.data.image_size,
            "batch_size": config.train.batch_size,
            "train_cases_per_site": {s: int((a.splits == "train").sum()) for s, a in sites.items()},
        },
        "setups": setups,
        "fedavg_over_pooled": paired_ratio(setups["fedavg"]["mean"], setups["pooled"]["mean"]),
        "local_over_pooled": paired_ratio(setups["local-only"]["mean"], setups["pooled"]["mean"]),
    }


def _show(dataset: str, setup: str, scores: dict[str, Any]) -> None:
    mean = scores["mean"]
    sites = ", ".join(f"{s} {v['value']:.3f}" for s, v in scores["per_site"].items())
    print(
        f"{dataset:15s} {setup:10s} mean {mean['value']:.3f} [{mean['low']:.3f}, {mean['high']:.3f}]  ({sites})",
        flush=True,
    )


SETUP_ORDER = ("pooled", "local-only", "fedavg", "fedprox", "fedadam")


def plot(results: dict[str, Any], path: Path) -> None:
    """Per dataset: each setup's mean over sites with its 95% interval, and each site's score as a dot."""
    names = list(results)
    fig, axes = pyplot().subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        setups = results[name]["setups"]
        for x, setup in enumerate(SETUP_ORDER):
            mean = setups[setup]["mean"]
            ax.bar(x, mean["value"], color="#9ab" if setup in ("pooled", "local-only") else "#58a")
            ax.errorbar(x, mean["value"], yerr=[[mean["value"] - mean["low"]], [mean["high"] - mean["value"]]],
                        color="black", capsize=3)  # fmt: skip
            values = [s["value"] for s in setups[setup]["per_site"].values()]
            ax.plot([x] * len(values), values, "o", color="#d62", markersize=3)
        ax.set_xticks(range(len(SETUP_ORDER)), SETUP_ORDER, rotation=35)
        ax.set(title=name, ylabel=f"test {results[name]['metric']}", ylim=(0, 1))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="BreastMNIST only, 2 rounds (under 2 minutes)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap resamples per site")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-utility")
    args = parser.parse_args(argv)
    names = args.datasets or (["breastmnist"] if args.quick else list(DATASETS))
    target = results_path("utility", args.quick)
    summary = {"datasets": {}}
    if args.datasets and target.is_file():  # a subset run updates those datasets in the file
        summary = json.loads(target.read_text())
    summary |= {
        "benchmark": "utility",
        "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores, CPU only",
        "replicates": args.replicates,
        "strategies": STRATEGIES,
    }
    results = {}
    for name in names:
        started = time.perf_counter()
        results[name] = run_dataset(name, dataset_config(name, args.quick), args.out, args.replicates)
        results[name]["seconds"] = time.perf_counter() - started
        ratio = results[name]["fedavg_over_pooled"]
        print(f"{name}: FedAvg / pooled {ratio['value']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]", flush=True)
        summary["datasets"][name] = without_draws(results[name])
        save_json(target, summary)
    summary["seconds"] = sum(d.get("seconds", 0.0) for d in summary["datasets"].values())  # of the runs timed
    note = f": {summary['seconds']:.0f} s over its datasets"
    write_results(target, summary, lambda path: plot(summary["datasets"], path), note)


if __name__ == "__main__":
    main()
