"""Task plugins. Every task module exposes the same names (see :class:`Task`), so the training
loops, the server and the report never branch on the task."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from medfed.config import Config

if TYPE_CHECKING:  # medfed.data imports this package (its simulated sites pick a task)
    from medfed.data.arrays import SiteArrays

__all__ = ["TASKS", "MetricAccumulator", "Task", "get_task", "predict", "seeded_train_transform"]

TASKS: dict[str, str] = {
    "classification": "medfed.tasks.classification",
    "segmentation": "medfed.tasks.segmentation",
    "instance-segmentation": "medfed.tasks.instance_segmentation",
    "detection": "medfed.tasks.detection",
    "tabular": "medfed.tasks.tabular",
    "generation": "medfed.tasks.generation",
}


Sample = dict[str, torch.Tensor]


class MetricAccumulator(Protocol):
    """Collects predictions batch by batch; ``compute`` gives named float metrics."""

    def update(self, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Task(Protocol):
    """What a task module provides. A task whose model takes more than the image in training (the
    generator takes the class) also provides ``forward(model, batch) -> outputs``, which the train
    loop then calls instead of ``model(batch["image"])``."""

    NAME: str
    PRIMARY_METRIC: str
    # the primary metric is a mean of per-image values; if not (computed over the whole split), the
    # task's metrics provide ``resampled(indices)``: the same metrics over those cases (a bootstrap draw)
    PRIMARY_METRIC_PER_IMAGE: bool
    TARGET: str  # what the task learns: the sample key and manifest column "label", "mask" or "boxes"
    SAMPLE_KEYS: tuple[str, ...]  # ("image", TARGET)
    SPATIAL_DIMS: tuple[int, ...]  # the image dimensions the task works in (2: images, 3: volumes)

    def check_config(self, config: Config) -> None:
        """Raise :class:`medfed.config.ConfigError` (naming the key) on settings this task cannot use."""
        ...

    def build_model(self, config: Config) -> nn.Module: ...

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def infer(self, model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
        """Raw outputs (logits) for whole images, e.g. by sliding window over patches."""
        ...

    def decode(self, outputs: torch.Tensor, config: Config) -> torch.Tensor:
        """Predictions from raw outputs: class probabilities, label maps, ..."""
        ...

    def train_transform(self, config: Config) -> Callable[[Sample], Sample] | None:
        """Random per-sample transform at training time (e.g. one random patch), or None."""
        ...

    def metrics(self, config: Config) -> MetricAccumulator: ...

    def operating_point(self, val_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
        """The operating threshold chosen from the sites' validation metrics (``{"threshold": t, ...}``),
        or {} for tasks that have none."""
        ...

    def pooled_metrics(self, test_metrics: dict[str, dict[str, float]], config: Config) -> dict[str, float]:
        """Metrics over all sites' test cases together, from sum-reducible counts the sites sent; or {}."""
        ...

    def synthetic_site(
        self, index: int, samples: int, image_size: int, num_classes: int, seed: int, spatial_dims: int = 2
    ) -> SiteArrays:
        """Synthetic hospital ``index`` holding this task's kind of target (its own scanner shift)."""
        ...


def get_task(name: str) -> Task:
    """The task module registered as ``name``; every registered module provides :class:`Task`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return cast(Task, importlib.import_module(TASKS[name]))


def seeded_train_transform(task: Task, config: Config, seed: int) -> Callable[[Sample], Sample] | None:
    """The task's training transform with its random state seeded (MONAI's random transforms are
    otherwise seeded afresh in every process, so training would not repeat)."""
    transform = task.train_transform(config)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed)
    return transform


@torch.no_grad()
def predict(task: Task, model: nn.Module, images: torch.Tensor, config: Config) -> torch.Tensor:
    """The task's predictions for a batch of whole images."""
    return task.decode(task.infer(model, images, config), config)
