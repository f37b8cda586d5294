"""What federating costs on top of the training itself, in a simulation: time per round against
the slowest site's local training, bytes per site per round against the model's size, and what
update compression saves and costs.

``medfed simulate configs/classification-pneumoniamnist.toml`` (3 sites, DP ε = 8, 5 rounds x 3
local epochs, cross-site evaluation off) three times: ``run.update-compression`` none, ``fp16`` and
``int8``. From each report, per round: wall seconds (aggregation, validation of updates and the
sites' validation-split evaluation included) over the slowest site's local training seconds, and
the bytes sent down to and up from each site in units of the float32 model (numel x 4). The
final global model of each run is scored on all 624 official test images: AUROC with a 95%
bootstrap interval, and its change from the uncompressed run on the same resamples (training is
seeded, so the runs differ only by the compression and its rounding).

    .venv/bin/medfed bench overhead [--quick]

Writes benchmarks/results/overhead.json and plots/overhead.png (``--quick``: none and int8, 1
round, 800 images per site: overhead-quick.json). The same measures for real processes over TLS
are in ``deployment_overhead`` (benchmarks/results/deployment_overhead.json).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    federated_model,
    model_bytes,
    per_round,
    pyplot,
    results_path,
    save_figure,
    write_results,
)
from medfed.central import union
from medfed.config import load_config
from medfed.data.sites import load_simulated_site
from medfed.evaluation.bootstrap import bootstrap_scores, paired_ratio, without_draws

REPO = Path(__file__).resolve().parent.parent
PNEUMONIA = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
COMPRESSIONS = ("none", "fp16", "int8")


def run(compression: str, quick: bool, out: Path, replicates: int) -> dict[str, Any]:
    if not PNEUMONIA.is_file():
        raise SystemExit(f"data not found at {PNEUMONIA} (the benchmarks read ../shared/data beside the repo)")
    overrides = {
        "data.path": str(PNEUMONIA),
        "run.update-compression": compression,
        "evaluation.cross-site": False,
        "evaluation.example-images": 0,
    }
    if quick:
        overrides |= {"run.rounds": 1, "data.max-samples-per-site": 800}
    config = load_config(REPO / "configs" / "classification-pneumoniamnist.toml", overrides)
    started = time.perf_counter()
    model, report = federated_model(config, out / compression)
    wall = time.perf_counter() - started
    sites = [load_simulated_site(config, i)[1] for i in range(config.data.sites)]
    test = bootstrap_scores(config, model, {"all": union(sites)}, replicates)["per_site"]["all"]
    rounds = per_round(report, config.data.sites, model_bytes(config))
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "compression": compression,
        "model_float32_bytes": model_bytes(config),
        "rounds": rounds,
        "wall_over_slowest_local": float(np.mean([r["wall_over_local"] for r in trained])),
        "down_models_per_site_per_round": float(np.mean([r["down_models_per_site"] for r in trained])),
        "up_models_per_site_per_round": float(np.mean([r["up_models_per_site"] for r in trained])),
        "test_auroc": test,
        "run_seconds": wall,
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    fig, (left, middle, right) = pyplot().subplots(1, 3, figsize=(11, 3.4))
    labels = [r["compression"] for r in runs]
    x = np.arange(len(runs))
    left.bar(x, [r["wall_over_slowest_local"] for r in runs], color="#58a")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set(title="Round wall / slowest local training", xticks=x, xticklabels=labels)
    middle.bar(x - 0.2, [r["down_models_per_site_per_round"] for r in runs], 0.4, label="down", color="#9ab")
    middle.bar(x + 0.2, [r["up_models_per_site_per_round"] for r in runs], 0.4, label="up", color="#58a")
    middle.set(title="Bytes per site per round\n(float32 models)", xticks=x, xticklabels=labels)
    middle.legend(fontsize=7)
    for i, r in enumerate(runs):
        a = r["test_auroc"]
        right.errorbar(i, a["value"], yerr=[[a["value"] - a["low"]], [a["high"] - a["value"]]], fmt="o", capsize=3)
    right.set(title="Test AUROC (95% CI)", xticks=x, xticklabels=labels)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="none and int8, 1 round, 800 images per site")
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-overhead")
    args = parser.parse_args(argv)
    runs = []
    for compression in ("none", "int8") if args.quick else COMPRESSIONS:
        runs.append(run(compression, args.quick, args.out, args.replicates))
        r = runs[-1]
        print(f"{compression}: round wall / slowest local {r['wall_over_slowest_local']:.2f}, "
              f"per site per round down {r['down_models_per_site_per_round']:.2f} / up "
              f"{r['up_models_per_site_per_round']:.2f} models, test AUROC {r['test_auroc']['value']:.4f}", flush=True)  # fmt: skip
    for r in runs:
        r["auroc_change"] = {k: v - 1 for k, v in paired_ratio(r["test_auroc"], runs[0]["test_auroc"]).items()}
        r["auroc_change"]["absolute"] = r["test_auroc"]["value"] - runs[0]["test_auroc"]["value"]
    summary = {"benchmark": "overhead", "quick": args.quick, "machine": f"{os.cpu_count()} CPU cores",
               "sites": 3, "runs": without_draws(runs)}  # fmt: skip
    write_results(results_path("overhead", args.quick), summary, lambda path: plot(runs, path))


if __name__ == "__main__":
    main()
