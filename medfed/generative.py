"""Class-conditional image generation at a site, for augmentation: a small denoising diffusion model
(MONAI's ``DiffusionModelUNet`` with class embeddings, ``DDPMScheduler`` noise, ``DDIMScheduler``
sampling in few steps), trained as the ``generation`` task by the one train loop, so that DP-SGD
covers it as it covers a classifier: every step is a clipped, noised per-sample-gradient step
charged to the site's privacy ledger. Its samples are post-processing of that DP model; without
DP, they may reproduce the site's images and must stay at the site.

``medfed generate`` trains one at a site (:func:`fit_generator`), or samples one already trained
(a federated generator's checkpoint), and writes a sample grid; :func:`synthetic_counts` and
:func:`with_synthetic` mix generated samples into a site's training split, more of the scarce classes.
In a federated classification run with ``train.synthetic-augmentation``, each site does this before
its first round (:func:`generator_config`, :func:`draw_synthetic`; the site's side is in
:mod:`medfed.site`).
"""

from __future__ import annotations

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
    "draw_synthetic",
    "fit_generator",
    "generator_config",
    "round_grids",
    "sample",
    "save_grid",
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


@torch.no_grad()
def sample(model: ConditionalDiffusion, labels: torch.Tensor, image_size: int, steps: int, seed: int) -> torch.Tensor:
    """Images ``(len(labels), C, size, size)`` in [0, 1] of the given classes, by ``steps`` DDIM
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
        part, classes = x[first : first + SAMPLE_BATCH], labels[first : first + SAMPLE_BATCH].long().to(device)
        for t in scheduler.timesteps:
            level = torch.full((len(part),), int(t), device=device, dtype=torch.long)
            part, _ = scheduler.step(model.unet(part, timesteps=level, class_labels=classes), int(t), part)
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


def with_synthetic(site: SiteArrays, images: np.ndarray, labels: np.ndarray) -> SiteArrays:
    """``site`` with generated ``images`` of classes ``labels`` added to its training split (each its
    own privacy unit: they are post-processing, not patients)."""
    n = len(images)
    pids = None
    if site.patient_ids is not None:
        pids = np.concatenate([site.patient_ids, np.array([f"generated-{i}" for i in range(n)])])
    spacing = site.spacing
    if spacing is not None:  # generated images have no voxel size of their own: 1 (as the synthetic sites)
        spacing = np.concatenate([spacing, np.ones((n, spacing.shape[1]), dtype=spacing.dtype)])
    return SiteArrays(
        np.concatenate([site.images, images.astype(site.images.dtype)]),
        np.concatenate([site.targets, labels.astype(site.targets.dtype)]),
        np.concatenate([site.splits, np.array(["train"] * n, dtype=site.splits.dtype)]),
        pids,
        site.target_key,
        spacing,
    )


def generator_config(config: Config) -> Config:
    """The generator a site of the classification run ``config`` trains for
    ``train.synthetic-augmentation``: a :class:`ConditionalDiffusion` of width
    :data:`GENERATOR_WIDTH` on the run's data settings and batch size, ``train.synthetic-steps``
    steps of the generation recipe (Adam), with DP-SGD when the run has DP-SGD at the sites, for
    ε = ``train.synthetic-epsilon`` (0: half of ``privacy.target-epsilon``)."""
    train, privacy = config.train, config.privacy
    return config.with_overrides(
        {
            "run.task": "generation",
            "run.rounds": 1,
            "run.initial-model": "",
            "run.personalization": "none",
            "run.ema": 0.0,
            "model.name": "ddpm",
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
    model: ConditionalDiffusion, labels: np.ndarray, ratio: float, image_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``ratio`` generated images per training label in ``labels`` (:func:`synthetic_counts`: the
    scarce classes first), drawn in :data:`GRID_STEPS` DDIM steps: images and their classes."""
    counts = synthetic_counts(labels, model.num_classes, ratio)
    wanted = torch.arange(model.num_classes).repeat_interleave(torch.as_tensor(counts))
    return sample(model, wanted, image_size, GRID_STEPS, seed).numpy(), wanted.numpy()


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
) -> tuple[ConditionalDiffusion, GeneratorFit]:
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
    model = cast(ConditionalDiffusion, task.build_model(config)).to(device)
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
