"""What site-level DP (DP-FedAvg with adaptive clipping at the server) costs in accuracy, on a
federation of many small sites.

20 synthetic hospitals (scanner shifts and class skews of ``medfed data synth``; 200 images of
16 px each, 140 for training), a small CNN, FedAvg, 6 rounds of 1 local epoch, no DP-SGD at the
sites; the same federation without DP, with site-level DP at ε = 8 (δ = 1/(10 sites)) with every
site in every round, and with each site sampled with probability 0.5 per round (Poisson sampling,
the accountant's sampling rate). Score: test AUROC of the final global model at each site (mean
over sites, worst site) and on all sites' test images pooled; and the site-level ε spent, the
noise multiplier and the clipping norm of each round.

    .venv/bin/medfed bench site_level_dp [--quick]

Writes benchmarks/results/site_level_dp.json and plots/site_level_dp.png (``--quick``: 12 sites,
2 rounds: site_level_dp-quick.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import pyplot, results_path, save_figure, save_json, write_results
from medfed.config import Config
from medfed.simulation import simulate

REPO = Path(__file__).resolve().parent.parent

RUNS: list[tuple[str, dict[str, Any]]] = [
    ("no DP", {"privacy.enabled": False}),
    ("site-level DP, ε 8, every site", {"privacy.level": "site"}),
    ("site-level DP, ε 8, fraction-train 0.5", {"privacy.level": "site", "run.fraction-train": 0.5}),
]


def federation(sites: int, rounds: int) -> Config:
    """The many-site federation, without DP (each run adds its privacy settings)."""
    return Config().with_overrides(
        {
            "run.rounds": rounds,
            "run.min-sites": 1,
            "data.sites": sites,
            "data.samples-per-site": 200,
            "data.image-size": 16,
            "model.width": 8,
            "model.depth": 2,
            "train.batch-size": 32,
            "privacy.site-epsilon": 8.0,
            "evaluation.cross-site": False,
            "evaluation.example-images": 0,
        }
    )


def measure(label: str, config: Config, out: Path) -> dict[str, Any]:
    """One federation: its test AUROC per site and pooled, and its site-level privacy."""
    started = time.perf_counter()
    report = simulate(config, out)
    per_site = {site: m["auroc"] for site, m in report["final"]["per_site"].items()}
    site_level = report.get("site_privacy") or {}
    result = {
        "label": label,
        "mean_auroc": float(np.mean(list(per_site.values()))),
        "worst_auroc": float(min(per_site.values())),
        "pooled_auroc": (report["final"].get("pooled") or {}).get("auroc"),
        "per_site_auroc": per_site,
        "val_mean_auroc_by_round": [
            float(np.mean([m["auroc"] for m in entry["metrics"].values()])) for entry in report["rounds"]
        ],
        "sites_per_round": [len(entry["sites_aggregated"]) for entry in report["rounds"][1:]],
        "site_level": {
            k: site_level[k]
            for k in (
                "epsilon",
                "delta",
                "noise_multiplier",
                "update_noise_multiplier",
                "count_noise_stddev",
                "sample_rate",
                "clip_norms",
            )
            if k in site_level
        },  # fmt: skip
        "seconds": time.perf_counter() - started,
    }
    print(f"{label}: mean AUROC {result['mean_auroc']:.3f}, worst {result['worst_auroc']:.3f}, "
          f"pooled {result['pooled_auroc']}, site-level {result['site_level']}", flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 sites, 2 rounds")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-site-level-dp")
    args = parser.parse_args(argv)
    sites, rounds = (12, 2) if args.quick else (20, 6)
    base = federation(sites, rounds)
    path = results_path("site_level_dp", args.quick)
    summary: dict[str, Any] = {
        "benchmark": "site_level_dp",
        "quick": args.quick,
        "machine": "2 CPU cores",
        "sites": sites,
        "rounds": rounds,
        "runs": [],
    }
    for index, (label, overrides) in enumerate(RUNS):
        summary["runs"].append(measure(label, base.with_overrides(overrides), args.out / f"run-{index}"))
        save_json(path, summary)  # partial results survive an interrupted run

    def plot(figure: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run in summary["runs"]:
            ax.plot(range(len(run["val_mean_auroc_by_round"])), run["val_mean_auroc_by_round"], marker="o",
                    label=f"{run['label']}: test {run['mean_auroc']:.3f}")  # fmt: skip
        ax.set_xlabel("round")
        ax.set_ylabel("validation AUROC, mean of sites")
        ax.set_title(f"Site-level DP on {sites} synthetic sites")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, figure)

    write_results(path, summary, plot)


if __name__ == "__main__":
    main()
