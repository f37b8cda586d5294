"""Does each shipped demo config reach its figure in every run, not only in a lucky one?

DP noise, the initial model and the synthetic hospitals themselves (their scanners and prevalence)
differ with ``run.seed``, and a recipe that reaches its figure in one run and collapses in the next
is not a recipe. Each config below runs ``--runs`` times (run.seed 0, 1, ...) as shipped: DP on
where the config has it, and the cross-site matrix on, so a site's ε covers its local-only model
too and the federation trains under the noise of twice the steps. Only the example images are off.
Every site's final test figure is checked against the figure the README promises for it:

- ``classification-synthetic`` (``make demo``): sensitivity and specificity >= 0.85 at every site,
  at the threshold each site chose on its validation split;
- ``segmentation-synthetic``: Dice >= 0.5 at every site (DP, ε = 8);
- ``detection-synthetic``: mAP@0.5 >= 0.4 at every site (DP, ε = 8).

The real-data configs (PneumoniaMNIST, CHASE_DB1, BCCD, the retinal sites) cost 5-40 minutes per
run on 2 CPU cores; their spread over runs is in ``spine`` (partition draws) and their own benchmarks.

    .venv/bin/medfed bench repeatability [--quick] [--runs 5] [--configs classification-synthetic ...]

Writes benchmarks/results/repeatability.json after each run (the configs not run keep their entries; ``--quick``: the demo config, 2 runs of 1 round,
repeatability-quick.json: a smoke run) and plots/repeatability.png (each run's worst site per
figure), and prints one line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import CONFIGS, pyplot, results_path, save_figure, write_results
from medfed.config import load_config
from medfed.simulation import simulate

# config -> the figures every site must reach in every run: metric -> minimum
FIGURES: dict[str, dict[str, float]] = {
    "classification-synthetic": {"sensitivity": 0.85, "specificity": 0.85},
    "segmentation-synthetic": {"dice": 0.5},
    "detection-synthetic": {"map50": 0.4},
}


def run_once(name: str, seed: int, out: Path, quick: bool) -> dict[str, Any]:
    """One shipped run at ``run.seed = seed``: every site's figures, and whether all reach them."""
    overrides = {"evaluation.example-images": 0, "run.seed": seed} | ({"run.rounds": 1} if quick else {})
    config = load_config(CONFIGS / f"{name}.toml", overrides)
    started = time.perf_counter()
    report = simulate(config, out / f"{name}-seed{seed}")
    per_site = {
        site: {metric: float(values[metric]) for metric in FIGURES[name]}
        for site, values in report["final"]["per_site"].items()
    }
    reached = all(per_site[site][metric] >= low for site in per_site for metric, low in FIGURES[name].items())
    return {"seed": seed, "per_site": per_site, "reached": reached, "seconds": time.perf_counter() - started}


def plot(configs: dict[str, Any], path: Path) -> None:
    """Each run's worst site per figure, one panel per config, the figure as a dashed line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3.2), squeeze=False)
    for ax, (name, result) in zip(axes[0], configs.items(), strict=True):
        for metric, low in result["figures"].items():
            worst = [min(site[metric] for site in run["per_site"].values()) for run in result["runs"]]
            ax.plot([run["seed"] for run in result["runs"]], worst, "o-", label=f"{metric} (worst site)")
            ax.axhline(low, linestyle="--", color="grey")
        ax.set(title=f"{name}: {result['reached']} of {len(result['runs'])}", xlabel="run.seed", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo config, 2 runs of 1 round (a smoke run)")
    parser.add_argument("--runs", type=int, default=5, help="runs per config (run.seed 0 .. runs-1)")
    parser.add_argument("--configs", nargs="+", choices=sorted(FIGURES), default=list(FIGURES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "bench-repeat")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be between 1 and 20")
    if args.quick:
        args.runs, args.configs = 2, ["classification-synthetic"]
    # a run of some configs keeps the others' last measured runs (each entry records its own runs)
    path = results_path("repeatability", args.quick)
    configs = {} if args.quick or not path.is_file() else json.loads(path.read_text())["configs"]
    for name in args.configs:
        runs = []
        for seed in range(args.runs):
            runs.append(run_once(name, seed, args.out, args.quick))
            print(json.dumps({"config": name, **runs[-1]}), flush=True)
            configs[name] = {"figures": FIGURES[name], "runs": runs, "reached": sum(run["reached"] for run in runs)}
            # written after each run, so a long run cut short keeps what it measured (its entry: the runs done)
            summary = {"benchmark": "repeatability", "quick": args.quick, "as_shipped": True, "configs": configs}
            write_results(path, summary, lambda figure: plot(configs, figure))
        print(f"{name}: figures reached in {configs[name]['reached']} of {len(runs)} runs", flush=True)


if __name__ == "__main__":
    main()
