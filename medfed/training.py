"""The one local train loop and the one eval loop, shared by every task."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypedDict

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from medfed.config import Config, TrainConfig
from medfed.tasks import Task

__all__ = [
    "LoopOptions",
    "TrainStats",
    "build_optimizer",
    "evaluate",
    "loop_options",
    "lr_schedule",
    "resolve_device",
    "train",
]


@dataclass(frozen=True)
class TrainStats:
    """What a local training pass did: optimizer steps, samples seen, mean loss, seconds."""

    steps: int
    examples: int
    loss: float
    seconds: float


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def set_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Freeze what ``train.trainable`` leaves out (``all``: nothing; ``bias-norm``: all but biases
    and normalisation parameters) and return the parameters that train."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(trainable == "all" or name == "bias" or isinstance(module, NORM_LAYERS))
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, config: TrainConfig) -> Optimizer:
    """The configured optimizer over the parameters ``train.trainable`` lets train (others are frozen)."""
    params = set_trainable(model, config.trainable)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_schedule(
    optimizer: Optimizer, settings: TrainConfig, first_step: int, total_steps: int, steps_per_round: int
) -> LambdaLR | None:
    """The learning rate of ``train.schedule`` over the whole run, for a training pass that starts at
    the run's step ``first_step`` (of ``total_steps``, all rounds end to end): a linear warm-up over
    ``train.warmup-rounds`` rounds of ``steps_per_round`` steps, then constant or cosine to 0.
    None when the rate is constant throughout (nothing to schedule)."""
    warmup = settings.warmup_rounds * steps_per_round
    if settings.schedule == "constant" and warmup == 0:
        return None

    def factor(step: int) -> float:
        done = first_step + step
        if done < warmup:
            return (done + 1) / warmup
        if settings.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(done - warmup, total_steps) / max(total_steps - warmup, 1)))
        return 1.0

    return LambdaLR(optimizer, factor)


class LoopOptions(TypedDict):
    """The :func:`train` keyword arguments ``[train]`` sets besides the optimizer."""

    views: int
    physical_batch_size: int


def loop_options(settings: TrainConfig) -> LoopOptions:
    """The :func:`train` arguments ``[train]`` sets besides the optimizer: views per image, part size."""
    return {"views": settings.augmentations, "physical_batch_size": settings.physical_batch_size}


@contextmanager
def _quiet_dp_hooks() -> Iterator[None]:
    """Hide torch's note that a backward hook fires on a layer whose input needs no gradient: Opacus
    hooks a DP model's first layer, whose input is the image."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@_quiet_dp_hooks()
def train(
    task: Task,
    model: nn.Module,
    loader: DataLoader,
    optimizer: Optimizer,
    device: torch.device,
    *,
    epochs: int,
    max_steps: int = 0,
    proximal_mu: float = 0.0,
    anchor: list[torch.Tensor] | None = None,
    anchor_lambda: float = 0.0,
    amp: bool = False,
    views: int = 1,
    physical_batch_size: int = 0,
    schedule: LambdaLR | None = None,
) -> TrainStats:
    """Train for ``epochs`` passes over ``loader`` (or exactly ``max_steps`` steps when > 0).

    ``views`` > 1: batches hold that many random views of each image (``(B, views, ...)``); with
    DP the per-view gradients of an image are averaged before clipping. ``physical_batch_size``
    > 0 computes each batch in parts of at most that many images and accumulates them into one
    step (under DP: clipped per part, noised once; the same update as one whole batch).
    ``schedule`` (:func:`lr_schedule`) is stepped after every optimizer step.

    FedProx's proximal term is applied as a decoupled step ``w -= lr * mu * (w - w_global)`` after
    each optimizer step: it involves no data, so it adds nothing to the privacy cost and works the
    same with or without DP. Ditto's penalty ``anchor_lambda``/2 ||w - anchor||² (``anchor``: the
    global model's parameters, in ``model.parameters()`` order) is applied the same way, as its
    proximal step ``w -= lr*λ/(1 + lr*λ) * (w - anchor)``, stable for any λ (λ → ∞ gives the anchor).
    AMP is used only on CUDA and never under DP (Opacus needs fp32 grads).
    """
    model.train()
    reference = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    steps, examples, loss_sum, start = 0, 0, 0.0, time.perf_counter()
    epoch = 0
    while (max_steps and steps < max_steps) or (not max_steps and epoch < epochs):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            size = len(next(iter(batch.values())))
            optimizer.zero_grad(set_to_none=True)
            if size == 0:  # an empty Poisson batch still takes a (noise-only) DP step, as the accounting assumes
                _noise_only_step(model, optimizer)
            else:
                loss_sum += _step(task, model, optimizer, batch, views, physical_batch_size or size, use_amp, scaler)
            lr = optimizer.param_groups[0]["lr"]
            if schedule is not None:
                schedule.step()
            if reference is not None:
                with torch.no_grad():
                    for param, ref in zip(model.parameters(), reference, strict=True):
                        param.sub_(lr * proximal_mu * (param - ref))
            if anchor is not None:
                pull = lr * anchor_lambda / (1 + lr * anchor_lambda)
                with torch.no_grad():
                    for param, ref in zip(model.parameters(), anchor, strict=True):
                        param.sub_(pull * (param - ref))
            steps += 1
            examples += size
            if max_steps and steps >= max_steps:
                break
        epoch += 1
    return TrainStats(steps, examples, loss_sum / max(examples, 1), time.perf_counter() - start)


def _step(
    task: Task,
    model: nn.Module,
    optimizer: Optimizer,
    batch: dict[str, torch.Tensor],
    views: int,
    part_size: int,
    use_amp: bool,
    scaler: torch.amp.GradScaler | None,
) -> float:
    """One optimizer step on ``batch``, computed in parts of ``part_size`` images; returns the summed loss."""
    private = isinstance(optimizer, DPOptimizer)
    size = len(batch["image"])
    loss_sum = 0.0
    for first in range(0, size, part_size):
        part = {k: v[first : first + part_size] for k, v in batch.items()}
        count = len(part["image"])
        if views > 1:
            part = {k: v.flatten(0, 1) for k, v in part.items()}
        if private and first > 0:
            optimizer.zero_grad(set_to_none=True)  # drops the last part's per-sample grads, keeps the clipped sum
        with torch.autocast(batch["image"].device.type, enabled=use_amp):
            loss = task.loss(_outputs(task, model, part), part)
        # without DP the parts' mean losses are weighted to the batch mean; DP clips per sample instead
        scaled = loss if private else loss * (count / size)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if isinstance(optimizer, DPOptimizer):
            if views > 1:
                _average_views(model, views)
            optimizer.signal_skip_step(do_skip=first + part_size < size)  # clip and add up; noise at the last part
            optimizer.step()
        loss_sum += float(loss.detach()) * count
    if not private:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return loss_sum


def _outputs(task: Task, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's training outputs on ``batch``: ``task.forward(model, batch)`` for a task whose model
    takes more than the image (a generator conditioned on the class), else ``model(image)``."""
    forward = getattr(task, "forward", None)
    return forward(model, batch) if forward is not None else model(batch["image"])


def _average_views(model: nn.Module, views: int) -> None:
    """Per-sample gradients of ``B * views`` rows to ``B`` rows: each image's mean over its views."""
    for param in model.parameters():
        grad_sample = getattr(param, "grad_sample", None)
        if param.requires_grad and isinstance(grad_sample, torch.Tensor):
            averaged = grad_sample.reshape(-1, views, *grad_sample.shape[1:]).mean(dim=1)
            param.grad_sample = averaged  # type: ignore[attr-defined]  # Opacus' attribute, unknown to torch's types


def _noise_only_step(model: nn.Module, optimizer: Optimizer) -> None:
    """Step a DP optimizer on an empty batch: no per-sample gradients, only the calibrated noise."""
    for param in model.parameters():
        if param.requires_grad:
            empty = param.new_zeros((0, *param.shape))
            param.grad_sample = empty  # type: ignore[attr-defined]  # Opacus' attribute, unknown to torch's types
    optimizer.step()


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    config: Config,
    device: torch.device,
    cases: list[dict[str, float]] | None = None,
    score_counts: bool = False,
) -> dict[str, float]:
    """The task's metrics of ``model`` on ``dataset`` (plus ``loss``).

    ``cases``, when given, receives the per-case rows of tasks that keep them (segmentation
    quantification); they stay where this runs (the site), only the aggregates are returned.
    ``score_counts`` adds the counts of cases per score bin of tasks that choose an operating point
    from them (binary classification), for the server to sum over sites.
    """
    model.eval()
    accumulator = task.metrics(config)
    loader = DataLoader(dataset, batch_size=config.evaluation.batch_size, shuffle=False)
    loss_sum, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = task.infer(model, batch["image"], config)
        loss_sum += float(task.loss(outputs, batch)) * len(outputs)
        count += len(outputs)
        accumulator.update(task.decode(outputs, config), batch)
    results = accumulator.compute()
    results["loss"] = loss_sum / max(count, 1)
    if score_counts and hasattr(accumulator, "score_counts"):
        results.update(accumulator.score_counts())
    if cases is not None:
        cases.extend(getattr(accumulator, "cases", []))
    return results
