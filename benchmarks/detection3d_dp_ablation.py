"""One hospital of the 3D nodule benchmark trained alone with DP-SGD (ε = 8): what the recipe needs.

Each trial trains site-1's training scans of ``configs/detection-synthetic3d.toml`` (with the
trial's ``--set`` overrides) outside the federation for the budget a site spends in it, with noise
calibrated for ε = ``privacy.target-epsilon``, and scores the model on site-1's test scans (CPM,
metric ``froc``). A single site gets no averaging over sites, so its CPM is a pessimistic proxy of
the federation's.

    python -m benchmarks.detection3d_dp_ablation --name NAME --set train.batch-size=32 [--set ...] [--no-dp]

Appends each trial (overrides, steps, σ, CPM, seconds) to benchmarks/results/detection3d_dp_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from medfed.central import train_central
from medfed.config import load_config, parse_override
from medfed.data.sites import load_simulated_site
from medfed.tasks import get_task
from medfed.training import evaluate

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "detection-synthetic3d.toml"
RESULTS = REPO / "benchmarks" / "results" / "detection3d_dp_ablation.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the trial's name in the results file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--no-dp", action="store_true", help="train without DP")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(parse_override(text) for text in args.overrides)
    private = not args.no_dp
    config = load_config(CONFIG, {**overrides, "privacy.enabled": private})
    started = time.perf_counter()
    _, site = load_simulated_site(config, 0)
    model, info = train_central(config, [site], private)
    scores = evaluate(get_task(config.run.task), model, site.split("test"), config, torch.device("cpu"))
    trial = {
        "overrides": overrides,
        "dp": private,
        "optimizer": config.train.optimizer,
        "lr": config.train.lr,
        "batch_size": config.train.batch_size,
        "train_scans": info["units"],
        "steps": info["steps"],
        "noise_multiplier": info["noise_multiplier"],
        "epsilon": info["epsilon"],
        "cpm": scores["froc"],
        "map50": scores["map50"],
        "seconds": time.perf_counter() - started,
    }
    print(args.name, json.dumps(trial), flush=True)
    trials = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    trials[args.name] = trial
    RESULTS.write_text(json.dumps(trials, indent=1) + "\n")


if __name__ == "__main__":
    main()
