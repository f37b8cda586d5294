"""How well a model carries to a hospital it never saw: leave-one-site-out FedAvg against the
cross-site matrix of local models.

Per dataset (``DATASETS``: PneumoniaMNIST and BreastMNIST split into 3 sites by a Dirichlet(1.0)
label skew, as in the ``utility`` benchmark; 4 synthetic hospitals, each with its own scanner
shift and class prevalence), no DP, the cross-site protocol (:mod:`medfed.protocol`, the same as
``medfed simulate CONFIG --protocol cross-site``) trains and scores:

- **local models**: each site trains alone (rounds x local epochs); the cross-site matrix scores
  model i on site j's test split. Its generalization gap: own-site score (diagonal) minus the
  mean score at the other sites (off-diagonal).
- **leave-one-site-out (LOSO)**: for each site j, FedAvg over the other sites (``data.leave-out``:
  they keep exactly their data); the global model is scored on site j, which it never saw. Its
  gap: FedAvg over all sites scored at site j (seen) minus the LOSO model at site j (unseen).
- **pooled**: one model on all sites' training data, scored at each site.

Scores: the task's primary metric (AUROC) on each test split with a 95% bootstrap interval (200
resamples of the split's cases, the same for every model at a site).

    .venv/bin/medfed bench generalization [--quick] [--datasets synthetic pneumoniamnist breastmnist]

Writes benchmarks/results/generalization.json (``--quick``: 3 small synthetic sites, 1 round:
generalization-quick.json) and plots/generalization.png; each dataset's protocol report
(protocol.json, protocol.html, the heatmap) stays under ``--out``/DATASET.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import pyplot, results_path, save_figure, write_results
from medfed.config import Config, load_config
from medfed.data.sites import load_simulated_site
from medfed.protocol import run_cross_site_protocol

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
COMMON = {"privacy.enabled": False, "evaluation.cross-site": False, "evaluation.example-images": 0}
DATASETS: dict[str, tuple[str, dict[str, Any]]] = {
    "synthetic": ("classification-synthetic.toml", {"data.sites": 4, "run.rounds": 4, "train.local-epochs": 2}),
    "pneumoniamnist": (
        "classification-pneumoniamnist.toml",
        {
            "data.path": str(SHARED / "medmnist" / "pneumoniamnist.npz"),
            "data.alpha": 1.0,
            "run.rounds": 3,
            "train.local-epochs": 2,
        },
    ),  # fmt: skip
    "breastmnist": (
        "classification-breastmnist.toml",
        {"data.path": str(SHARED / "medmnist" / "breastmnist.npz"), "data.alpha": 1.0},
    ),
}
QUICK = {"data.sites": 3, "data.samples-per-site": 120, "run.rounds": 1, "train.local-epochs": 1}


def run_dataset(name: str, config: Config, out: Path, replicates: int) -> dict[str, Any]:
    """The cross-site protocol on ``config``'s sites, in this benchmark's results layout."""
    report = run_cross_site_protocol(config, out / name, replicates)
    names, rows = report["sites"], dict(zip(report["models"], report["matrix"], strict=True))
    local = {s: dict(zip(names, rows[f"local:{s}"], strict=True)) for s in names}
    matrix = [[local[i][j]["value"] for j in names] for i in names]
    seen = dict(zip(names, rows[report["federated"]], strict=True))
    unseen = report["leave_one_site_out"]
    gap = report["gap"]

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    own = mean([matrix[k][k] for k in range(len(names))])
    others = mean([gap[f"local:{s}"]["other"] for s in names])  # the mean of the off-diagonal cells
    print(f"{name}: local own {own:.3f}, at other sites {others:.3f}", flush=True)
    sites = [load_simulated_site(config, i)[1] for i in range(len(names))]
    return {
        "metric": report["metric"],
        "sites": names,
        "train_cases": {s: int((a.splits == "train").sum()) for s, a in zip(names, sites, strict=True)},
        "local_matrix": {"models": names, "sites": names, "values": matrix, "scores": local},
        "local_own_site": own,
        "local_other_sites": others,
        "local_gap": own - others,
        "fedavg_all_at_site": seen,
        "loso_at_held_out_site": unseen,
        "pooled_at_site": dict(zip(names, rows["pooled"], strict=True)),
        "fedavg_all_mean": gap[report["federated"]]["own"],
        "loso_mean": gap[report["federated"]]["other"],
        "loso_gap": gap[report["federated"]]["gap"],
        "pooled_mean": gap["pooled"]["own"],
        "loso_minus_local_other_sites": gap[report["federated"]]["other"] - others,
        "gap": gap,
        "seconds": report["seconds"],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Per dataset: the local models' cross-site matrix, and the four (five, with pooled) scores side by side."""
    fig, axes = pyplot().subplots(2, len(results), figsize=(3.8 * len(results), 6.6), squeeze=False)
    for k, (name, r) in enumerate(results.items()):
        top, bottom = axes[0][k], axes[1][k]
        values = np.array(r["local_matrix"]["values"])
        image = top.imshow(values, vmin=0.5, vmax=1.0, cmap="viridis")
        for (i, j), v in np.ndenumerate(values):
            top.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
        top.set_xticks(range(len(r["sites"])), r["sites"], rotation=30, fontsize=7)
        top.set_yticks(range(len(r["sites"])), r["sites"], fontsize=7)
        top.set(title=f"{name}: local models", xlabel="tested at", ylabel="trained at")
        fig.colorbar(image, ax=top, fraction=0.046)
        bars = {
            "local,\nown site": r["local_own_site"],
            "local,\nother sites": r["local_other_sites"],
            "FedAvg\nall sites": r["fedavg_all_mean"],
            "FedAvg without\nthe site (LOSO)": r["loso_mean"],
        }
        if "pooled_mean" in r:
            bars["pooled"] = r["pooled_mean"]
        bottom.bar(range(len(bars)), list(bars.values()), color=["#9ab", "#9ab", "#58a", "#58a", "#a85"][: len(bars)])
        bottom.set_xticks(range(len(bars)), list(bars), fontsize=7)
        bottom.set(ylabel="test AUROC (mean of sites)", ylim=(0.5, 1.0))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 small synthetic sites, 1 round (under 2 minutes)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-generalization")
    args = parser.parse_args(argv)
    names = args.datasets or (["synthetic"] if args.quick else list(DATASETS))
    started, results = time.perf_counter(), {}
    for name in names:
        file, overrides = DATASETS[name]
        if "data.path" in overrides and not Path(overrides["data.path"]).exists():
            raise SystemExit(f"{name}: data not found at {overrides['data.path']} (../shared/data beside the repo)")
        config = load_config(REPO / "configs" / file, overrides | COMMON | (QUICK if args.quick else {}))
        results[name] = run_dataset(name, config, args.out, args.replicates)
        r = results[name]
        print(f"{name}: local gap {r['local_gap']:.3f}, LOSO gap {r['loso_gap']:.3f}", flush=True)
    summary = {
        "benchmark": "generalization",
        "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores, CPU only",
        "replicates": args.replicates,
        "seconds": time.perf_counter() - started,
        "datasets": results,
    }
    target = results_path("generalization", args.quick)
    write_results(target, summary, lambda path: plot(results, path), f" in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
