"""A hand-written FedAvg reference for configs/segmentation-retina-3sites.toml: torch + MONAI only.

What a careful researcher writes without medfed, to check that medfed's shipped config trains a
model at least as good. Only the DATA comes from medfed (``load_simulated_site``), so both see the
same 512 px FOV-cropped colour photos, masks (-1 outside the field of view) and patient-level
splits. Everything else is this file's own: a MONAI UNet (width 16, depth 4, GroupNorm), random
patches (half centred on vessels, half on background inside the FOV) with flips and 90-degree rotations, Dice + cross-entropy inside
the FOV, Adam, FedAvg by averaging state dicts in-process (weighted by training images), and
Gaussian sliding-window inference. Score: test Dice of the vessel class inside the FOV per image,
mean over a site's test images (medfed's definition: pixels outside the FOV count as background
in both prediction and truth).

    .venv/bin/medfed bench reference-retina-fedavg [--rounds 25] [--steps 20] [--patch 96]
        [--lr 2e-3] [--cosine] [--local] [--tag default]

Adds the run under ``--tag`` to benchmarks/results/reference_retina_fedavg.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import MaskedDiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d
from monai.transforms.utils import map_binary_to_indices
from monai.utils import set_determinism
from torch import nn

from benchmarks.harness import results_path, save_json
from medfed.config import load_config
from medfed.data.arrays import SiteArrays
from medfed.data.sites import load_simulated_site

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "segmentation-retina-3sites.toml"
RESULTS = results_path("reference_retina_fedavg")
OUTSIDE = -1  # medfed's label for pixels outside the field of view


def build_unet() -> nn.Module:
    """MONAI UNet, 3 colour channels in, 2 classes out, 16-32-64-128 channels, GroupNorm(4)."""
    return UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=0, norm=("group", {"num_groups": 4}))  # fmt: skip


class Site:
    """One hospital: its train/val/test images and masks as tensors, and a patch sampler for training."""

    def __init__(self, name: str, arrays: SiteArrays, patch: int) -> None:
        self.name = name
        split = {s: arrays.splits == s for s in ("train", "val", "test")}
        self.images = {s: torch.from_numpy(arrays.images[k]) for s, k in split.items()}
        self.masks = {s: torch.from_numpy(arrays.targets[k]).long() for s, k in split.items()}
        # Patch centres: vessel pixels or background inside the FOV, 1:1. MONAI's own fg/bg split would
        # count the -1 outside the FOV as foreground, so the indices are given.
        self.centres = [map_binary_to_indices(m == 1, m >= 0) for m in self.masks["train"]]
        keys = ["image", "mask"]
        self.augment = Compose([
            RandCropByPosNegLabeld(keys, label_key="mask", spatial_size=(patch, patch), pos=1, neg=1, num_samples=1,
                                   fg_indices_key="fg", bg_indices_key="bg"),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.75, max_k=3),
        ])  # fmt: skip

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` random training images (without replacement when there are enough), one patch each."""
        count = len(self.images["train"])
        picks = torch.randperm(count, generator=generator)[:size] if size <= count else torch.randint(count, (size,))
        samples = [self.augment(self._sample(int(i)))[0] for i in picks]
        images = torch.stack([torch.as_tensor(s["image"]).as_subclass(torch.Tensor) for s in samples])
        masks = torch.stack([torch.as_tensor(s["mask"]).as_subclass(torch.Tensor) for s in samples]).long()
        return images, masks

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        fg, bg = self.centres[index]
        return {"image": self.images["train"][index], "mask": self.masks["train"][index], "fg": fg, "bg": bg}


_DICE = MaskedDiceLoss(to_onehot_y=True, softmax=True)


def fov_dice_ce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy over the pixels inside the field of view only."""
    inside = (mask != OUTSIDE).float()
    target = mask.clamp(min=0)
    cross_entropy = nn.functional.cross_entropy(logits, mask[:, 0], ignore_index=OUTSIDE)
    return _DICE(logits, target, mask=inside) + cross_entropy


def train_locally(model: nn.Module, site: Site, args: argparse.Namespace, lr: float, gen: torch.Generator) -> None:
    """``args.steps`` Adam steps on ``site``'s patches (a fresh optimizer each round, as FedAvg clients do)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(args.steps):
        images, masks = site.batch(args.batch, gen)
        optimizer.zero_grad()
        fov_dice_ce(model(images), masks).backward()
        optimizer.step()


def average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the weighted mean of the sites' state dicts."""
    total = sum(weights)
    return {key: sum(w / total * s[key].float() for s, w in zip(states, weights, strict=True)) for key in states[0]}


def round_lr(args: argparse.Namespace, round_index: int) -> float:
    """Constant, or cosine from ``args.lr`` to 0 over the rounds (``--cosine``)."""
    return args.lr * 0.5 * (1 + math.cos(math.pi * round_index / args.rounds)) if args.cosine else args.lr


@torch.no_grad()
def test_dice(model: nn.Module, site: Site, patch: int, split: str = "test") -> float:
    """Mean over ``split``'s images of the vessel Dice inside the FOV (outside: background in both)."""
    model.eval()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    for image, mask in zip(site.images[split], site.masks[split], strict=True):
        logits = sliding_window_inference(image[None], (patch, patch), sw_batch_size=16, predictor=model,
                                          overlap=0.25, mode="gaussian")  # fmt: skip
        outside = mask[None] == OUTSIDE
        prediction = logits.argmax(dim=1, keepdim=True).masked_fill(outside, 0)
        metric(one_hot(prediction, 2), one_hot(mask[None].masked_fill(outside, 0), 2))
    return float(np.nanmean(metric.get_buffer().numpy()))


def fedavg(sites: list[Site], args: argparse.Namespace) -> nn.Module:
    """``args.rounds`` rounds: every site trains a copy of the global model, the server averages them."""
    torch.manual_seed(args.seed)
    global_model = build_unet()
    gens = [torch.Generator().manual_seed(args.seed + 1 + i) for i in range(len(sites))]
    weights = [float(len(site.images["train"])) for site in sites]
    for r in range(args.rounds):
        states = []
        for site, gen in zip(sites, gens, strict=True):
            local = copy.deepcopy(global_model)
            train_locally(local, site, args, round_lr(args, r), gen)
            states.append(local.state_dict())
        global_model.load_state_dict(average(states, weights))
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - START:.0f} s)", flush=True)
    return global_model


def local_only(site: Site, index: int, args: argparse.Namespace) -> nn.Module:
    """The site alone, for the same steps as it trains in FedAvg (rounds x steps, the same lr schedule)."""
    torch.manual_seed(args.seed)
    model = build_unet()
    gen = torch.Generator().manual_seed(args.seed + 1 + index)
    for r in range(args.rounds):
        train_locally(model, site, args, round_lr(args, r), gen)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=20, help="local steps per round per site")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=96, help="training patch and inference window (px)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cosine", action="store_true", help="cosine lr over the rounds (default: constant)")
    parser.add_argument("--local", action="store_true", help="also train and score each site alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the three datasets' folder")
    parser.add_argument("--tag", default="default", help="key of this run in the results file")
    args = parser.parse_args(argv)
    set_determinism(seed=args.seed)
    config = load_config(CONFIG, {"data.path": str(args.data)})
    sites = [Site(*load_simulated_site(config, i), args.patch) for i in range(3)]
    print(f"data loaded ({time.perf_counter() - START:.0f} s); training from here", flush=True)
    started = time.perf_counter()
    model = fedavg(sites, args)
    run = {"settings": vars(args) | {"data": str(args.data)}, "fedavg": {}, "fedavg_val": {}}
    for site in sites:
        run["fedavg"][site.name] = test_dice(model, site, args.patch)
        run["fedavg_val"][site.name] = test_dice(model, site, args.patch, "val")
    if args.local:
        run["local"] = {s.name: test_dice(local_only(s, i, args), s, args.patch) for i, s in enumerate(sites)}
    run["wall_seconds"] = time.perf_counter() - started
    print(f"\ntest Dice (vessels, inside the FOV), {args.rounds} rounds x {args.steps} steps x batch {args.batch}, "
          f"patch {args.patch}, lr {args.lr} {'cosine' if args.cosine else 'constant'}, {run['wall_seconds']:.0f} s")  # fmt: skip
    print(f"{'site':<10} {'fedavg':>7}" + (f" {'local':>7}" if args.local else ""))
    for site in sites:
        local = f" {run['local'][site.name]:>7.3f}" if args.local else ""
        print(f"{site.name:<10} {run['fedavg'][site.name]:>7.3f}{local}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.tag] = run
    save_json(RESULTS, results)
    print(f"written {RESULTS} [{args.tag}]")


START = time.perf_counter()

if __name__ == "__main__":
    main()
