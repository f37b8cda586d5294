"""Tabular classification: one row of clinical features per patient (e.g. heart disease, UCI).

Samples: ``{"image": (1, 1, F) float, "label": long}``: a patient's ``data.features`` as a 1 x F
grid, so that the loaders, the privacy accounting and the train loop take rows as they take
images. Predictions, metrics and the operating point are those of image classification
(:mod:`medfed.tasks.classification`: AUROC, the threshold by Youden's J on the sites' validation
splits, sensitivity, specificity, ECE), imported, not copied.

What is fitted where (see :mod:`medfed.data.tabular`): each site imputes missing values with the
medians of its own train split and standardises every feature with its own train split's mean
and SD, and adds a missing indicator per feature, when it reads its folder; val and test rows never shape them, nothing of them leaves the
site, and there is no pooled fit. The model (``mlp``, or ``logistic``) has no normalisation layer,
so DP-SGD's per-sample clipping applies as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from medfed.config import Config, require
from medfed.data.arrays import SiteArrays
from medfed.data.heart_uci import FEATURES
from medfed.data.tabular import SYNTHETIC_FEATURES, model_features, synthetic_tabular_site
from medfed.models.zoo import build_network
from medfed.tasks.classification import ClassificationMetrics, decode, loss, metrics, operating_point, pooled_metrics

__all__ = [
    "NAME",
    "PRIMARY_METRIC",
    "PRIMARY_METRIC_PER_IMAGE",
    "SAMPLE_KEYS",
    "SPATIAL_DIMS",
    "TARGET",
    "build_model",
    "check_config",
    "decode",
    "infer",
    "loss",
    "metrics",
    "operating_point",
    "pooled_metrics",
    "synthetic_site",
    "train_transform",
]

NAME = "tabular"
PRIMARY_METRIC = "auroc"
PRIMARY_METRIC_PER_IMAGE = False  # AUROC is computed over the whole split
TARGET = "label"
SAMPLE_KEYS = ("image", TARGET)
SPATIAL_DIMS = (2,)  # a row is held as a 1 x F grid


def check_config(config: Config) -> None:
    """Two classes or more; feature columns named (``data.features``) for site folders, the synthetic
    ones for synthetic sites; rows come from site folders or are synthetic; no augmentation;
    logit adjustment only without DP."""
    data = config.data
    require(data.num_classes >= 2, "data.num-classes", data.num_classes, "an integer >= 2")
    require(
        data.source in ("sites", "heart-uci", "synthetic"),
        "data.source",
        data.source,
        "'sites' (one folder per hospital holding a features manifest), 'heart-uci' or 'synthetic' for "
        "run.task = 'tabular'",
    )
    if data.source == "synthetic":
        require(
            data.features in ((), SYNTHETIC_FEATURES),
            "data.features",
            list(data.features),
            f"[] or {list(SYNTHETIC_FEATURES)}: the columns of synthetic tabular sites",
        )
    require(
        bool(model_features(data)),
        "data.features",
        [],
        'the manifest\'s feature columns the model takes, in order (e.g. ["age", "sex", "chol"])',
    )
    if data.source == "heart-uci":
        unknown = [name for name in data.features if name not in FEATURES]
        require(not unknown, "data.features", unknown, f"columns of the UCI heart files: {list(FEATURES)}")
    require(data.channels == 1, "data.channels", data.channels, "1 for run.task = 'tabular' (a row is one channel)")
    require(not config.train.augment, "train.augment", True, "false for run.task = 'tabular' (rows are not images)")
    require(config.train.augmentations == 1, "train.augmentations", config.train.augmentations, "1 for tabular rows")
    require(
        not (config.train.logit_adjust and config.privacy.sample_level),
        "train.logit-adjust",
        True,
        "false with DP-SGD at the sites (its class counts are not covered by the privacy accounting)",
    )


def build_model(config: Config) -> nn.Module:
    """The ``model.name`` network for rows of ``data.features``: ``mlp`` (default) or ``logistic``."""
    return build_network(NAME, config)


def infer(model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """Class logits ``(B, num_classes)`` for rows ``(B, 1, 1, F)``."""
    return model(images)


def train_transform(config: Config) -> None:
    """Rows are used as they are."""
    return None


def synthetic_site(
    index: int, samples: int, image_size: int, num_classes: int, seed: int, spatial_dims: int = 2
) -> SiteArrays:
    """Synthetic hospital ``index`` (:func:`medfed.data.tabular.synthetic_tabular_site`); ``image_size``
    and ``spatial_dims`` do not apply to rows."""
    return synthetic_tabular_site(index, samples, num_classes, seed)


__all__ += ["ClassificationMetrics"]  # the accumulator :func:`metrics` returns
