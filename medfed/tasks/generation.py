"""Class-conditional image generation: a small diffusion model (:mod:`medfed.generative`) learns to
denoise a site's images given their class, so that it can later draw new images of a class the
site has few of. Trained by the one train loop, federated by FedAvg, with DP-SGD at the sites
like any task: a federated generator trained under DP may share its samples across sites.

Samples: ``{"image": (C, H, W) float in [0, 1], "label": long}`` (class labels, as classification).
Training calls :func:`forward` (the image with its class);

``model.name = "ddpm-mask"`` is the mask-conditional generator of 2D segmentation: it learns an
image given its label mask, from a segmentation site's samples ``{"image", "mask": (1, H, W)}``
(whole images, or one random ``data.patch-size`` patch per image per step: the network is fully
convolutional and draws whole images all the same). It is trained at a site, for
``train.synthetic-augmentation`` of a segmentation run or by ``medfed generate``; it has no
federated evaluation (the scores below need the class labels). :func:`infer` scores an image under
every class, ``(B, num_classes)`` denoising errors at fixed noise. Metrics: ``denoising-error``
(the primary metric, lower is better: the error given the true class, mean over images) and
``class-fit`` (the share of images whose own class gives the lowest error: whether the
conditioning carries the class).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.config import Config, require
from medfed.data.arrays import SiteArrays
from medfed.models.zoo import build_network
from medfed.tasks.classification import synthetic_site as _classification_site

__all__ = [
    "NAME",
    "PRIMARY_METRIC",
    "PRIMARY_METRIC_PER_IMAGE",
    "SAMPLE_KEYS",
    "SPATIAL_DIMS",
    "TARGET",
    "GenerationMetrics",
    "build_model",
    "check_config",
    "decode",
    "forward",
    "infer",
    "loss",
    "metrics",
    "operating_point",
    "pooled_metrics",
    "round_figures",
    "synthetic_site",
    "train_transform",
]

NAME = "generation"
PRIMARY_METRIC = "denoising-error"
PRIMARY_METRIC_PER_IMAGE = True  # a mean of per-image errors
TARGET = "label"
SAMPLE_KEYS = ("image", TARGET)
SPATIAL_DIMS = (2,)
Sample = dict[str, torch.Tensor]


def check_config(config: Config) -> None:
    """What the generator needs: classes to condition on, images as they are (no augmentation, one
    view), channels that ``model.norm-groups`` divides, and class labels to read."""
    data, model = config.data, config.model
    require(data.num_classes >= 1, "data.num-classes", data.num_classes, "an integer >= 1")
    if model.name == "ddpm-mask":
        require(data.source not in ("voc", "heart-uci"), "data.source", data.source,
                "'synthetic', 'sites' or 'pairs' (images with label masks) for model.name = 'ddpm-mask'")  # fmt: skip
        require(data.patch_size % 2 == 0, "data.patch-size", data.patch_size,
                "an even number for model.name = 'ddpm-mask' (the generator halves the image)")  # fmt: skip
    else:
        require(data.source not in ("pairs", "voc", "heart-uci"), "data.source", data.source,
                "'synthetic', 'medmnist' or 'sites' (images with class labels) for run.task = 'generation'")  # fmt: skip
    require(not config.train.augment, "train.augment", True, "false for run.task = 'generation'")
    require(config.train.augmentations == 1, "train.augmentations", config.train.augmentations,
            "1 for run.task = 'generation'")  # fmt: skip
    require(model.width % model.norm_groups == 0, "model.width", model.width,
            f"a multiple of model.norm-groups = {model.norm_groups} for run.task = 'generation'")  # fmt: skip
    require(not config.train.logit_adjust, "train.logit-adjust", True, "false for run.task = 'generation'")


def build_model(config: Config) -> nn.Module:
    """The ``model.name`` generator (``ddpm``: :class:`medfed.generative.ConditionalDiffusion`)."""
    return build_network(NAME, config)


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the train loop computes on a batch: each image's denoising error given its class, or
    given its mask for a segmentation site's samples ``(B,)``."""
    return model(batch["image"], batch["mask"] if "mask" in batch else batch["label"])


def loss(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean denoising error: of :func:`forward`'s ``(B,)``, or of :func:`infer`'s ``(B, K)`` at each
    image's own class. Each term depends on its own image only, as DP requires."""
    if outputs.dim() == 2:
        outputs = outputs.gather(1, batch["label"].long().view(-1, 1))[:, 0]
    return outputs.mean()


@torch.no_grad()
def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Each image's denoising error under every class ``(B, num_classes)`` (at fixed noise in eval mode)."""
    return model(images)


def decode(outputs: torch.Tensor, config: Config | None = None) -> torch.Tensor:
    """The errors as they are: scores, not class calls."""
    return outputs


def train_transform(config: Config) -> Callable[[Sample], Sample] | None:
    """Images are learnt as they are; the mask-conditional generator with ``data.patch-size`` > 0
    learns one random patch per image per step (segmentation's patches, half centred on foreground)."""
    if config.model.name == "ddpm-mask" and config.data.patch_size:
        from medfed.tasks.segmentation import train_transform as random_patch

        return random_patch(config)
    return None


class GenerationMetrics:
    """Mean denoising error at the true class, and the share of images it fits best."""

    def __init__(self) -> None:
        self.own: list[np.ndarray] = []
        self.best: list[np.ndarray] = []

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["label"].long().view(-1, 1).to(predictions.device)
        self.own.append(predictions.gather(1, labels)[:, 0].cpu().numpy())
        self.best.append((predictions.argmin(dim=1) == labels[:, 0]).cpu().numpy())

    def compute(self) -> dict[str, float]:
        if not self.own:
            return {PRIMARY_METRIC: float("nan"), "class-fit": float("nan")}
        return {PRIMARY_METRIC: float(np.concatenate(self.own).mean()),
                "class-fit": float(np.concatenate(self.best).mean())}  # fmt: skip


def metrics(config: Config) -> GenerationMetrics:
    return GenerationMetrics()


def operating_point(val_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """A generator has no operating threshold."""
    return {}


def pooled_metrics(test_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
    """Nothing pooled beyond the per-site means."""
    return {}


def round_figures(config: Config, run_dir: Path) -> dict[str, str]:
    """A grid of the global generator's samples after each round (:func:`medfed.generative.round_grids`),
    for the report of a simulation."""
    from medfed.generative import round_grids

    return round_grids(config, run_dir)


def synthetic_site(
    index: int, samples: int, image_size: int, num_classes: int, seed: int, spatial_dims: int = 2
) -> SiteArrays:
    """The synthetic hospital of classification: images with a class each."""
    return _classification_site(index, samples, image_size, num_classes, seed, spatial_dims)
