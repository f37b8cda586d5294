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

    .venv/bin/medfed bench segmentation_chasedb1 [--rounds N] [--out DIR]

Writes benchmarks/results/segmentation_chasedb1.json and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.harness import fedavg, pooled, results_path, write_results
from medfed.config import Config, load_config
from medfed.data.decode import load_mask
from medfed.data.pairs import deal_to_sites, find_pairs
from medfed.data.partition import assign_splits
from medfed.data.sites import load_simulated_site

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="override run.rounds (0: the config's)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-chasedb1")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "chasedb1")
    args = parser.parse_args(argv)
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
    write_results(results_path("segmentation_chasedb1"), summary)


if __name__ == "__main__":
    main()
