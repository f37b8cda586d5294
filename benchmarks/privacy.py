"""The price of privacy: what DP-SGD at ε = 1, 3, 8 costs in test AUROC and accuracy, and in speed
and memory for each task's model.

1. **Utility**: ``medfed simulate configs/classification-pneumoniamnist.toml`` (3 hospitals,
   Dirichlet(0.5) label skew, 5 rounds x 3 local epochs) with ``privacy.target-epsilon`` 1, 3, 8
   (each site's whole run; δ = 1/(10 n); privacy unit one image) and with DP off. The final global
   model is scored on all 624 official test images (AUROC with a 95% bootstrap interval, 200
   resamples, the same resamples for every ε, so DP / no-DP is a paired interval; accuracy). (The
   config's Dirichlet(0.5) split leaves one site's test split without a normal image, so per-site
   AUROC is not reported here; the ``utility`` benchmark scores sites on a milder split.)
2. **Cost**: for each task's model as its config builds it (``MODELS``), training samples/s and the
   training steps' peak memory, without and with DP-SGD (Opacus hooks, Poisson sampling, same
   model, batch and data: the config's first site), each in a fresh process: peak resident memory
   minus the resident memory once model and data are built (Linux resets the high-water mark
   through ``/proc/self/clear_refs``), and ``torch.cuda.max_memory_allocated`` on a GPU. The U-Net
   is measured a second time with only its biases and normalisation parameters trained
   (``train.trainable = "bias-norm"``, for fine-tuning a public starting model).

    .venv/bin/medfed bench privacy [--quick]

Writes benchmarks/results/privacy.json and plots/privacy.png (``--quick``: ε 8 and no DP, 1 round,
800 images per site, the classification model only: privacy-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import bench_config, federated_model, pyplot, results_path, save_figure, write_results
from medfed.central import train_loader, union
from medfed.data.sites import load_simulated_site
from medfed.evaluation.bootstrap import bootstrap_scores, paired_ratio, without_draws
from medfed.tasks import get_task
from medfed.training import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
PNEUMONIA = SHARED / "medmnist" / "pneumoniamnist.npz"
EPSILONS = (1.0, 3.0, 8.0, None)  # None: no DP
MODELS: dict[str, tuple[str, Path | None, dict[str, Any]]] = {  # config, its data (None: synthetic), overrides
    "classification CNN, PneumoniaMNIST 28 px": ("classification-pneumoniamnist.toml", PNEUMONIA, {}),
    "segmentation 2D U-Net, CHASE_DB1 96 px patches": ("segmentation-chasedb1.toml", SHARED / "chasedb1", {}),
    "segmentation 2D U-Net, CHASE_DB1 96 px patches, biases + norms trained": (
        "segmentation-chasedb1.toml",
        SHARED / "chasedb1",
        {"train.trainable": "bias-norm"},
    ),
    "segmentation 3D U-Net, synthetic 24³ patches": ("segmentation-synthetic3d.toml", None, {}),
    "detection CenterNet, BCCD 256 px": ("detection-bccd.toml", SHARED / "bccd" / "BCCD", {}),
}


def utility(epsilon: float | None, quick: bool, out: Path, replicates: int) -> dict[str, Any]:
    """One PneumoniaMNIST federation at ``epsilon`` (None: no DP), its global model scored."""
    overrides: dict[str, Any] = {"privacy.enabled": epsilon is not None}
    if epsilon is not None:
        overrides["privacy.target-epsilon"] = epsilon
    if quick:
        overrides |= {"run.rounds": 1, "data.max-samples-per-site": 800}
    config = bench_config("classification-pneumoniamnist.toml", PNEUMONIA, overrides)
    started = time.perf_counter()
    model, report = federated_model(config, out / f"epsilon-{epsilon or 'none'}")
    sites = dict(load_simulated_site(config, i) for i in range(config.data.sites))
    everyone = union(list(sites.values()))
    test = bootstrap_scores(config, model, {"all": everyone}, replicates)["per_site"]["all"]
    metrics = evaluate(get_task(config.run.task), model, everyone.split("test"), config, torch.device("cpu"))
    privacy = report["privacy"]
    return {
        "epsilon_target": epsilon,
        "epsilon_spent": {s: p["epsilon"] for s, p in privacy.items()},
        "noise_multiplier": {s: p["noise_multiplier"] for s, p in privacy.items()},
        "delta": {s: p["delta"] for s, p in privacy.items()},
        "test_auroc": test,
        "test_accuracy": metrics["accuracy"],
        "test_cases": test["n"],
        "seconds": time.perf_counter() - started,
    }


def _high_water_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def worker(name: str, private: bool, steps: int) -> dict[str, Any]:
    """Train ``MODELS[name]`` for ``steps`` steps (after 2 warm-up steps), with or without DP-SGD:
    samples/s and the peak memory the training added. Runs in its own process (see ``cost``)."""
    from medfed.privacy import make_private
    from medfed.site import seed_everything
    from medfed.training import build_optimizer, train

    file, data, overrides = MODELS[name]
    config = bench_config(file, data, overrides)
    task = get_task(config.run.task)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, site = load_simulated_site(config, 0)
    seed_everything(0)  # as a site seeds itself before it builds its loader
    model = task.build_model(config).to(device)
    loader = train_loader(config, site)
    optimizer = build_optimizer(model, config.train)
    if private:
        model, optimizer, loader = make_private(model, optimizer, loader, 1.0, config.privacy.max_grad_norm)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    baseline, _ = _high_water_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(task, model, loader, optimizer, device, epochs=1, max_steps=2)  # warm-up (its memory counts)
    stats = train(task, model, loader, optimizer, device, epochs=1, max_steps=steps)
    _, peak = _high_water_mib()
    return {
        "model": name,
        "dp": private,
        "device": device.type,
        "batch_size": config.train.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": steps,
        "samples_per_s": stats.examples / stats.seconds,
        "peak_minus_baseline_mib": peak - baseline,
        "baseline_rss_mib": baseline,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def cost(name: str, steps: int) -> dict[str, Any]:
    """Non-DP and DP training of one model, each in a fresh process; their ratios."""
    runs = {}
    for private in (False, True):
        command = [
            sys.executable,
            "-m",
            __name__,
            "--worker",
            name,
            "--steps",
            str(steps),
            *(["--dp"] if private else []),
        ]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,  # benchmarks/ as a package: python -m from the repository root
        )
        if done.returncode:
            raise RuntimeError(f"{name} ({'DP' if private else 'no DP'}) failed:\n{done.stderr[-3000:]}")
        runs["dp" if private else "non_dp"] = json.loads(done.stdout.strip().splitlines()[-1])
    dp, plain = runs["dp"], runs["non_dp"]
    return runs | {
        "dp_over_non_dp_samples_per_s": dp["samples_per_s"] / plain["samples_per_s"],
        "dp_over_non_dp_peak_memory": dp["peak_minus_baseline_mib"] / max(plain["peak_minus_baseline_mib"], 1.0),
    }


def plot(runs: list[dict[str, Any]], costs: dict[str, Any], path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
    labels = [f"ε={r['epsilon_target']:g}" if r["epsilon_target"] else "no DP" for r in runs]
    for x, run in enumerate(runs):
        auroc = run["test_auroc"]
        left.errorbar(x, auroc["value"], yerr=[[auroc["value"] - auroc["low"]], [auroc["high"] - auroc["value"]]],
                      fmt="o", color="#58a", capsize=3)  # fmt: skip
        left.plot(x, run["test_accuracy"], "s", color="#d62")
    left.set_xticks(range(len(runs)), labels)
    left.set(title="PneumoniaMNIST, FedAvg 3 sites", ylabel="test AUROC (o, 95% CI) / accuracy (□)")
    names = list(costs)
    speed = [costs[n]["dp_over_non_dp_samples_per_s"] for n in names]
    memory = [costs[n]["dp_over_non_dp_peak_memory"] for n in names]
    y = range(len(names))
    right.barh([i - 0.2 for i in y], speed, height=0.4, color="#58a", label="samples/s")
    right.barh([i + 0.2 for i in y], memory, height=0.4, color="#d62", label="peak training memory")
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set_yticks(list(y), [n.replace(", ", "\n", 1) for n in names], fontsize=7)
    right.set(title="DP-SGD / non-DP, same model and batch", xscale="log")
    right.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ε 8 and no DP, 1 round, the CNN's cost only")
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per cost measurement")
    parser.add_argument("--only", choices=["utility", "cost"], default=None, help="run one part (merged into the file)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-privacy")
    parser.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--dp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dp, args.steps)))
        return
    target = results_path("privacy", args.quick)
    summary = json.loads(target.read_text()) if args.only and target.is_file() else {}
    summary |= {"benchmark": "privacy", "quick": args.quick, "machine": f"{os.cpu_count()} CPU cores"}
    if args.only in (None, "utility"):
        runs = []
        for epsilon in (8.0, None) if args.quick else EPSILONS:
            runs.append(utility(epsilon, args.quick, args.out, args.replicates))
            auroc = runs[-1]["test_auroc"]
            print(f"ε={epsilon}: test AUROC {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}], "
                  f"accuracy {runs[-1]['test_accuracy']:.3f}", flush=True)  # fmt: skip
        no_dp = runs[-1]["test_auroc"]
        for run in runs:
            run["auroc_over_no_dp"] = paired_ratio(run["test_auroc"], no_dp)
        summary["utility"] = without_draws(runs)
    if args.only in (None, "cost"):
        summary["cost"] = {}
        for name in list(MODELS)[:1] if args.quick else MODELS:
            summary["cost"][name] = cost(name, args.steps)
            c = summary["cost"][name]
            print(f"{name}: DP/non-DP samples/s {c['dp_over_non_dp_samples_per_s']:.2f}, "
                  f"peak memory {c['dp_over_non_dp_peak_memory']:.1f}x", flush=True)  # fmt: skip
    drawn = "utility" in summary and "cost" in summary
    write_results(target, summary, (lambda path: plot(summary["utility"], summary["cost"], path)) if drawn else None)


if __name__ == "__main__":
    main()
