"""Instance segmentation of touching nuclei on 3 synthetic hospitals: AJI, PQ, object F1 and Dice per
site, with DP (ε = 8 per site) and without, over several run seeds.

Each run is ``medfed simulate configs/instance-segmentation-synthetic.toml`` as shipped except for
``run.seed`` (the synthetic hospitals, the initial model and the DP noise all change with it),
``privacy.enabled`` (without DP, ``train.lr`` and ``train.momentum`` go back to the task's
non-private recipe, Adam at 0.002: the config's SGD step is tuned for DP-SGD) and the cross-site
matrix (off, so the run's whole ε goes to the federated model). The global model's test metrics at each site are kept: the aggregated Jaccard index
(``aji``, the primary metric), panoptic quality (``pq``), object F1 at IoU 0.5 (``f1_50``) and
foreground Dice (``dice``), each the mean over the site's test images.

    .venv/bin/medfed bench instance_segmentation [--quick] [--seeds 0 1 2] [--modes dp nodp] [--out DIR]

Writes benchmarks/results/instance_segmentation.json (``--quick``: one DP run of one round on tiny
sites, instance_segmentation-quick.json: a smoke run) and plots/instance_segmentation.png (AJI per
site and seed), and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import bench_config, fedavg, pyplot, results_path, save_figure, write_results

CONFIG = "instance-segmentation-synthetic.toml"
METRICS = ("aji", "pq", "f1_50", "dice")
QUICK = {"run.rounds": 1, "data.samples-per-site": 24, "data.image-size": 32, "train.local-epochs": 1}


def run_once(seed: int, private: bool, out: Path, quick: bool) -> dict[str, Any]:
    """One federation: each site's test metrics, its ε, the run's seconds."""
    overrides = {"run.seed": seed, "privacy.enabled": private} | (QUICK if quick else {})
    if not private:  # the config's lr and momentum are for DP-SGD: without DP, the task's recipe (Adam)
        overrides |= {"train.lr": "auto", "train.momentum": "auto"}
    config = bench_config(CONFIG, None, overrides)
    result = fedavg(config, out / f"{'dp' if private else 'nodp'}-seed{seed}")
    per_site = {site: {m: float(values[m]) for m in METRICS} for site, values in result["metrics"].items()}
    return {
        "seed": seed,
        "dp": private,
        "per_site": per_site,
        "mean": {m: float(np.mean([site[m] for site in per_site.values()])) for m in METRICS},
        "epsilon": result["epsilon"] if private else {},
        "seconds": result["seconds"],
    }


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric over runs: the mean of the site means, and the lowest and highest site value."""
    out = {}
    for m in METRICS:
        means = [run["mean"][m] for run in runs]
        sites = [site[m] for run in runs for site in run["per_site"].values()]
        out[m] = {"mean": float(np.mean(means)), "worst_site": float(min(sites)), "best_site": float(max(sites))}
    return out


def plot(modes: dict[str, Any], path: Path) -> None:
    """AJI at each site per seed, one panel per mode."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.2), squeeze=False)
    for ax, (mode, result) in zip(axes[0], modes.items(), strict=True):
        for run in result["runs"]:
            sites = list(run["per_site"])
            ax.plot(sites, [run["per_site"][s]["aji"] for s in sites], "o-", label=f"seed {run['seed']}")
        ax.set(title=f"{mode}: AJI per site", ylim=(0, 1), ylabel="test AJI")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one DP run of one round on tiny sites (a smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run.seed values")
    parser.add_argument("--modes", nargs="+", choices=["dp", "nodp"], default=["dp", "nodp"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "bench-instances")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.modes = args.seeds[:1], ["dp"]
    target = results_path("instance_segmentation", args.quick)
    for mode in args.modes:
        mine: list[dict[str, Any]] = []
        for seed in args.seeds:
            mine.append(run_once(seed, mode == "dp", args.out, args.quick))
            print(json.dumps(mine[-1]), flush=True)
            # written after each run, so a long benchmark cut short keeps what it measured; read
            # again first, so runs of other modes or seeds (another invocation, at the same time
            # or before) are kept
            summary = json.loads(target.read_text()) if target.is_file() and not args.quick else {}
            modes: dict[str, Any] = summary.get("modes", {})
            done = {r["seed"] for r in mine}
            runs = [r for r in modes.get(mode, {}).get("runs", []) if r["seed"] not in done] + mine
            runs.sort(key=lambda r: r["seed"])
            modes[mode] = {"runs": runs, "spread": spread(runs)}
            summary = {"benchmark": "instance_segmentation", "quick": args.quick, "config": CONFIG, "modes": modes}
            write_results(target, summary, lambda path, modes=modes: plot(modes, path))


if __name__ == "__main__":
    main()
