"""One multi-label model against one binary model per finding, on the same synthetic federation.

Three synthetic hospitals (``configs/classification-multilabel-synthetic.toml``: 32 x 32 images
holding any of 3 findings, a disc, a ring and a bar, each present independently with its own
prevalence per site) are written to site folders once per ``run.seed``. On them run, with the
config's training settings and DP-SGD at ε = 8 per site (``--no-dp`` adds runs without DP):

- the multi-label model (``data.multi-label = true``): one sigmoid output per finding;
- one binary model per finding (the same images, the label column reduced to that finding, the
  ordinary two-class classification), each a federation of its own.

Measured: each finding's test AUROC, mean over the sites where it is defined, and their mean over findings (the
multi-label model's primary metric), over ``--seeds`` runs. The goal: the multi-label mean AUROC
within 3 points (0.03) of the per-finding binary models'.

    .venv/bin/medfed bench multilabel [--quick] [--seeds 3] [--no-dp] [--samples N] [--rounds R]

Writes benchmarks/results/multilabel.json (``--quick``: one seed, 1 round, 60 images per site:
multilabel-quick.json, a smoke run) and plots/multilabel.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import bench_config, pyplot, results_path, save_figure, write_results
from medfed.config import Config
from medfed.data import write_site
from medfed.data.synthetic import synthetic_multilabel_site
from medfed.simulation import simulate

CONFIG = "classification-multilabel-synthetic.toml"
GOAL = 0.03  # the multi-label mean AUROC within this of the binary models'


def write_sites(config: Config, root: Path) -> tuple[Path, list[Path]]:
    """The config's synthetic hospitals as multi-label site folders under ``root / "multilabel"``,
    and per finding the same images with that finding's 0/1 label (``root / "finding-k"``)."""
    d = config.data
    sites = [synthetic_multilabel_site(i, d.samples_per_site, d.image_size, d.num_classes, config.run.seed)
             for i in range(d.sites)]  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)
    for i, site in enumerate(sites):
        write_site(root / "multilabel" / f"site-{i + 1}", site)
    findings = []
    for k in range(d.num_classes):
        for i, site in enumerate(sites):
            write_site(root / f"finding-{k}" / f"site-{i + 1}", dataclasses.replace(site, targets=site.targets[:, k]))
        findings.append(root / f"finding-{k}")
    return root / "multilabel", findings


def run(config: Config, out: Path) -> tuple[dict[str, dict[str, float]], float]:
    """A federation: each site's final test metrics and the seconds it took."""
    started = time.perf_counter()
    report = simulate(config, out)
    return report["final"]["per_site"], time.perf_counter() - started


def _site_mean(per_site: dict[str, dict[str, float]], metric: str) -> float:
    """``metric``'s mean over the sites where it is defined (a small test split may hold one class)."""
    return float(np.nanmean([m[metric] for m in per_site.values()]))


def compare(base: Config, seed: int, private: bool, out: Path) -> dict[str, Any]:
    """The multi-label model and the per-finding binary models at one seed, with or without DP."""
    config = base.with_overrides({"run.seed": seed, "privacy.enabled": private})
    out = out / f"{'dp' if private else 'no-dp'}-seed{seed}"
    multilabel_folder, finding_folders = write_sites(config, out / "sites")
    names = config.data.class_names
    ml_sites, ml_seconds = run(
        config.with_overrides({"data.source": "sites", "data.path": str(multilabel_folder)}), out / "multilabel"
    )
    multi = {name: _site_mean(ml_sites, f"auroc_class_{k}") for k, name in enumerate(names)}
    binary, binary_seconds = {}, 0.0
    for k, folder in enumerate(finding_folders):
        overrides = {"data.source": "sites", "data.path": str(folder), "data.multi-label": False,
                     "data.num-classes": 2, "data.class-names": []}  # fmt: skip
        per_site, seconds = run(config.with_overrides(overrides), out / f"binary-{k}")
        binary[names[k]] = _site_mean(per_site, "auroc")
        binary_seconds += seconds
    result = {
        "seed": seed,
        "dp": private,
        "multilabel_auroc": multi,
        "binary_auroc": binary,
        "multilabel_mean": float(np.mean(list(multi.values()))),
        "binary_mean": float(np.mean(list(binary.values()))),
        "multilabel_seconds": ml_seconds,
        "binary_seconds": binary_seconds,
    }
    result["gap"] = result["binary_mean"] - result["multilabel_mean"]
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode (DP or not): mean, min and max over seeds of both means and of the gap; the goal."""
    modes: dict[str, Any] = {}
    for private in sorted({r["dp"] for r in runs}, reverse=True):
        mine = [r for r in runs if r["dp"] == private]
        stats = {}
        for key in ("multilabel_mean", "binary_mean", "gap"):
            values = [r[key] for r in mine]
            stats[key] = {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
        stats["goal_met"] = bool(stats["gap"]["mean"] <= GOAL)
        stats["seeds"] = len(mine)
        modes["dp" if private else "no_dp"] = stats
    return modes


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Mean AUROC per seed, multi-label against binary, one panel per mode."""
    plt = pyplot()
    modes = sorted({r["dp"] for r in runs}, reverse=True)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.2), squeeze=False)
    for ax, private in zip(axes[0], modes, strict=True):
        mine = [r for r in runs if r["dp"] == private]
        seeds = [r["seed"] for r in mine]
        ax.plot(seeds, [r["multilabel_mean"] for r in mine], "o-", label="one multi-label model")
        ax.plot(seeds, [r["binary_mean"] for r in mine], "s--", label="one binary model per finding")
        ax.set(title="DP ε = 8" if private else "no DP", xlabel="run.seed", ylabel="mean test AUROC", ylim=(0.4, 1.02))
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 1 round, 60 images per site (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per mode (run.seed 0 .. seeds-1)")
    parser.add_argument("--no-dp", action="store_true", help="also run without DP")
    parser.add_argument("--samples", type=int, default=0, help="images per site (0: the config's)")
    parser.add_argument("--rounds", type=int, default=0, help="federated rounds (0: the config's)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "bench-multilabel"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.seeds <= 10:
        parser.error("--seeds must be between 1 and 10")
    overrides: dict[str, Any] = {"run.rounds": 1, "data.samples-per-site": 60} if args.quick else {}
    overrides |= {"data.samples-per-site": args.samples} if args.samples else {}
    overrides |= {"run.rounds": args.rounds} if args.rounds else {}
    base = bench_config(CONFIG, None, overrides)
    seeds = 1 if args.quick else args.seeds
    runs = []
    for private in (True, False) if args.no_dp else (True,):
        for seed in range(seeds):
            runs.append(compare(base, seed, private, args.out))
            print(json.dumps(runs[-1]), flush=True)
            summary = {"benchmark": "multilabel", "quick": args.quick, "config": base.to_public_dict(),
                       "goal": GOAL, "runs": runs, "summary": summarise(runs)}  # fmt: skip
            write_results(results_path("multilabel", args.quick), summary, lambda path: plot(runs, path))


if __name__ == "__main__":
    main()
