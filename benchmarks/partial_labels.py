"""Sites with different label sets: what the marginal loss buys when one site labels only one of
two structures.

3 synthetic hospitals (``medfed data synth`` kind: scanner shift, prevalence, voxel size),
segmentation of 2 structures (lesion classes 1 and 2, background 0), a GroupNorm U-Net, FedAvg.
``site-3`` outlines structure 1 only: its structure-2 lesions are painted as background. Two
ways to train on that:

- ``plain``: site-3 has no label map, so it claims to label both structures and its loss teaches
  structure 2 as background (what a federation without label maps does);
- ``marginal``: site-3's ``label-map.toml`` names background and structure 1 only, so it trains
  with the marginal loss (``medfed.tasks.segmentation.marginal_loss``) and is scored on
  structure 1 only.

Each without DP and with DP-SGD at ε = 8 per site. Score: the final global model's test Dice
per structure at each site (n/a where the site does not label the structure), and at site-3 on
its hidden full labels (the researcher holds them: the synthetic generator's masks before the
structure was dropped), where ``plain`` should miss structure 2 and ``marginal`` should not.

    .venv/bin/medfed bench partial_labels [--quick]

Writes benchmarks/results/partial_labels.json and plots/partial_labels.png (``--quick``: 40
images of 16 px per site, 1 round: partial_labels-quick.json).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import pyplot, results_path, save_figure, save_json, write_results
from medfed.config import Config
from medfed.data import write_site
from medfed.data.label_map import LABEL_MAP
from medfed.data.synthetic import drop_classes, synthetic_segmentation_site
from medfed.protocol import global_model
from medfed.simulation import simulate
from medfed.tasks import segmentation
from medfed.training import evaluate

REPO = Path(__file__).resolve().parent.parent
SITES, PARTIAL, DROPPED = 3, "site-3", 2  # site-3 does not label structure 2


def write_sites(root: Path, samples: int, size: int, seed: int, label_map: bool) -> dict[str, Any]:
    """The 3 site folders under ``root``; site-3 with structure 2 painted as background, with or
    without its label map. Returns site-3's full data (its hidden labels)."""
    shutil.rmtree(root, ignore_errors=True)
    hidden = None
    for index in range(SITES):
        name = f"site-{index + 1}"
        site = synthetic_segmentation_site(index, samples, size, 3, seed)
        if name == PARTIAL:
            hidden = site
            site = drop_classes(site, [DROPPED], 3)
        folder = write_site(root / name, site)
        if name == PARTIAL and not label_map:
            (folder / LABEL_MAP).unlink()
    return {"site": hidden}


def federation(data: Path, size: int, rounds: int, private: bool) -> Config:
    """The 3-site segmentation federation on the site folders at ``data``."""
    return Config().with_overrides(
        {
            "run.task": "segmentation",
            "run.rounds": rounds,
            "data.source": "sites",
            "data.partitioner": "natural",
            "data.path": str(data),
            "data.num-classes": 3,
            "data.image-size": size,
            "model.width": 8,
            "model.depth": 2,
            "model.input-norm": True,
            "train.lr": 0.6,
            "train.momentum": 0.5,
            "train.local-epochs": 2,
            "train.batch-size": 16,
            "privacy.enabled": private,
            "privacy.target-epsilon": 8.0,
            "privacy.max-grad-norm": 1.0,
            "evaluation.cross-site": False,
            "evaluation.example-images": 0,
        }
    )


def measure(label: str, config: Config, out: Path, hidden: Any) -> dict[str, Any]:
    """One federation: Dice per structure per site (test split), and at site-3 on its hidden labels."""
    started = time.perf_counter()
    report = simulate(config, out)
    per_site = {
        site: {f"structure {k}": _finite(m.get(f"dice_class_{k}")) for k in (1, 2)}
        for site, m in report["final"]["per_site"].items()
    }
    model = global_model(config, out)
    full = evaluate(segmentation, model, hidden.split("test"), config, torch.device("cpu"))
    result = {
        "label": label,
        "dice_per_site": per_site,
        "classes_labelled": {
            site: [k for k in range(3) if m.get(f"labelled_class_{k}", 1.0) == 1.0]
            for site, m in report["final"]["per_site"].items()
        },
        "dice_site3_hidden_labels": {f"structure {k}": _finite(full[f"dice_class_{k}"]) for k in (1, 2)},
        "epsilon": {s: p["epsilon"] for s, p in report["privacy"].items()},
        "seconds": time.perf_counter() - started,
    }
    print(f"{label}: Dice per site {per_site}; site-3 on its hidden labels {result['dice_site3_hidden_labels']}",
          flush=True)  # fmt: skip
    return result


def _finite(value: float | None) -> float | None:
    """``value``, or None (n/a) when it is missing or not finite."""
    return float(value) if value is not None and np.isfinite(value) else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 images of 16 px per site, 1 round")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-partial-labels")
    args = parser.parse_args(argv)
    samples, size, rounds = (40, 16, 1) if args.quick else (200, 32, 5)
    path = results_path("partial_labels", args.quick)
    summary: dict[str, Any] = {
        "benchmark": "partial_labels",
        "quick": args.quick,
        "machine": "2 CPU cores",
        "sites": SITES,
        "partial_site": PARTIAL,
        "unlabelled_structure": DROPPED,
        "samples_per_site": samples,
        "image_size": size,
        "rounds": rounds,
        "runs": [],
    }
    for private in (False, True):
        for loss, label_map in (("plain", False), ("marginal", True)):
            label = f"{loss}, {'DP ε 8' if private else 'no DP'}"
            data = args.out / f"data-{loss}"
            hidden = write_sites(data, samples, size, 0, label_map)["site"]
            config = federation(data, size, rounds, private)
            run = measure(label, config, args.out / f"run-{loss}-{'dp' if private else 'nodp'}", hidden)
            summary["runs"].append(run)
            save_json(path, summary)  # partial results survive an interrupted run

    def plot(figure: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        labels = [run["label"] for run in summary["runs"]]
        x = np.arange(len(labels))
        for offset, key in ((-0.2, "structure 1"), (0.2, "structure 2")):
            values = [run["dice_site3_hidden_labels"][key] or 0.0 for run in summary["runs"]]
            ax.bar(x + offset, values, width=0.4, label=key)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"test Dice at {PARTIAL}, full labels")
        ax.set_title(f"{PARTIAL} labels structure 1 only: plain vs marginal loss")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        save_figure(fig, figure)

    write_results(path, summary, plot)


if __name__ == "__main__":
    main()
