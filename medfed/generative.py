"""Class- or mask-conditional image generation at a site, for augmentation: a small denoising
diffusion model (MONAI's ``DiffusionModelUNet`` with class embeddings, or with a one-hot label mask
as extra input channels, ``DDPMScheduler`` noise, ``DDIMScheduler`` sampling in few steps), trained as the ``generation`` task by the one train loop, so that DP-SGD
covers it as it covers a classifier: every step is a clipped, noised per-sample-gradient step
charged to the site's privacy ledger. Its samples are post-processing of that DP model; without
DP, they may reproduce the site's images and must stay at the site.

``medfed generate`` trains one at a site (:func:`fit_generator`), or samples one already trained
(a federated generator's checkpoint), and writes a sample grid; :func:`synthetic_counts` and
:func:`with_synthetic` mix generated samples into a site's training split, more of the scarce classes.
For 2D segmentation the generator draws an image for a mask (:class:`MaskConditionalDiffusion`,
``model.name = "ddpm-mask"``): the generated pairs reuse the site's own training masks, flipped or
rotated into new layouts (:func:`synthetic_masks`). In a federated classification or 2D
segmentation run with ``train.synthetic-augmentation``, each site does this before its first round (:func:`generator_config`, :func:`draw_synthetic`; the site's side is in
:mod:`medfed.site`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medfed.config import RECIPE_KEYS, Config
from medfed.data import SiteArrays

__all__ = [
    "TIMESTEPS",
    "ConditionalDiffusion",
    "GeneratorFit",
    "MaskConditionalDiffusion",
    "draw_synthetic",
    "fit_generator",
    "generator_config",
    "largest_classes",
    "round_grids",
    "sample",
    "save_grid",
    "save_pair_grid",
    "synthetic_masks",
    "synthetic_counts",
    "with_synthetic",
]

TIMESTEPS = 1000  # the diffusion's noise levels in training (DDPM's usual number)
SAMPLE_BATCH = 64  # images denoised together when sampling
GRID_PER_CLASS = 8  # samples of each class in a grid
GRID_STEPS = 25  # DDIM steps of a grid's samples, and of the images train.synthetic-augmentation adds
GENERATOR_WIDTH = 16  # the generator of train.synthetic-augmentation: channels 16 and 32, 164 k parameters
GENERATOR_GROUPS = 8


class ConditionalDiffusion(nn.Module):
    """A class-conditional DDPM: a two-level ``DiffusionModelUNet`` (channels ``width`` and
    ``2 width``, no attention, GroupNorm) that predicts the noise added to an image of a given class.

    Images are in [0, 1] (as sites hold them) and are diffused in [-1, 1].
    """

    def __init__(self, channels: int, num_classes: int, width: int, groups: int) -> None:
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=channels,
            out_channels=channels,
            channels=(width, 2 * width),
            attention_levels=(False, False),
            num_res_blocks=1,
            norm_num_groups=groups,
            num_class_embeds=num_classes,
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's denoising error ``(B,)``: the mean squared error of the noise predicted at a
        random noise level given its class; without ``labels``, under every class ``(B, num_classes)``
        (the same noise for all). Each term depends on its own image only, as DP-SGD needs. In eval
        mode the noise and levels are drawn from a fixed seed, so a score repeats."""
        generator = None if self.training else torch.Generator(device=images.device).manual_seed(0)
        x = images * 2 - 1
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        steps = torch.randint(0, TIMESTEPS, (len(x),), generator=generator, device=x.device)
        noisy = self.scheduler.add_noise(x, noise, steps)
        classes = (
            [labels.long()] if labels is not None else [steps.new_full((len(x),), c) for c in range(self.num_classes)]
        )
        errors = [
            (self.unet(noisy, timesteps=steps, class_labels=c) - noise).pow(2).flatten(1).mean(dim=1) for c in classes
        ]
        return errors[0] if labels is not None else torch.stack(errors, dim=1)


class MaskConditionalDiffusion(nn.Module):
    """A mask-conditional DDPM for 2D segmentation: the same two-level ``DiffusionModelUNet`` as
    :class:`ConditionalDiffusion`, whose input is the noisy image with the one-hot label mask
    (``num_classes`` channels, background included) concatenated, predicting the noise added to the
    image. Pixels labelled -1 (outside a photo's field of view) are all-zero in the one-hot mask.

    Images are in [0, 1] and are diffused in [-1, 1]; masks are ``(B, 1, H, W)`` class indices.
    """

    def __init__(self, channels: int, num_classes: int, width: int, groups: int) -> None:
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=channels + num_classes,
            out_channels=channels,
            channels=(width, 2 * width),
            attention_levels=(False, False),
            num_res_blocks=1,
            norm_num_groups=groups,
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS)

    def one_hot(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, num_classes, H, W)`` float channels of ``(B, 1, H, W)`` class indices (-1: all zero)."""
        classes = torch.arange(self.num_classes, device=masks.device).view(1, -1, 1, 1)
        return (masks.long() == classes).float()

    def denoise(self, noisy: torch.Tensor, steps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The noise predicted in ``noisy`` at noise levels ``steps`` given ``masks``."""
        return self.unet(torch.cat([noisy, self.one_hot(masks)], dim=1), timesteps=steps)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's denoising error ``(B,)`` given its mask, at a random noise level (in eval
        mode at noise drawn from a fixed seed). Each term depends on its own image and mask only."""
        if masks is None:
            raise ValueError(
                "the mask-conditioned generator (model.name = 'ddpm-mask') needs each image's mask: it is "
                "trained on segmentation data (train.synthetic-augmentation in a 2D segmentation run, or "
                "medfed generate), not in a federated run.task = 'generation'"
            )
        generator = None if self.training else torch.Generator(device=images.device).manual_seed(0)
        x = images * 2 - 1
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        steps = torch.randint(0, TIMESTEPS, (len(x),), generator=generator, device=x.device)
        noisy = self.scheduler.add_noise(x, noise, steps)
        return (self.denoise(noisy, steps, masks) - noise).pow(2).flatten(1).mean(dim=1)


Generator = ConditionalDiffusion | MaskConditionalDiffusion


@torch.no_grad()
def sample(model: Generator, labels: torch.Tensor, image_size: int, steps: int, seed: int) -> torch.Tensor:
    """Images ``(len(labels), C, size, size)`` in [0, 1] of the given classes (a class-conditional
    model) or for the given masks ``(N, 1, size, size)`` (a mask-conditional one), by ``steps`` DDIM
    denoising steps from seeded noise (few steps: cheap on a CPU)."""
    model.eval()
    device = next(model.parameters()).device
    scheduler = DDIMScheduler(num_train_timesteps=TIMESTEPS)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(labels), model.channels, image_size, image_size)
    x = torch.randn(shape, generator=generator).to(device)
    out = []
    for first in range(0, len(labels), SAMPLE_BATCH):
        part, condition = x[first : first + SAMPLE_BATCH], labels[first : first + SAMPLE_BATCH].long().to(device)
        for t in scheduler.timesteps:
            level = torch.full((len(part),), int(t), device=device, dtype=torch.long)
            if isinstance(model, MaskConditionalDiffusion):
                predicted = model.denoise(part, level, condition)
            else:
                predicted = model.unet(part, timesteps=level, class_labels=condition)
            part, _ = scheduler.step(predicted, int(t), part)
        out.append(((part.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out) if out else x.new_zeros(shape).cpu()


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, title: str, class_names: tuple[str, ...]) -> Path:
    """A PNG of ``images`` (one row per class, in order of ``labels``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({int(c) for c in labels.tolist()})
    columns = max(int((labels == c).sum()) for c in classes) if classes else 1
    fig, axes = plt.subplots(len(classes) or 1, columns, figsize=(1.1 * columns, 1.2 * (len(classes) or 1) + 0.4),
                             squeeze=False)  # fmt: skip
    for ax in axes.flat:
        ax.axis("off")
    for row, c in enumerate(classes):
        mine = images[labels == c]
        for col, image in enumerate(mine):
            shown = image[0] if image.shape[0] == 1 else image[:3].permute(1, 2, 0)
            axes[row][col].imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1)
        name = class_names[c] if c < len(class_names) else f"class {c}"
        axes[row][0].set_title(name, fontsize=8, loc="left")
    return _saved(fig, title, path)


def _saved(fig: Any, title: str, path: Path) -> Path:
    """Title ``fig``, write it to ``path`` (a PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_pair_grid(masks: torch.Tensor, images: torch.Tensor, path: Path, title: str, num_classes: int) -> Path:
    """A PNG of generated ``images`` under the ``masks`` they were drawn for (two rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images), 1)
    fig, axes = plt.subplots(2, columns, figsize=(1.1 * columns, 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for col, (mask, image) in enumerate(zip(masks, images, strict=True)):
        axes[0][col].imshow(mask[0].numpy(), cmap="viridis", vmin=-1, vmax=max(num_classes - 1, 1))
        shown = image[0] if image.shape[0] == 1 else image[:3].permute(1, 2, 0)
        axes[1][col].imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1)
    axes[0][0].set_title("mask", fontsize=8, loc="left")
    axes[1][0].set_title("generated image", fontsize=8, loc="left")
    return _saved(fig, title, path)


def round_grids(config: Config, run_dir: Path) -> dict[str, str]:
    """A grid of the global generator's samples after each round of a federated run in ``run_dir``
    (its round checkpoints; the same seeded noise every round, so the grids compare), written to
    ``plots/``: ``{"round N": path relative to run_dir}``. Sampling is post-processing of the
    released weights: it reads no site data and spends no privacy."""
    from medfed.run_folder import RunFolder
    from medfed.tasks import get_task
    from medfed.weights import load_checkpoint

    folder = RunFolder(run_dir)
    model = cast(ConditionalDiffusion, get_task("generation").build_model(config))
    classes = torch.arange(config.data.num_classes).repeat_interleave(GRID_PER_CLASS)
    grids = {}
    for server_round in range(1, config.run.rounds + 1):
        path = folder.round_model(server_round)
        if not path.is_file():
            continue
        model.load_state_dict(load_checkpoint(path)[0])
        images = sample(model, classes, config.data.image_size, GRID_STEPS, config.run.seed)
        title = f"round {server_round}" + (" (DP at the sites)" if config.privacy.sample_level else " (no DP)")
        out = save_grid(images, classes, folder.plots / f"samples-round-{server_round:03d}.png", title,
                        config.data.class_names)  # fmt: skip
        grids[f"round {server_round}"] = str(out.relative_to(folder.root))
    return grids


def synthetic_counts(labels: np.ndarray, num_classes: int, ratio: float) -> np.ndarray:
    """How many generated images of each class to add to a split with ``labels``: ``ratio`` times
    its size in all, each one to the class that then has the fewest images (real + generated), so
    the scarce classes get them first."""
    real = np.bincount(labels.astype(int), minlength=num_classes)[:num_classes]
    counts = np.zeros(num_classes, dtype=int)
    for _ in range(int(round(ratio * len(labels)))):
        counts[int(np.argmin(real + counts))] += 1
    return counts


def largest_classes(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """Each mask's largest class index in ``masks`` ``(N, ...)`` (0: no structure; -1 counts as 0)."""
    return masks.reshape(len(masks), -1).max(axis=1).clip(0, num_classes - 1).astype(int)


def synthetic_masks(masks: np.ndarray, num_classes: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks for ``ratio`` generated images per training mask in ``masks`` ``(N, 1, H, W)``: the
    site's own masks, each flipped and/or turned by a multiple of 90° (seeded; square masks only
    turn) so that most are new layouts. The masks are grouped by their largest class (0: no
    structure) and :func:`synthetic_counts` shares them out, the scarce groups first; within a group
    the masks are taken in a seeded order, round robin. Returns the masks and the index of the
    training mask each one comes from."""
    groups = largest_classes(masks, num_classes)
    present = np.unique(groups)
    counts = synthetic_counts(np.searchsorted(present, groups), len(present), ratio)
    rng = np.random.default_rng(seed)
    sources = []
    for group, count in zip(present, counts, strict=True):
        members = rng.permutation(np.flatnonzero(groups == group))
        sources.extend(members[np.arange(count) % len(members)].tolist())
    source = np.array(sources, dtype=np.int64)
    out = masks[source].copy()
    square = masks.shape[-1] == masks.shape[-2]
    for i in range(len(out)):
        layout = rng.integers(8 if square else 4)  # turns (square only) x flips
        mask = out[i, 0]
        if layout & 1:
            mask = mask[:, ::-1]
        if layout & 2:
            mask = mask[::-1, :]
        if layout & 4:
            mask = mask.T
        out[i, 0] = mask.copy()  # a view of out[i, 0] itself
    return out, source


def with_synthetic(
    site: SiteArrays, images: np.ndarray, targets: np.ndarray, spacing: np.ndarray | None = None
) -> SiteArrays:
    """``site`` with generated ``images`` and their ``targets`` (classes, or the masks they were
    drawn for) added to its training split, each its own privacy unit: they are post-processing,
    not patients. ``spacing``: their voxel size (a generated pair's is that of the mask it reuses);
    default 1 mm, as the synthetic sites."""
    if site.labelled is not None and site.labelled.ndim > 1:
        raise ValueError("generated images are added to one site's data, not to several sites pooled")
    n = len(images)
    pids = None
    if site.patient_ids is not None:
        pids = np.concatenate([site.patient_ids, np.array([f"generated-{i}" for i in range(n)])])
    assert site.spacing is not None  # filled in by SiteArrays
    added = np.ones((n, site.spacing.shape[1]), dtype=site.spacing.dtype) if spacing is None else spacing
    return dataclasses.replace(
        site,
        images=np.concatenate([site.images, images.astype(site.images.dtype)]),
        targets=np.concatenate([site.targets, targets.astype(site.targets.dtype)]),
        splits=np.concatenate([site.splits, np.array(["train"] * n, dtype=site.splits.dtype)]),
        patient_ids=pids,
        spacing=np.concatenate([site.spacing, added.astype(site.spacing.dtype)]),
    )


def generator_config(config: Config) -> Config:
    """The generator a site of the classification or 2D segmentation run ``config`` trains for
    ``train.synthetic-augmentation``: a :class:`ConditionalDiffusion` (classification) or
    :class:`MaskConditionalDiffusion` (segmentation: on whole images, or on ``data.patch-size``
    patches when the run has them) of width :data:`GENERATOR_WIDTH` on the run's data settings and
    batch size, ``train.synthetic-steps`` steps of the generation recipe (Adam), with DP-SGD when the
    run has DP-SGD at the sites, for ε = ``train.synthetic-epsilon`` (0: half of
    ``privacy.target-epsilon``)."""
    train, privacy = config.train, config.privacy
    return config.with_overrides(
        {
            "run.task": "generation",
            "run.rounds": 1,
            "run.initial-model": "",
            "run.personalization": "none",
            "run.ema": 0.0,
            "model.name": "ddpm-mask" if config.run.task == "segmentation" else "ddpm",
            "model.width": GENERATOR_WIDTH,
            "model.norm-groups": GENERATOR_GROUPS,
            "model.input-norm": False,
            "train.local-steps": train.synthetic_steps,
            "train.synthetic-augmentation": 0.0,
            "train.augment": False,
            "train.augmentations": 1,
            "train.trainable": "all",
            **{f"train.{key}": "auto" for key in RECIPE_KEYS},
            "privacy.enabled": privacy.sample_level,
            "privacy.level": "sample",
            "privacy.target-epsilon": train.synthetic_epsilon or privacy.target_epsilon / 2,
            "evaluation.cross-site": False,
        }
    )


def draw_synthetic(
    model: Generator, targets: np.ndarray, ratio: float, image_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``ratio`` generated images per training target in ``targets``, drawn in :data:`GRID_STEPS`
    DDIM steps: for class labels, of the scarce classes first (:func:`synthetic_counts`); for masks,
    for the site's masks flipped or turned (:func:`synthetic_masks`). The images, their targets, and
    for masks the index of the training mask each reuses (None for classes)."""
    if isinstance(model, MaskConditionalDiffusion):
        masks, source = synthetic_masks(targets, model.num_classes, ratio, seed)
        return sample(model, torch.as_tensor(masks), image_size, GRID_STEPS, seed).numpy(), masks, source
    counts = synthetic_counts(targets, model.num_classes, ratio)
    wanted = torch.arange(model.num_classes).repeat_interleave(torch.as_tensor(counts))
    return sample(model, wanted, image_size, GRID_STEPS, seed).numpy(), wanted.numpy(), None


@dataclass(frozen=True)
class GeneratorFit:
    """What :func:`fit_generator` did: steps, seconds, and with DP the noise, the sample rate and the
    ε the site's ledger holds after charging them (``epsilon`` None without DP)."""

    steps: int
    seconds: float
    units: int
    noise_multiplier: float | None
    epsilon: float | None
    delta: float | None
    sample_rate: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fit_generator(
    config: Config,
    site: SiteArrays,
    *,
    state_dir: Path | None,
    budget: float,
    run_key: str,
    seed: int,
) -> tuple[Generator, GeneratorFit]:
    """Train the generator of ``config`` (``run.task = "generation"``) on ``site``'s training split
    for ``run.rounds`` x (``train.local-steps`` or ``train.local-epochs`` passes) steps.

    With DP (``privacy.enabled``), the noise is calibrated once per ``run_key`` for
    ``privacy.target-epsilon`` over those steps and the steps are charged to the ledger in
    ``state_dir`` before the data is touched; :class:`medfed.privacy.BudgetExceeded` when they would
    take the site past ``budget``. Without DP nothing is charged (``state_dir`` may be None).
    """
    from medfed.central import train_loader
    from medfed.privacy import PrivacyLedger, Release, check_delta, default_delta, make_private, plan_privacy
    from medfed.site import data_digest, seed_everything
    from medfed.tasks import get_task
    from medfed.training import build_optimizer, resolve_device, train

    task = get_task("generation")
    seed_everything(seed)
    device = resolve_device(config.train.device)  # a site's GPU when it has one
    model = cast(Generator, task.build_model(config)).to(device)
    loader = train_loader(config, site)
    units = len(loader.dataset)  # type: ignore[arg-type]  # a sized dataset
    steps = config.run.rounds * (config.train.local_steps or config.train.local_epochs * len(loader))
    optimizer = build_optimizer(model, config.train)
    sigma = epsilon = delta = rate = None
    trained: nn.Module = model
    if config.privacy.enabled:
        if state_dir is None:
            raise ValueError("a generator trained with DP needs the site's state folder (its privacy ledger)")
        check_delta(config.privacy.delta, units)
        ledger = PrivacyLedger.open(state_dir, config.privacy.delta or default_delta(units), config.privacy.accountant)
        plan = plan_privacy(units, config.train.batch_size, 1, config.privacy.target_epsilon, local_steps=steps,
                            delta=ledger.delta, accountant=config.privacy.accountant)  # fmt: skip
        sigma = ledger.noise_for_run(f"{run_key}|generator", config.privacy.target_epsilon, plan.sample_rate, steps)
        release = Release(f"{run_key}|generator|0|{data_digest(site)}", f"seed {seed}")
        epsilon = ledger.reserve(sigma, plan.sample_rate, steps, budget, release)  # BudgetExceeded: nothing trained
        delta, rate = ledger.delta, plan.sample_rate
        trained, optimizer, loader = make_private(model, optimizer, loader, sigma, config.privacy.max_grad_norm)
    started = time.perf_counter()
    stats = train(task, trained, loader, optimizer, device, epochs=0, max_steps=steps)
    fit = GeneratorFit(stats.steps, time.perf_counter() - started, units, sigma, epsilon, delta, rate)
    if not math.isfinite(stats.loss):
        raise RuntimeError("generator training diverged (NaN/Inf loss): lower train.lr or privacy.max-grad-norm")
    return model, fit
