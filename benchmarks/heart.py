"""Heart disease at four real hospitals: Cleveland, Hungary, Switzerland and VA Long Beach (UCI
Heart Disease, the data of FLamby's Fed-Heart-Disease), one site each, binary target num > 0.

For each seed (``run.seed``: the sites' stratified splits and the starting weights), without DP
(``configs/tabular-heart.toml``) and with DP-SGD at ε = 8 per patient and site
(``configs/tabular-heart-dp.toml``):

- **local-only**: each hospital's own model (:func:`medfed.central.train_central` on its train split),
  scored at its own test split;
- **pooled**: one model on all four train splits together (what centralising would give);
- **FedAvg** and **FedProx** (``run.proximal-mu`` = 0.1): the federation of the config, run in this
  process (the ServerApp's :func:`medfed.federation.run_federation` delivering each message
  straight to the ClientApp's site handlers: the same code as ``medfed simulate``, without Ray).

Every model is scored on each hospital's test split: accuracy at threshold 0.5 (FLamby's metric)
and AUROC, each with a 95 % percentile bootstrap interval over the test patients; then the mean
and the spread (SD, min-max) over seeds. FLamby's reference (Terrail et al. 2022, mean accuracy
over the 4 test splits): pooled 0.795, FedAvg 0.748 (0.94 x pooled), its best strategy 0.99 x.

    .venv/bin/medfed bench heart [--quick] [--seeds 5] [--modes nodp dp]

Each mode's finished seeds are kept in ``OUT/heart.MODE.partial.json`` (``--out``): a rerun (e.g.
one process per mode, then one with both modes to write the summary) takes them from there.

Writes benchmarks/results/heart.json and plots/heart.png (``--quick``: one seed, 3 rounds:
heart-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import roc_auc_score
from torch import nn

from benchmarks.harness import CONFIGS, pyplot, results_path, save_figure, save_json, write_results
from medfed.central import train_central
from medfed.config import Config, load_config
from medfed.data import SiteArrays, load_simulated_site, simulated_site_names
from medfed.federation import run_federation
from medfed.in_process import InProcessGrid
from medfed.protocol import global_model
from medfed.tasks import get_task, predict
from medfed.tasks.classification import DEFAULT_THRESHOLD, ClassificationMetrics, operating_point

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "heart_uci"
FILES = {False: "tabular-heart.toml", True: "tabular-heart-dp.toml"}
METHODS = ("local", "pooled", "fedavg", "fedprox")
FEDPROX_MU = 0.1
QUICK = {"run.rounds": 3}
FLAMBY = {"pooled": 0.795, "fedavg": 0.748}  # mean test accuracy over the 4 hospitals (FLamby, Table 3)


def scores(config: Config, model: nn.Module, site: SiteArrays, replicates: int, seed: int) -> dict[str, Any]:
    """On ``site``'s test split, each with a 95 % bootstrap interval: accuracy at 0.5 (FLamby's
    metric), accuracy at the site's own operating point (the Youden threshold chosen on its
    validation split, as ``medfed predict --site`` uses it) and AUROC."""
    model.eval()
    task = get_task(config.run.task)
    val = site.split("val")
    threshold = site_threshold(config, predict(task, model, val.images, config), val.targets)
    data = site.split("test")
    probs = predict(task, model, data.images, config)[:, 1].numpy()
    labels = data.targets.numpy()
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"n": len(labels), "site_threshold": threshold}
    metrics = {"accuracy": _accuracy(0.5), "accuracy_site_threshold": _accuracy(threshold), "auroc": _auroc}
    for name, metric in metrics.items():
        draws = [metric(labels[i], probs[i]) for i in rng.integers(0, len(labels), (replicates, len(labels)))]
        finite = [d for d in draws if np.isfinite(d)]
        low, high = np.percentile(finite, [2.5, 97.5]) if finite else (np.nan, np.nan)
        out[name] = {"value": metric(labels, probs), "low": float(low), "high": float(high)}
    return out


def site_threshold(config: Config, probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The operating threshold medfed chooses on one site's validation split (its score-bin counts
    through :func:`medfed.tasks.classification.operating_point`); 0.5 when one class is absent."""
    metrics = ClassificationMetrics(config.data.num_classes)
    metrics.update(probs, {"label": labels})
    return float(operating_point({"val": metrics.score_counts()}, config).get("threshold", DEFAULT_THRESHOLD))


def _accuracy(threshold: float) -> Callable[[np.ndarray, np.ndarray], float]:
    def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
        return float(np.mean((probs >= threshold) == (labels == 1)))

    return accuracy


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(roc_auc_score(labels, probs)) if 0 < labels.sum() < len(labels) else float("nan")


def run_seed(config: Config, out: Path, replicates: int) -> dict[str, Any]:
    """Every method at one seed: scores per hospital, seconds and (DP) ε per site."""
    names = simulated_site_names(config)
    sites = dict(load_simulated_site(config, i) for i in range(len(names)))
    private = config.privacy.enabled
    seed = config.run.seed
    result: dict[str, Any] = {"local": {}, "epsilon": {}}
    started = time.perf_counter()
    for name, site in sites.items():
        model, info = train_central(config, [site], private)
        result["local"][name] = scores(config, model, site, replicates, seed)
        result["epsilon"][f"local:{name}"] = info["epsilon"]
    model, info = train_central(config, list(sites.values()), private)
    result["pooled"] = {name: scores(config, model, site, replicates, seed) for name, site in sites.items()}
    result["epsilon"]["pooled"] = info["epsilon"]
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # what building a Message needs
    for method, overrides in (("fedavg", {}), ("fedprox", {"run.strategy": "fedprox", "run.proximal-mu": FEDPROX_MU})):
        run_config = config.with_overrides(overrides)
        folder = out / f"{'dp' if private else 'nodp'}-seed{seed}-{method}"
        report = run_federation(
            InProcessGrid({i: {"partition-id": i} for i in range(len(names))}, run_id=1), run_config, folder
        )
        model = global_model(run_config, folder)
        result[method] = {name: scores(config, model, site, replicates, seed) for name, site in sites.items()}
        result["epsilon"][method] = {s: p["epsilon"] for s, p in report["privacy"].items()}
    result["seconds"] = time.perf_counter() - started
    return result


def summarise(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per method and metric: per hospital and the mean over hospitals, as mean, SD, min, max over
    seeds, and the mean of the seeds' interval bounds."""
    summary: dict[str, Any] = {}
    for method in METHODS:
        summary[method] = {}
        for metric in ("accuracy", "accuracy_site_threshold", "auroc"):
            per_site = {}
            for name in names:
                values = [run[method][name][metric]["value"] for run in runs]
                per_site[name] = {
                    **_spread(values),
                    "low": float(np.nanmean([run[method][name][metric]["low"] for run in runs])),
                    "high": float(np.nanmean([run[method][name][metric]["high"] for run in runs])),
                }
            means = [float(np.nanmean([run[method][name][metric]["value"] for name in names])) for run in runs]
            summary[method][metric] = {"per_site": per_site, "mean_of_sites": _spread(means)}
    return summary


def _spread(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(array)), "sd": float(np.nanstd(array)), "min": float(np.nanmin(array)),
            "max": float(np.nanmax(array)), "values": [float(v) for v in array]}  # fmt: skip


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals: FedAvg accuracy >= 0.97 x pooled (mean of hospitals, mean over seeds; also
    at each hospital's own operating point), and FedAvg with DP at ε = 8 within 2 points of FedAvg without DP."""
    nodp = results["nodp"]["summary"]
    ratio = nodp["fedavg"]["accuracy"]["mean_of_sites"]["mean"] / nodp["pooled"]["accuracy"]["mean_of_sites"]["mean"]
    out: dict[str, Any] = {"fedavg_over_pooled_accuracy": ratio, "fedavg_reaches_0.97_pooled": bool(ratio >= 0.97)}
    at_site = {m: nodp[m]["accuracy_site_threshold"]["mean_of_sites"]["mean"] for m in ("fedavg", "pooled")}
    out["fedavg_over_pooled_accuracy_site_threshold"] = at_site["fedavg"] / at_site["pooled"]
    if "dp" in results:
        dp = results["dp"]["summary"]
        for metric in ("accuracy", "auroc"):
            gap = nodp["fedavg"][metric]["mean_of_sites"]["mean"] - dp["fedavg"][metric]["mean_of_sites"]["mean"]
            out[f"dp_cost_{metric}_points"] = 100 * gap
            out[f"dp_within_2_points_{metric}"] = bool(gap <= 0.02)
    return out


def plot(results: dict[str, Any], names: list[str], path: Path) -> None:
    plt = pyplot()
    modes = list(results)
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    width = 0.8 / len(METHODS)
    for row, mode in enumerate(modes):
        summary = results[mode]["summary"]
        for col, metric in enumerate(("accuracy", "auroc")):
            ax = axes[row][col]
            for k, method in enumerate(METHODS):
                cells = [summary[method][metric]["per_site"][n] for n in names]
                mean = summary[method][metric]["mean_of_sites"]
                x = np.arange(len(names) + 1) + (k - (len(METHODS) - 1) / 2) * width
                values = [c["mean"] for c in cells] + [mean["mean"]]
                spread = [c["sd"] for c in cells] + [mean["sd"]]
                ax.bar(x, values, width, yerr=spread, capsize=2, label=method)
            ax.set_xticks(np.arange(len(names) + 1), [*names, "mean"], fontsize=8)
            ax.set_ylim(0.3, 1.0)
            ax.set_title(f"{metric} ({'DP ε = 8' if mode == 'dp' else 'no DP'}; bars: SD over seeds)", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 3 rounds, no DP (about a minute)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--replicates", type=int, default=500)
    parser.add_argument("--dp-seeds", type=int, default=0, help="seeds with DP (default: --seeds)")
    parser.add_argument("--modes", nargs="+", choices=["nodp", "dp"], default=["nodp", "dp"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-heart")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"data not found at {DATA} (the benchmarks read ../shared/data beside the repo)")
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    started, results = time.perf_counter(), {}
    target = results_path("heart", args.quick)
    names: list[str] = []
    for mode in ["nodp"] if args.quick else args.modes:
        private = mode == "dp"
        seeds = [0] if args.quick else list(range(args.dp_seeds or args.seeds if private else args.seeds))
        done_file = args.out / f"heart.{mode}.partial.json"  # seeds done, kept for a rerun to resume
        done = {run["seed"]: run for run in json.loads(done_file.read_text())} if done_file.is_file() else {}
        runs = []
        for seed in seeds:
            overrides = {"data.path": str(DATA), "run.seed": seed, "evaluation.cross-site": False}
            config = load_config(CONFIGS / FILES[private], overrides | (QUICK if args.quick else {}))
            names = simulated_site_names(config)
            runs.append(done.get(seed) or {"seed": seed, **run_seed(config, args.out, args.replicates)})
            print(f"{mode} seed {seed}: {runs[-1]['seconds']:.0f} s", flush=True)
            if not args.quick:
                save_json(done_file, list({**done, **{run["seed"]: run for run in runs}}.values()))
        results[mode] = {"config": FILES[private], "seeds": seeds, "runs": runs, "summary": summarise(runs, names)}
    summary = {
        "benchmark": "heart",
        "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores, CPU only",
        "sites": names,
        "replicates": args.replicates,
        "fedprox_mu": FEDPROX_MU,
        "flamby_reference_accuracy": FLAMBY,
        "seconds": time.perf_counter() - started,
        "results": results,
        "goals": goals(results),
    }
    write_results(target, summary, lambda path: plot(results, names, path), f" in {summary['seconds']:.0f} s")
    for mode, entry in results.items():
        for method in METHODS:
            acc, at_site, auc = (
                entry["summary"][method][m]["mean_of_sites"] for m in ("accuracy", "accuracy_site_threshold", "auroc")
            )
            print(
                f"{mode} {method}: accuracy {acc['mean']:.3f} ± {acc['sd']:.3f} (at the site's threshold "
                f"{at_site['mean']:.3f} ± {at_site['sd']:.3f}), AUROC {auc['mean']:.3f} ± {auc['sd']:.3f}"
            )
    print(summary["goals"])


if __name__ == "__main__":
    main()
