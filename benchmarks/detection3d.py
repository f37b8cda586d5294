"""Lung nodules in chest CT at 3 synthetic hospitals: FedAvg without and with DP (ε = 8 per site),
scored as LUNA16 scores nodules.

``configs/detection-synthetic3d.toml`` (3D CenterNet, volumes of 32³ voxels, nodules of 3-30 mm and 2 voxels,
each hospital's own voxel size, dose and kernel) is run through ``medfed simulate`` for each of
``--seeds`` values of ``run.seed`` (the sites' data stay those of ``data.seed``), with
``privacy.enabled`` false and true; the global model's sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8
false positives per scan and their mean, the CPM (metric ``froc``), on each site's test scans.

    .venv/bin/medfed bench detection3d [--seeds N] [--rounds N] [--only dp|nodp] [--quick] [--rerun]

Runs already in the results file are kept, not redone (``--rerun`` redoes them), so that
``--seeds 3`` after ``--seeds 2`` runs the third seed only.

Writes benchmarks/results/detection3d.json (``--quick``: detection3d-quick.json, 16³ volumes and
1 round) and plots/detection3d.png (the FROC curve of each site, first seed), printing each run as
it ends.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import fedavg, pyplot, results_path, save_figure, save_json, write_results
from medfed.config import load_config
from medfed.tasks.detection import FROC_FP_RATES

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "detection-synthetic3d.toml"
QUICK = {"data.image-size": 16, "data.samples-per-site": 40, "run.rounds": 1, "model.depth": 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="run.seed 0 .. N-1")
    parser.add_argument("--rounds", type=int, default=0, help="override run.rounds (0: the config's)")
    parser.add_argument("--only", choices=["nodp", "dp"], default=None, help="run one mode")
    parser.add_argument("--quick", action="store_true", help="16³ volumes, 40 per site, 1 round, 1 seed")
    parser.add_argument("--rerun", action="store_true", help="redo runs already in the results file")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-detection3d")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"evaluation.example-images": 0, "evaluation.cross-site": False}
    if args.quick:
        overrides.update(QUICK)
    if args.rounds:
        overrides["run.rounds"] = args.rounds
    base = load_config(CONFIG, overrides)
    target = results_path("detection3d", args.quick)
    summary = json.loads(target.read_text()) if target.is_file() else {}
    summary.update({"benchmark": "detection3d", "quick": args.quick, "config": base.to_public_dict()})
    runs: dict[str, dict[str, Any]] = summary.setdefault("runs", {})
    for seed in range(1 if args.quick else args.seeds):
        for private in (False, True):
            mode = "dp" if private else "nodp"
            if args.only not in (None, mode) or (f"{mode}-seed{seed}" in runs and not args.rerun):
                continue
            config = base.with_overrides({"run.seed": seed, "privacy.enabled": private})
            result = fedavg(config, args.out / f"{mode}-seed{seed}")
            runs[f"{mode}-seed{seed}"] = _scored(result, seed, private)
            print(f"{mode} seed {seed}:", json.dumps(runs[f"{mode}-seed{seed}"]["cpm"]), flush=True)
            # runs another process (--only the other mode) wrote meanwhile are kept
            written = json.loads(target.read_text()).get("runs", {}) if target.is_file() else {}
            runs.update({name: run for name, run in written.items() if name not in runs})
            save_json(target, summary)
    if target.is_file():
        runs.update({n: r for n, r in json.loads(target.read_text()).get("runs", {}).items() if n not in runs})
    summary["modes"] = {
        mode: _spread([run for run in runs.values() if run["dp"] == (mode == "dp")]) for mode in ("nodp", "dp")
    }
    write_results(target, summary, lambda path: _plot(runs, path))


def _scored(result: dict[str, Any], seed: int, private: bool) -> dict[str, Any]:
    """One run's CPM and sensitivity at each operating point per site, and the sites' ε."""
    metrics = result["metrics"]
    return {
        "seed": seed,
        "dp": private,
        "cpm": {site: m["froc"] for site, m in metrics.items()},
        "sensitivity": {site: {f"{r:g}": m[f"froc@{r:g}fp"] for r in FROC_FP_RATES} for site, m in metrics.items()},
        "map50": {site: m["map50"] for site, m in metrics.items()},
        "epsilon": result["epsilon"],
        "noise_multiplier": result["noise_multiplier"],
        "seconds": result["seconds"],
    }


def _spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean CPM over sites and seeds, the worst and best site's, and the mean sensitivity per operating point."""
    if not runs:
        return {}
    cpm = [v for run in runs for v in run["cpm"].values()]
    sensitivity = {
        f"{r:g}": float(np.mean([s[f"{r:g}"] for run in runs for s in run["sensitivity"].values()]))
        for r in FROC_FP_RATES
    }
    return {"runs": len(runs), "cpm_mean": float(np.mean(cpm)), "cpm_worst_site": min(cpm), "cpm_best_site": max(cpm),
            "sensitivity_mean": sensitivity}  # fmt: skip


def _plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, mode in zip(axes, ("nodp", "dp"), strict=True):
        first = next((run for name, run in sorted(runs.items()) if run["dp"] == (mode == "dp")), None)
        if first is not None:
            for site, values in first["sensitivity"].items():
                ax.plot(FROC_FP_RATES, [values[f"{r:g}"] for r in FROC_FP_RATES], marker="o",
                        label=f"{site} (CPM {first['cpm'][site]:.2f})")  # fmt: skip
            ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("false positives per scan")
        ax.set_title("no DP" if mode == "nodp" else "DP ε = 8 per site")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("sensitivity")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
