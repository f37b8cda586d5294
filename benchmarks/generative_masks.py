"""Do generated image/mask pairs help small segmentation sites? The lesion segmentation of
``configs/segmentation-synthetic.toml`` on three small synthetic hospitals (``--samples`` images
each, ``--size`` px), FedAvg in this process, trained twice on the same sites and seed:

- **none**: the real training images only;
- **generated**: with ``train.synthetic-augmentation = --ratio``: before round 1 each site trains
  the mask-conditioned diffusion generator (:class:`medfed.generative.MaskConditionalDiffusion`,
  ``--steps`` steps) on its own images and masks and adds ``--ratio`` generated pairs per training
  image (its own masks flipped or turned, with an image drawn for each).

Without ``--dp`` nothing is private: the generators are trained without DP (their images may
reproduce the site's). With ``--dp`` both arms run DP-SGD at ε = 8 per site (the generator's
ε 4 charged first in the generated arm). Score: test Dice per site and their mean, one run; and
whether the generated images follow their masks (``mask_contrast``: mean intensity inside the
lesion minus outside, generated vs real training images).

    .venv/bin/medfed bench generative-masks [--quick] [--dp] [--seed 0]

Writes benchmarks/results/generative_masks.json (``--quick``: generative_masks-quick.json; ``--dp``:
generative_masks_dp.json; ``--steps N`` other than 150: …_stepsN.json) and plots/…-samples.png:
generated images of the first site under their masks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.harness import bench_config, results_path, write_results
from medfed.config import Config
from medfed.federation import run_federation
from medfed.in_process import InProcessGrid

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STEPS = 150  # generator steps; other values write generative_masks_stepsN.json


def config(
    samples: int, size: int, rounds: int, local_steps: int, dp: bool, ratio: float, steps: int, seed: int
) -> Config:
    """The segmentation run of one arm (``ratio`` 0: no generated pairs). Without DP the U-Net's
    optimizer settings are the no-DP recipe's (the config's lr 0.6 is tuned for DP-SGD)."""
    recipe = {} if dp else {"train.lr": "auto", "train.momentum": "auto"}
    return bench_config(
        "segmentation-synthetic.toml",
        None,
        {
            "run.seed": seed,
            "run.rounds": rounds,
            "train.local-steps": local_steps,
            "data.samples-per-site": samples,
            "data.image-size": size,
            "train.batch-size": 16,
            "privacy.enabled": dp,
            "train.synthetic-augmentation": ratio,
            "train.synthetic-steps": steps,
            **recipe,
        },
    )


def run_arm(run_config: Config, out: Path) -> dict[str, Any]:
    """One federated run: test Dice per site, what the generators did, seconds."""
    started = time.perf_counter()
    grid = InProcessGrid({i: {"partition-id": i} for i in range(run_config.data.sites)}, run_id=1)
    report = run_federation(grid, run_config, out)
    per_site = {site: m["dice"] for site, m in report["final"]["per_site"].items()}
    return {
        "test_dice": per_site,
        "mean": float(np.mean(list(per_site.values()))),
        "epsilon": {site: p["epsilon"] for site, p in report["privacy"].items()},
        "synthetic": report["synthetic"],
        "seconds": time.perf_counter() - started,
    }


def mask_contrast(run_config: Config, out: Path) -> dict[str, dict[str, float]]:
    """Whether the generated images follow their masks: per site, the mean intensity inside the
    structure minus that outside, in its generated images and in its real training images."""
    from medfed.data import load_simulated_site

    contrast = {}
    for index, kept in enumerate(sorted(out.rglob("synthetic/*.npz"), key=lambda path: path.parent.parent.name)):
        with np.load(kept, allow_pickle=False) as pairs:
            generated, masks = pairs["images"][:, 0], pairs["labels"][:, 0]
        name, site = load_simulated_site(run_config, index)
        if kept.parent.parent.name != name:
            raise SystemExit(f"{kept}: expected the generated pairs of {name}")
        train = site.splits == "train"
        real, real_masks = site.images[train][:, 0], site.targets[train][:, 0]
        contrast[name] = {
            "generated": float(generated[masks > 0].mean() - generated[masks == 0].mean()),
            "real": float(real[real_masks > 0].mean() - real[real_masks == 0].mean()),
        }
    return contrast


def samples_figure(run_config: Config, out: Path, figure: Path) -> None:
    """Eight of the first site's generated pairs (kept in its state folder), spread over them (they
    are stored by mask group), as a grid."""
    from medfed.generative import save_pair_grid

    kept = sorted(out.rglob("synthetic/*.npz"))
    if not kept:
        return
    with np.load(kept[0], allow_pickle=False) as pairs:
        shown = np.linspace(0, len(pairs["images"]) - 1, 8).round().astype(int)
        masks, images = torch.as_tensor(pairs["labels"][shown]), torch.as_tensor(pairs["images"][shown])
    save_pair_grid(masks, images, figure, "generated pairs, first site", run_config.data.num_classes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 20 generator steps")
    parser.add_argument("--dp", action="store_true", help="DP-SGD at ε = 8 per site (generator ε 4)")
    parser.add_argument("--samples", type=int, default=40, help="images per site (70 %% of them for training)")
    parser.add_argument("--size", type=int, default=32, help="image size in px")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20, help="U-Net steps per site per round")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="generator training steps per site")
    parser.add_argument("--ratio", type=float, default=1.0, help="generated pairs per real training image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-generative-masks")
    args = parser.parse_args(argv)
    rounds, steps = (2, 20) if args.quick else (args.rounds, args.steps)
    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # what building a Message needs
    name = "generative_masks_dp" if args.dp else "generative_masks"
    path = results_path(name + (f"_steps{steps}" if steps != DEFAULT_STEPS and not args.quick else ""), args.quick)
    summary: dict[str, Any] = {
        "benchmark": name,
        "quick": args.quick,
        "dp": args.dp,
        "seed": args.seed,
        "samples_per_site": args.samples,
        "image_size": args.size,
        "rounds": rounds,
        "local_steps": args.local_steps,
        "generator_steps": steps,
        "ratio": args.ratio,
        "arms": {},
    }
    for arm, ratio in (("none", 0.0), ("generated", args.ratio)):
        run_config = config(args.samples, args.size, rounds, args.local_steps, args.dp, ratio, steps, args.seed)
        folder = args.out / f"{arm}-seed{args.seed}{'-dp' if args.dp else ''}"
        summary["arms"][arm] = result = run_arm(run_config, folder)
        print(f"{arm}: test Dice {result['mean']:.3f} {result['test_dice']} ({result['seconds']:.0f} s)")
        if ratio:
            result["mask_contrast"] = mask_contrast(run_config, folder)
            samples_figure(run_config, folder, path.parent / "plots" / f"{path.stem}-samples.png")
    write_results(path, summary)


if __name__ == "__main__":
    main()
