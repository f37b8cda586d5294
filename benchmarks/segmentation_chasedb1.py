"""CHASE_DB1 retinal vessels at 3 hospitals: pooled vs FedAvg Dice, without and with DP, against
the second human observer.

- **Human reference**: the second observer's masks scored against the first observer's (the
  training reference), on every site's test images, at the model's resolution and at full size.
- **FedAvg**: ``medfed simulate configs/segmentation-chasedb1.toml`` (3 sites, children dealt in
  name order), with ``privacy.enabled`` false and true; the global model's Dice on each site's
  test split, and each local-only model's (the diagonal of the cross-site matrix).
- **Pooled**: one model trained on the union of the three sites' training images for the same
  number of steps as a site trains in FedAvg (rounds x local-steps), same batch size, and the same
  privacy unit (the child) and ε when DP is on; scored on the same test images.

    .venv/bin/python benchmarks/segmentation_chasedb1.py [--rounds N] [--out DIR]

Writes benchmarks/results/segmentation_chasedb1.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from medfed.config import Config, load_config
from medfed.data import PrivacyUnitDataset, SiteArrays
from medfed.data.manifest import load_mask
from medfed.data.pairs import assign_splits, deal_to_sites, find_pairs
from medfed.data.sites import load_simulated_site
from medfed.privacy import default_delta, make_private
from medfed.simulation import simulate
from medfed.tasks import get_task
from medfed.training import build_optimizer, evaluate, train

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "segmentation-chasedb1.toml"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def second_observer(config: Config) -> dict[str, float]:
    """Dice of observer 2 against observer 1 on the test images of every site (model size and full size)."""
    root = Path(config.data.path)
    pairs_1st = deal_to_sites(find_pairs(root / "images", root / "masks_1st", config.data.patient_pattern), 3)
    at_size, full = [], []
    for index, site in enumerate(pairs_1st):
        for pair, split in zip(site, assign_splits(site, config.run.seed + index), strict=True):
            if split != "test":
                continue
            second = root / "masks_2nd" / pair.mask.name.replace("_1stHO", "_2ndHO")
            size = config.data.image_size
            at_size.append(_dice(load_mask(second, size, 2)[0], load_mask(pair.mask, size, 2)[0]))
            native = load_mask(pair.mask, 960, 2)[0]  # nearest-neighbour at about native size
            full.append(_dice(load_mask(second, 960, 2)[0], native))
    return {"dice_at_model_size": float(np.mean(at_size)), "dice_full_size": float(np.mean(full)), "images": len(full)}


def pooled(config: Config, sites: list[SiteArrays], private: bool) -> dict[str, float]:
    """Train one model on all sites' training images; Dice on each site's test split."""
    task = get_task(config.run.task)
    union = SiteArrays(
        np.concatenate([s.images for s in sites]),
        np.concatenate([s.targets for s in sites]),
        np.concatenate([s.splits for s in sites]),
        np.concatenate([s.patient_ids for s in sites]),
        "mask",
        np.concatenate([s.spacing for s in sites]),
    )
    torch.manual_seed(config.run.seed)
    model = task.build_model(config)
    unit, units = union.privacy_units("train")
    data = PrivacyUnitDataset(union.split("train"), units, task.train_transform(config))
    loader = DataLoader(data, batch_size=min(config.train.batch_size, len(data)), shuffle=True)
    optimizer = build_optimizer(model, config.train)
    steps = config.run.rounds * config.train.local_steps
    sigma = None
    if private:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=config.privacy.target_epsilon,
            target_delta=default_delta(len(data)),
            sample_rate=1 / len(loader),
            steps=steps,
            accountant="rdp",
        )
        model, optimizer, loader = make_private(model, optimizer, loader, sigma, config.privacy.max_grad_norm)
    started = time.perf_counter()
    train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=steps)
    seconds = time.perf_counter() - started
    model = getattr(model, "_module", model)
    per_site = {
        f"site-{i + 1}": evaluate(task, model, s.split("test"), config, torch.device("cpu"))["dice"]
        for i, s in enumerate(sites)
    }
    return {"per_site": per_site, "mean": float(np.mean(list(per_site.values()))), "units": len(data),
            "unit": unit, "noise_multiplier": sigma, "seconds": seconds}  # fmt: skip


def fedavg(config: Config, out: Path) -> dict[str, object]:
    started = time.perf_counter()
    report = simulate(config, out)
    per_site = {s: m["dice"] for s, m in report["final"]["per_site"].items()}
    cross = report["final"].get("cross_site") or {}
    local = {
        m: row[cross["sites"].index(m)] for m, row in zip(cross.get("models", []), cross.get("matrix", []), strict=True)
        if m != "global"
    }  # fmt: skip
    privacy = report["privacy"]
    return {
        "per_site": per_site,
        "mean": float(np.mean(list(per_site.values()))),
        "local_only_on_own_test": local,
        "local_only_mean": float(np.mean(list(local.values()))) if local else None,
        "epsilon": {s: p["epsilon"] for s, p in privacy.items()},
        "unit": {s: p.get("unit") for s, p in privacy.items()},
        "noise_multiplier": {s: p["noise_multiplier"] for s, p in privacy.items()},
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="override run.rounds (0: the config's)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-chasedb1")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "chasedb1")
    args = parser.parse_args()
    overrides = {"data.path": str(args.data.resolve()), "evaluation.example-images": 0}
    if args.rounds:
        overrides["run.rounds"] = args.rounds
    base = load_config(CONFIG, overrides)
    sites = [load_simulated_site(base, i)[1] for i in range(base.data.sites)]
    summary: dict[str, object] = {"benchmark": "segmentation-chasedb1", "config": base.to_public_dict()}
    summary["second_observer"] = second_observer(base)
    print("second observer vs first:", summary["second_observer"], flush=True)
    for private in (False, True):
        config = base.with_overrides({"privacy.enabled": private})
        tag = "dp" if private else "nodp"
        summary[f"pooled_{tag}"] = pooled(config, sites, private)
        print(f"pooled {tag}:", summary[f"pooled_{tag}"], flush=True)
        summary[f"fedavg_{tag}"] = fedavg(config, args.out / f"fedavg-{tag}")
        print(f"fedavg {tag}:", summary[f"fedavg_{tag}"], flush=True)
    target = REPO / "benchmarks" / "results" / "segmentation_chasedb1.json"
    target.write_text(json.dumps(summary, indent=1, default=float))
    print(f"written {target}")


if __name__ == "__main__":
    main()
