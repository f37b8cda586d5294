"""Private training that stays useful on small sites: each DP-SGD switch measured, side by side, in one run.

1. **CHASE_DB1** (retinal vessels; 3 hospitals of 4-6 training images each; ε = 8 per image, δ = 1/(10 n)):
   a ladder from the plain federation to the best settings found, each rung adding one switch to
   ``configs/segmentation-chasedb1-dp.toml`` (5 rounds x 2 steps, SGD without momentum, cross-site
   matrix off so the whole ε goes to the federated model):
   DP from random weights; + a public starting model (``medfed pretrain --phantom vessels``: fundus-like
   phantoms, no patient; built here first, ~3 min); + only biases and normalisation trained; + 4
   random patches per image averaged before clipping (augmentation multiplicity: the config);
   + the released model a moving average of the global models (``run.ema``); and, for reference,
   the public model untrained and the config's federation without DP. Dice per test image, each
   site's mean with a 95 % bootstrap interval (200 resamples), the worst site, the mean of sites.
2. **PneumoniaMNIST** (3 hospitals, Dirichlet(0.5); ε = 8 per image): the federation of
   ``configs/classification-pneumoniamnist-dp.toml`` without its DP switches, without and with DP;
   + 4 random views per image (``train.augment``: shifts and rotations; ``train.augmentations = 4``);
   + ``run.ema`` 0.5 (the config); and DP with only the moving average.
   Test AUROC on all 624 official test images with a paired 95 % bootstrap interval of DP / no DP.
3. **Speed**: training samples/s with and without DP-SGD (same model, batch and data: the first
   site) for both DP configs, with 1 and with 4 views per image (images/s: a view is not a sample).

    .venv/bin/medfed bench dp_small_sites [--quick] [--only chasedb1 pneumoniamnist speed]

Writes benchmarks/results/dp_small_sites.json and plots/dp_small_sites.png (``--quick``: PneumoniaMNIST
only, 1 round on 400 images per site, no speed: dp_small_sites-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    bench_config,
    federated_model,
    pyplot,
    results_path,
    save_figure,
    throughput,
    write_results,
)
from medfed.central import union
from medfed.config import Config
from medfed.data.sites import load_simulated_site
from medfed.evaluation.bootstrap import bootstrap_scores, paired_ratio, without_draws
from medfed.federation import initial_model
from medfed.run_folder import RunFolder
from medfed.tasks import get_task
from medfed.weights import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CHASE = SHARED / "chasedb1"
PNEUMONIA = SHARED / "medmnist" / "pneumoniamnist.npz"
PRETRAIN = {"phantom": "vessels", "samples_per_site": 60, "epochs": 30}  # as the config's comment says

CHASE_LADDER: list[tuple[str, dict[str, Any]]] = [
    ("DP, random start, all weights", {"run.initial-model": "", "train.trainable": "all"}),
    ("+ public start", {"train.trainable": "all"}),
    ("+ biases and norms only", {"train.augmentations": 1}),
    ("+ 4 views per image (config)", {}),
    ("+ moving average (run.ema 0.5)", {"run.ema": 0.5}),
    ("config without DP", {"privacy.enabled": False}),
]
PLAIN = {"train.augment": False, "train.augmentations": 1, "run.ema": 0.0}  # the config without its DP switches
PNEUMONIA_LADDER: list[tuple[str, dict[str, Any]]] = [
    ("no DP", PLAIN | {"privacy.enabled": False}),
    ("DP", PLAIN),
    ("+ 4 views per image", {"run.ema": 0.0}),
    ("+ moving average (run.ema 0.5): config", {}),
    ("DP + moving average only", PLAIN | {"run.ema": 0.5}),
]


def public_model(out: Path) -> tuple[Path, float | None]:
    """The CHASE_DB1 config's public starting model, built once into ``out`` (no patient data)."""
    from medfed.pretrain import pretrain

    path = out / "public" / "chasedb1-vessels.safetensors"
    if path.is_file():
        return path, None  # built earlier: its time is not known here
    started = time.perf_counter()
    pretrain(bench_config("segmentation-chasedb1-dp.toml", CHASE, {}), path, **PRETRAIN)
    return path, time.perf_counter() - started


def _worst(scores: dict[str, Any]) -> float:
    return min(site["value"] for site in scores["per_site"].values())


def _federation(config: Config, out: Path, reuse: bool) -> tuple[torch.nn.Module, dict[str, Any], float | None]:
    """The federation of ``config`` in ``out``: simulated now (with its seconds), or with ``reuse``
    the one already there (same config required; seconds unknown)."""
    folder = RunFolder(out)
    if reuse and folder.report_json.is_file():
        report = json.loads(folder.report_json.read_text())
        if _comparable(report["config"]) != _comparable(config.to_public_dict()):
            raise SystemExit(f"--reuse: {out} holds a run of another config")
        model = get_task(config.run.task).build_model(config)
        model.load_state_dict(load_checkpoint(folder.global_model)[0])
        return model, report, None
    started = time.perf_counter()
    model, report = federated_model(config, out)
    return model, report, time.perf_counter() - started


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as JSON with the starting checkpoint's path resolved (``out`` may be reached by a link)."""
    plain = json.loads(json.dumps(config))
    if plain["run"].get("initial-model"):
        plain["run"]["initial-model"] = str(Path(plain["run"]["initial-model"]).resolve())
    return plain


def chasedb1(out: Path, replicates: int, reuse: bool) -> dict[str, Any]:
    """The CHASE_DB1 ladder: per-site test Dice of each rung's final global model."""
    checkpoint, pretrain_seconds = public_model(out)
    base = {"run.initial-model": str(checkpoint)}
    config = bench_config("segmentation-chasedb1-dp.toml", CHASE, base)
    sites = dict(load_simulated_site(config, i) for i in range(config.data.sites))
    rows = [{"name": "public model, untrained at sites", **without_draws(
        bootstrap_scores(config, initial_model(config), sites, replicates))}]  # fmt: skip
    rows[0]["worst"] = _worst(rows[0])
    for name, overrides in CHASE_LADDER:
        config = bench_config("segmentation-chasedb1-dp.toml", CHASE, base | overrides)
        model, report, seconds = _federation(config, out / f"chasedb1-{len(rows)}", reuse)
        scores = bootstrap_scores(config, model, sites, replicates)
        rows.append({"name": name, "overrides": overrides, **without_draws(scores), "worst": _worst(scores),
                     **_privacy(report), "seconds": seconds})  # fmt: skip
        _print(rows[-1], "Dice")
    return {"pretrain_seconds": pretrain_seconds, "pretrain": PRETRAIN, "rows": rows}


def pneumoniamnist(out: Path, replicates: int, quick: bool, reuse: bool) -> dict[str, Any]:
    """The PneumoniaMNIST ladder: test AUROC of each rung's global model on all test images."""
    scale = {"run.rounds": 1, "data.max-samples-per-site": 400} if quick else {}
    ladder = PNEUMONIA_LADDER[:2] if quick else PNEUMONIA_LADDER
    rows, draws = [], []
    for name, overrides in ladder:
        config = bench_config("classification-pneumoniamnist-dp.toml", PNEUMONIA, scale | overrides)
        model, report, seconds = _federation(config, out / f"pneumoniamnist-{len(rows)}", reuse)
        everyone = union([load_simulated_site(config, i)[1] for i in range(config.data.sites)])
        scores = bootstrap_scores(config, model, {"all": everyone}, replicates)["per_site"]["all"]
        draws.append(scores)
        rows.append({"name": name, "overrides": overrides, "test_auroc": without_draws(scores), **_privacy(report),
                     "seconds": seconds})  # fmt: skip
        rows[-1]["auroc_over_no_dp"] = paired_ratio(scores, draws[0])
        _print(rows[-1], "AUROC")
    return {"rows": rows}


def speed(steps: int) -> list[dict[str, Any]]:
    """DP / non-DP training speed of both DP configs, with 1 and 4 views per image."""
    cases = [
        ("CHASE_DB1 U-Net, biases and norms", "segmentation-chasedb1-dp.toml", CHASE, {"train.augmentations": 1}),
        ("CHASE_DB1 U-Net, biases and norms, 4 views", "segmentation-chasedb1-dp.toml", CHASE, {}),
        ("PneumoniaMNIST CNN", "classification-pneumoniamnist-dp.toml", PNEUMONIA, PLAIN),
        ("PneumoniaMNIST CNN, 4 views", "classification-pneumoniamnist-dp.toml", PNEUMONIA, {}),
    ]  # fmt: skip
    rows = []
    for name, file, data, overrides in cases:
        config = bench_config(file, data, {"run.initial-model": ""} | overrides)
        measured = throughput(config, load_simulated_site(config, 0)[1], steps)
        rows.append({"name": name, "batch_size": config.train.batch_size, **measured})
        print(f"{name}: {measured['samples_per_s']:.1f} images/s without DP, {measured['dp_samples_per_s']:.1f} "
              f"with; ratio {measured['dp_ratio']:.2f}", flush=True)  # fmt: skip
    return rows


def _privacy(report: dict[str, Any]) -> dict[str, Any]:
    privacy = report["privacy"]
    return {
        "epsilon": {site: p["epsilon"] for site, p in privacy.items()},
        "noise_multiplier": {site: p["noise_multiplier"] for site, p in privacy.items()},
    }


def _print(row: dict[str, Any], metric: str) -> None:
    if "per_site" in row:
        sites = ", ".join(f"{s} {v['value']:.3f}" for s, v in row["per_site"].items())
        print(f"{row['name']}: {metric} {sites}; worst {row['worst']:.3f}", flush=True)
    else:
        auroc = row["test_auroc"]
        print(f"{row['name']}: {metric} {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}]", flush=True)


def plot(summary: dict[str, Any], path: Path) -> None:
    parts = [p for p in ("chasedb1", "pneumoniamnist") if p in summary]
    fig, axes = pyplot().subplots(1, len(parts), figsize=(6 * len(parts), 3.8), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        rows = summary[part]["rows"]
        for y, row in enumerate(rows):
            entries = row["per_site"].values() if "per_site" in row else [row["test_auroc"]]
            for entry in entries:
                ax.errorbar(entry["value"], y, xerr=[[entry["value"] - entry["low"]], [entry["high"] - entry["value"]]],
                            fmt="o", color="#58a", capsize=2, alpha=0.7)  # fmt: skip
        ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        title = "CHASE_DB1, ε=8 per image: test Dice per site" if part == "chasedb1" else "PneumoniaMNIST, ε=8: AUROC"
        ax.set(title=title, xlabel="95% bootstrap interval")
        if part == "chasedb1":
            ax.axvline(0.6, color="#d62", linewidth=0.8, linestyle="--")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="PneumoniaMNIST only, 1 round, 400 images per site")
    parser.add_argument("--only", nargs="+", choices=["chasedb1", "pneumoniamnist", "speed"], default=None)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per speed measurement")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-dp-small-sites")
    parser.add_argument("--reuse", action="store_true", help="score the federations already in --out (same configs)")
    args = parser.parse_args(argv)
    parts = ["pneumoniamnist"] if args.quick else args.only or ["chasedb1", "pneumoniamnist", "speed"]
    target = results_path("dp_small_sites", args.quick)
    summary = json.loads(target.read_text()) if args.only and target.is_file() else {}
    summary |= {"benchmark": "dp_small_sites", "quick": args.quick, "machine": f"{os.cpu_count()} CPU cores"}
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if "chasedb1" in parts:
        summary["chasedb1"] = chasedb1(args.out, args.replicates, args.reuse)
    if "pneumoniamnist" in parts:
        summary["pneumoniamnist"] = pneumoniamnist(args.out, args.replicates, args.quick, args.reuse)
    if "speed" in parts:
        summary["speed"] = speed(args.steps)
    write_results(target, summary, lambda path: plot(summary, path))


if __name__ == "__main__":
    main()
