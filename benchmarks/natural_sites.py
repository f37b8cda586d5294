"""Three real hospitals: CHASE_DB1 (UK), STARE (USA) and HRF (Germany / Czech Republic), one site
each, as they came from their clinics, cameras and annotators.

1. **Cross-site protocol** (``medfed simulate configs/segmentation-retina-3sites.toml --protocol
   cross-site``): each site's local model, FedAvg over the three, FedAvg without each site (scored
   at the site it never saw) and the pooled model, every model scored at every site's test split
   (Dice per image, 95 % paired bootstrap intervals). Without DP (the config) and at ε = 8 per image
   (the config with the small-site DP recipe of ``configs/segmentation-chasedb1-dp.toml``, from
   the vessel-phantom public start: from random weights DP-SGD on 12-26 training photos learns nothing).
2. **Small private hospitals with a real public start**: for each dataset in turn, the other two are
   public data (``medfed pretrain --data``: their site folders, no DP) and the third is dealt to 3
   private sites trained under DP at ε = 8 per image, from the real public start, from the
   vessel-phantom start and from random weights; plus the public model untrained at the sites.

Every photo is cropped to its field of view and resized (``data.field-of-view = "crop"``): the
field of view spans ``data.image-size`` pixels at every site; Dice inside the field of view.

    .venv/bin/medfed bench natural_sites [--quick] [--only protocol protocol-dp ladder]

Writes benchmarks/results/natural_sites.json and plots/natural_sites.png (``--quick``: 256 px, 14
rounds, no ladder: natural_sites-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    save_json,
    write_results,
)
from medfed.config import Config, load_config
from medfed.data import write_site
from medfed.data.sites import load_simulated_site
from medfed.evaluation.bootstrap import bootstrap_scores, without_draws
from medfed.federation import initial_model
from medfed.pretrain import pretrain
from medfed.protocol import run_cross_site_protocol

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RETINA = REPO / "configs" / "segmentation-retina-3sites.toml"
DP_RECIPE = "segmentation-chasedb1-dp.toml"  # the small-site DP settings (rounds, steps, trainable, lr, views)
DATASETS: dict[str, dict[str, str]] = {
    "chasedb1": {"masks": "masks_1st", "patient-pattern": r"Image_(\d+)"},
    "hrf": {"fov-masks": "fov"},
    "stare": {},
}
# medfed pretrain's SGD (momentum 0.9) at the DP recipe's lr, as benchmarks/dp_small_sites.py builds its public model
PHANTOM = {"phantom": "vessels", "samples_per_site": 60, "epochs": 30, "lr": 0.3}
# two real datasets, 48-62 photos: ~600 steps of 8 patches, Adam (SGD 0.3 + momentum collapsed to background)
PUBLIC = {"epochs": 100, "optimizer": "adam"}
QUICK = {"data.image-size": 256, "data.patch-size": 64, "run.rounds": 14}  # 8 rounds: Dice < 0.1 everywhere


def retina(overrides: dict[str, Any] | None = None) -> Config:
    return load_config(RETINA, {"data.path": str(SHARED), "evaluation.example-images": 0} | (overrides or {}))


def private(config: Config, start: str) -> Config:
    """``config`` (three natural sites or one dataset dealt to three) with the small-site DP recipe."""
    recipe = bench_config(DP_RECIPE, None).train
    settings = {
        "privacy.enabled": True,
        "privacy.unit": "image",
        "privacy.target-epsilon": 8.0,
        "run.rounds": 5,
        "run.initial-model": start,
        "train.local-steps": recipe.local_steps,
        "train.trainable": recipe.trainable if start else "all",
        "train.optimizer": recipe.optimizer,
        "train.lr": recipe.lr,
        "train.momentum": recipe.momentum,
        "train.augmentations": recipe.augmentations,
    }
    return config.with_overrides(settings)


def phantom_start(config: Config, out: Path) -> Path:
    """The vessel-phantom public model for ``config``'s model and data settings (built once)."""
    path = out / "public" / "vessels.safetensors"
    if not path.is_file():
        pretrain(config, path, **PHANTOM)
    return path


def dealt(name: str, config: Config) -> Config:
    """One dataset alone, its patients dealt to 3 private sites (the field of view found in each photo)."""
    layout = DATASETS[name]
    return config.with_overrides({
        "data.site": {},
        "data.sites": 3,
        "data.path": str(SHARED / name),
        "data.masks": layout.get("masks", "masks"),
        "data.patient-pattern": layout.get("patient-pattern", ""),
    })  # fmt: skip


def public_start(third: str, config: Config, out: Path) -> tuple[Path, float]:
    """A model trained without DP on the two datasets other than ``third`` (their site folders)."""
    folders = out / f"public-without-{third}"
    shutil.rmtree(folders, ignore_errors=True)
    public = config.with_overrides({"data.site": {k: v for k, v in DATASETS.items() if k != third}})
    for index in range(public.data.sites):
        name, site = load_simulated_site(public, index)
        write_site(folders / name, site)
    started = time.perf_counter()
    path = pretrain(public, out / f"public-without-{third}.safetensors", folders, **PUBLIC)
    return path, time.perf_counter() - started


def _scores(config: Config, model: torch.nn.Module, sites: dict[str, Any], replicates: int) -> dict[str, Any]:
    scores = without_draws(bootstrap_scores(config, model, sites, replicates))
    scores["worst"] = min(s["value"] for s in scores["per_site"].values())
    return scores


def ladder(out: Path, replicates: int) -> dict[str, Any]:
    """For each dataset as the private one: Dice per private site of each start under DP."""
    base = retina()
    phantom = phantom_start(base, out)
    results = {}
    for third in DATASETS:
        private_sites = dealt(third, base)
        sites = dict(load_simulated_site(private_sites, i) for i in range(3))
        public, seconds = public_start(third, base, out)
        rows = {"public model, untrained at the sites": _scores(
            private_sites, initial_model(private(private_sites, str(public))), sites, replicates)}  # fmt: skip
        for label, start in (("real public start", public), ("phantom start", phantom), ("no public start", "")):
            config = private(private_sites, str(start))
            model, report = federated_model(config, out / f"ladder-{third}-{label.split()[0]}")
            rows[label] = _scores(config, model, sites, replicates)
            rows[label]["epsilon"] = {s: p["epsilon"] for s, p in report["privacy"].items()}
            print(f"{third} private, {label}: worst-site Dice {rows[label]['worst']:.3f}", flush=True)
        results[third] = {"public_pretrain_seconds": seconds, "rows": rows}
    return results


def plot(summary: dict[str, Any], path: Path) -> None:
    parts = [p for p in ("protocol", "protocol-dp") if p in summary]
    columns = len(parts) + ("ladder" in summary)
    fig, axes = pyplot().subplots(1, max(columns, 1), figsize=(5.5 * max(columns, 1), 4.2), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=False):
        report = summary[part]
        rows = [*report["models"], "without the site"]
        values = [[cell["value"] for cell in row] for row in report["matrix"]]
        values.append([report["leave_one_site_out"][s]["value"] for s in report["sites"]])
        image = ax.imshow(values, vmin=0, vmax=0.85, cmap="viridis")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(report["sites"])), report["sites"], fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set(title=f"test Dice, {'ε = 8 per image' if part.endswith('dp') else 'no DP'}", xlabel="tested at")
        fig.colorbar(image, ax=ax, fraction=0.046)
    if "ladder" in summary:
        ax = axes[0][columns - 1]
        labels = list(next(iter(summary["ladder"].values()))["rows"])
        for k, (third, result) in enumerate(summary["ladder"].items()):
            worst = [result["rows"][label]["worst"] for label in labels]
            ax.barh([i + 0.25 * k for i in range(len(labels))], worst, height=0.25, label=f"{third} private")
        ax.set_yticks([i + 0.25 for i in range(len(labels))], labels, fontsize=8)
        ax.axvline(0.7, color="#d62", linewidth=0.8, linestyle="--")
        ax.set(title="ε = 8 per image: worst private site", xlabel="test Dice", xlim=(0, 0.85))
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px, 14 rounds, protocol without DP only")
    parser.add_argument("--only", nargs="+", choices=["protocol", "protocol-dp", "ladder"], default=None)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-natural-sites")
    args = parser.parse_args(argv)
    if not (SHARED / "hrf").is_dir():
        raise SystemExit(f"data not found at {SHARED} (CHASE_DB1, STARE and HRF in ../shared/data beside the repo)")
    parts = ["protocol"] if args.quick else args.only or ["protocol", "protocol-dp", "ladder"]
    target = results_path("natural_sites", args.quick)
    summary = json.loads(target.read_text()) if args.only and target.is_file() else {}
    summary |= {"benchmark": "natural_sites", "quick": args.quick, "machine": f"{os.cpu_count()} CPU cores"}
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    scale = QUICK if args.quick else {}
    for part in parts:
        started = time.perf_counter()
        if part == "protocol":
            summary[part] = run_cross_site_protocol(retina(scale), args.out / part, args.replicates)
        elif part == "protocol-dp":
            start = phantom_start(retina(scale), args.out)
            summary[part] = run_cross_site_protocol(
                private(retina(scale), str(start)), args.out / part, args.replicates
            )
        else:
            summary[part] = ladder(args.out, args.replicates)
        summary[f"{part}_seconds"] = time.perf_counter() - started
        if args.only and target.is_file():  # parts another run (--only) wrote meanwhile are kept
            summary = json.loads(target.read_text()) | summary
        save_json(target, summary)  # each part as soon as it is done
        print(f"{part}: {summary[f'{part}_seconds']:.0f} s", flush=True)
    write_results(target, summary, lambda path: plot(summary, path))


if __name__ == "__main__":
    main()
