"""Pooled vs FedAvg, each without and with DP, on PneumoniaMNIST; and DP vs non-DP training speed.

Every model is trained for the same number of epochs over its data (rounds x local epochs), with
the config's recipes (without DP: Adam, constant lr, logit adjustment; with DP: SGD), and scored on the
same images: the official MedMNIST test split (624 chest X-rays), AUROC and, at the thresholds the
run chose on the validation splits, the sensitivity and specificity of all test cases together.
"Pooled" is one site holding all training data (what centralising the data would give);
"FedAvg" is three hospitals with a Dirichlet(0.5) label-skewed split (every site keeps both
classes in every split). DP runs use δ = 1/(10 n) per site (the default) and, for FedAvg, also
δ = 1e-5 (what the literature reports), both at ε = 8. The FedAvg runs repeat for each
``--seeds`` value (``run.seed``: the Dirichlet draw, the initial model and the DP noise), so the
table shows the spread over partition draws; pooled runs once (seed 0).

    .venv/bin/medfed bench spine [--npz PATH] [--quick] [--seeds 0 1 2]

Writes benchmarks/results/spine.json and plots/spine.png (test AUROC of every run), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import pyplot, results_path, save_figure, throughput, write_results
from medfed.config import load_config
from medfed.data.medmnist import read_medmnist
from medfed.run_folder import RunFolder
from medfed.simulation import simulate
from medfed.tasks import get_task
from medfed.training import evaluate
from medfed.weights import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "classification-pneumoniamnist.toml"


def _test_metrics(config, checkpoint: Path, npz: Path) -> dict[str, float]:
    task = get_task(config.run.task)
    model = task.build_model(config)
    state, _ = load_checkpoint(checkpoint)
    model.load_state_dict(state)
    test = read_medmnist(npz).split("test")
    return evaluate(task, model, test, config, torch.device("cpu"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz")
    parser.add_argument("--quick", action="store_true", help="1 round, 800 samples per site (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-spine")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed values of the FedAvg runs")
    args = parser.parse_args(argv)
    base = {"data.path": str(args.npz.resolve()), "evaluation.cross-site": False, "evaluation.example-images": 0}
    if args.quick:
        base |= {"run.rounds": 1, "data.max-samples-per-site": 800}
    results = []
    pooled, federated = {"data.sites": 1, "run.min-sites": 1}, {"data.sites": 3}
    fedavg_setups = [
        ("fedavg-3-sites", federated | delta | {"run.seed": seed}, private)
        for private, delta in [(False, {}), (True, {}), (True, {"privacy.delta": 1e-5})]
        for seed in args.seeds
    ]
    for setup, extra, private in [("pooled", pooled, False), ("pooled", pooled, True), *fedavg_setups]:
        config = load_config(CONFIG, base | extra | {"privacy.enabled": private})
        delta = "-delta1e-5" if config.privacy.delta else ""
        out = args.out / f"{setup}-{'dp' if private else 'nodp'}{delta}-seed{config.run.seed}"
        started = time.perf_counter()
        report = simulate(config, out)
        seconds = time.perf_counter() - started
        test = _test_metrics(config, RunFolder(out).global_model, args.npz)
        row = {
            "setup": setup,
            "seed": config.run.seed,
            "dp": private,
            "epsilon": max((p["epsilon"] for p in report["privacy"].values()), default=None),
            "delta": max((p["delta"] for p in report["privacy"].values()), default=None),
            "test_auroc": test["auroc"],
            "test_accuracy": test["accuracy"],
            "pooled_sites": report["final"]["pooled"],
            "thresholds": report["final"]["operating_point"],
            "wall_seconds": seconds,
            "epochs": config.run.rounds * config.train.local_epochs,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    config = load_config(CONFIG, base)
    measured = throughput(config, read_medmnist(args.npz), steps=30)
    speed = {"non_dp_samples_per_s": measured["samples_per_s"], "dp_samples_per_s": measured["dp_samples_per_s"]}
    speed["dp_over_non_dp"] = speed["dp_samples_per_s"] / speed["non_dp_samples_per_s"]
    summary = {
        "benchmark": "spine",
        "quick": args.quick,
        "runs": results,
        "throughput": speed,
        "reference": "MedMNIST v2 ResNet-18 (28px), central, no DP: test AUC 0.944, ACC 0.854",
    }
    print(json.dumps(speed))
    write_results(results_path("spine", args.quick), summary, lambda path: plot(results, path))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Test AUROC of every run, one column per setup (pooled / FedAvg, without / with DP), one dot per seed."""
    labels = sorted({_label(row) for row in results}, key=[_label(row) for row in results].index)
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for row in results:
        ax.scatter(labels.index(_label(row)), row["test_auroc"], color="tab:red" if row["dp"] else "tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("test AUROC (official test split)")
    ax.set_title("PneumoniaMNIST: pooled vs FedAvg, without (blue) / with DP (red)")
    save_figure(fig, path)


def _label(row: dict[str, Any]) -> str:
    delta = f", δ {row['delta']:.0e}" if row["dp"] and row["delta"] and row["delta"] <= 1e-5 else ""
    return f"{row['setup']}{', DP ε 8' if row['dp'] else ''}{delta}"


if __name__ == "__main__":
    main()
