"""Does a personal model beat the global one where the global model is weakest, and what does it cost?

For each dataset (``DATASETS``: one entry per dataset, a config and the overrides that fit the
time budget; add one to extend the benchmark), six ways to train, each scored on every site's
test split with a 95 % bootstrap interval (the same resamples of a site's cases for every model):

- **local-only**: each site trains alone (:func:`medfed.central.train_central` on its data);
- **FedAvg**, **FedProx** (mu = 0.01): ``medfed simulate``, the final global model;
- **FedBN**, **fine-tune** (``run.finetune-steps``), **Ditto** (``run.ditto-lambda``): ``medfed
  simulate`` with ``run.personalization``, each site's personal model (scored at the site, where
  it stays; the report carries the value and interval).

Without DP and at ε = 8 per privacy unit (``--epsilon 0 8``); under DP the personal model's
extra training is charged to the same ε (Ditto trains two models per round, fine-tuning adds
steps after the last round), so its noise is larger than FedAvg's at the same ε.

Datasets: the four real heart-disease hospitals (``configs/tabular-heart.toml``; FedBN is skipped
there: its model has no normalisation layers), PneumoniaMNIST split into 3 label-skewed sites (Dirichlet(1.0) over the official splits,
as in ``benchmarks/utility.py``) and the three real retinal hospitals (CHASE_DB1 / STARE / HRF,
``configs/segmentation-retina-3sites.toml``) at a reduced budget (``DATASETS``: 256 px, 10 rounds
instead of 512 px and 25: the full config takes ~10 minutes per run on 2 CPU cores).

    .venv/bin/medfed bench personalization [--quick] [--datasets pneumoniamnist retina] [--epsilon 0 8]

Writes benchmarks/results/personalization.json and plots/personalization.png (``--quick``:
BreastMNIST label-skewed, 2 rounds, no DP: personalization-quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import pyplot, results_path, save_figure, save_json, write_results
from benchmarks.utility import DATASETS as UTILITY_DATASETS
from benchmarks.utility import REPO, SHARED
from medfed.central import train_central
from medfed.config import Config, load_config
from medfed.data.sites import load_simulated_site, simulated_site_names
from medfed.evaluation.bootstrap import bootstrap_scores, without_draws
from medfed.personalization import norm_keys
from medfed.predict import load_model
from medfed.run_folder import RunFolder
from medfed.simulation import simulate
from medfed.tasks import get_task

# dataset: (config, its data, overrides that fit the time budget); one entry per dataset; the
# MedMNIST splits are the utility benchmark's
DATASETS: dict[str, tuple[str, Path, dict[str, Any]]] = {
    "pneumoniamnist": UTILITY_DATASETS["pneumoniamnist"],
    "breastmnist": UTILITY_DATASETS["breastmnist"],
    "heart": ("tabular-heart.toml", SHARED / "heart_uci", {}),
    "retina": (
        "segmentation-retina-3sites.toml",
        SHARED,
        {"data.image-size": 256, "data.patch-size": 64, "run.rounds": 10},
    ),
}
DEFAULT_DATASETS = ("heart", "pneumoniamnist", "retina")
METHODS: dict[str, dict[str, Any]] = {
    "local-only": {},
    "fedavg": {"run.strategy": "fedavg"},
    "fedprox": {"run.strategy": "fedprox", "run.proximal-mu": 0.01},
    "fedbn": {"run.personalization": "fedbn"},
    "finetune": {"run.personalization": "finetune", "run.finetune-steps": 20},
    "ditto": {"run.personalization": "ditto", "run.ditto-lambda": 0.1},
}
COMMON = {"evaluation.cross-site": False, "evaluation.example-images": 0}


def dataset_config(name: str, quick: bool, epsilon: float, replicates: int) -> Config:
    """The dataset's config at ``epsilon`` (0: no DP), with the benchmark's overrides."""
    file, data, overrides = DATASETS[name]
    if not data.exists():
        raise SystemExit(f"{name}: data not found at {data} (the benchmarks read ../shared/data beside the repo)")
    privacy = {"privacy.enabled": True, "privacy.target-epsilon": epsilon} if epsilon else {"privacy.enabled": False}
    quick_overrides = {"run.rounds": 2} if quick else {}
    settings = {"data.path": str(data), "evaluation.replicates": replicates}
    return load_config(REPO / "configs" / file, settings | overrides | COMMON | privacy | quick_overrides)


def run_method(method: str, config: Config, out: Path, replicates: int) -> dict[str, Any]:
    """One method's score per site (value, 95 % interval, n) and the worst site's."""
    started = time.perf_counter()
    sites = dict(load_simulated_site(config, i) for i in range(len(simulated_site_names(config))))
    seed = config.run.seed
    if method == "local-only":
        per_site = {}
        for name, site in sites.items():
            model, _ = train_central(config, [site], private=config.privacy.enabled)
            per_site |= bootstrap_scores(config, model, {name: site}, replicates, seed)["per_site"]
        result: dict[str, Any] = {"per_site": without_draws(per_site)}
    else:
        setting = config.with_overrides(METHODS[method])
        report = simulate(setting, out)
        released, model = load_model(RunFolder(out).global_model)
        scores = bootstrap_scores(released, model, sites, replicates, seed)["per_site"]
        result = {"global": without_draws(scores), "per_site": without_draws(scores)}
        personal = report["final"].get("personalization")
        if personal:
            result["per_site"] = {s: e["personal"] | {"n": scores[s]["n"]} for s, e in personal["per_site"].items()}
            result["gain"] = {s: e["gain"] for s, e in personal["per_site"].items()}
        result["epsilon"] = {s: p["epsilon"] for s, p in report["privacy"].items()}
    values = [entry["value"] for entry in result["per_site"].values()]
    result["worst"] = min(values) if values and not any(math.isnan(v) for v in values) else math.nan
    result["mean"] = float(np.mean(values)) if values else math.nan
    result["seconds"] = time.perf_counter() - started
    return result


def run_dataset(
    name: str,
    quick: bool,
    epsilons: list[float],
    out: Path,
    replicates: int,
    saved: Callable[[dict[str, Any]], None],
    earlier: dict[str, Any],
) -> dict[str, Any]:
    """Every method without DP and at each ε on one dataset; ``saved`` gets the dataset's entry
    after each method, so a stopped run keeps what it measured; a method already in ``earlier``
    (the dataset's saved entry, when measured at the same settings) is taken from there."""
    runs: dict[str, Any] = {}
    config = dataset_config(name, quick, 0.0, replicates)
    for epsilon in epsilons:
        config = dataset_config(name, quick, epsilon, replicates)
        label = f"epsilon-{epsilon:g}" if epsilon else "no-dp"
        runs[label] = {}
        for method in METHODS:
            done = earlier.get("runs", {}).get(label, {}).get(method)
            if done and earlier.get("settings") == dataset_entry(config, {})["settings"]:
                runs[label][method] = done
                continue
            if method == "fedbn" and not norm_keys(get_task(config.run.task).build_model(config)):
                runs[label][method] = {"skipped": "the model has no normalisation layers: FedBN is FedAvg"}
                runs[label][method] |= {"per_site": {}, "worst": None}
                continue
            result = run_method(method, config, out / name / label / method, replicates)
            runs[label][method] = result
            sites = ", ".join(f"{s} {v['value']:.3f}" for s, v in result["per_site"].items())
            print(f"{name:15s} {label:11s} {method:10s} worst {result['worst']:.3f} ({sites})", flush=True)
            saved(dataset_entry(config, runs))
    return dataset_entry(config, runs)


def dataset_entry(config: Config, runs: dict[str, Any]) -> dict[str, Any]:
    """A dataset's results: its task, metric, settings and the runs measured so far."""
    return {
        "task": config.run.task,
        "metric": get_task(config.run.task).PRIMARY_METRIC,
        "settings": {
            "sites": len(simulated_site_names(config)),
            "rounds": config.run.rounds,
            "local_epochs": config.train.local_epochs,
            "local_steps": config.train.local_steps,
            "image_size": config.data.image_size,
            "batch_size": config.train.batch_size,
            "methods": METHODS,
        },
        "runs": runs,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Per dataset and privacy setting: each method's score per site with its 95 % interval."""
    panels = [(name, label) for name, d in results.items() for label in d["runs"]]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, label) in zip(axes[0], panels, strict=True):
        runs = results[name]["runs"][label]
        sites = sorted({s for r in runs.values() for s in r["per_site"]})
        for offset, site in enumerate(sites):
            xs, ys, lows, highs = [], [], [], []
            for x, method in enumerate(runs):
                entry = runs[method]["per_site"].get(site)
                if entry is None:
                    continue
                xs.append(x + (offset - (len(sites) - 1) / 2) * 0.2)
                ys.append(entry["value"])
                lows.append(entry["value"] - entry["low"])
                highs.append(entry["high"] - entry["value"])
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=2, markersize=3, label=site)
        ax.set_xticks(range(len(runs)), list(runs), rotation=35)
        ax.set(title=f"{name}, {label}", ylabel=f"test {results[name]['metric']}", ylim=(0, 1))
        ax.legend(fontsize=6)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="BreastMNIST, 2 rounds, no DP")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    parser.add_argument("--epsilon", nargs="+", type=float, default=None, help="0: no DP (default: 0 8)")
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap resamples per site")
    parser.add_argument("--resume", action="store_true", help="keep the methods already saved at the same settings")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medfed-personalization")
    args = parser.parse_args(argv)
    names = args.datasets or (["breastmnist"] if args.quick else list(DEFAULT_DATASETS))
    epsilons = args.epsilon or ([0.0] if args.quick else [0.0, 8.0])
    path = results_path("personalization", args.quick)
    summary: dict[str, Any] = {"benchmark": "personalization", "quick": args.quick, "machine": "2 CPU cores",
                               "datasets": {}}  # fmt: skip
    if path.exists():  # datasets measured earlier stay; the ones run now are replaced
        summary["datasets"] = json.loads(path.read_text()).get("datasets", {})
    for name in names:
        started = time.perf_counter()

        def saved(partial: dict[str, Any], name: str = name, started: float = started) -> None:
            summary["datasets"][name] = partial | {"seconds": time.perf_counter() - started}
            save_json(path, summary)

        earlier = summary["datasets"].get(name, {}) if args.resume else {}
        saved(run_dataset(name, args.quick, epsilons, args.out, args.replicates, saved, earlier))
    write_results(path, summary, lambda p: plot(summary["datasets"], p))


if __name__ == "__main__":
    main()
