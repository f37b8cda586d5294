"""``medfed generate``: a site's class- or mask-conditional image generator, and a grid of its samples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from medfed.cli.common import console, fail, setup_logging
from medfed.config import ConfigError, load_config, parse_override
from medfed.display import plain

__all__ = ["generate"]


def generate(
    config_file: Annotated[
        Path,
        typer.Argument(help="A run config with run.task = 'generation' (model.name = 'ddpm-mask': segmentation masks)"),
    ],
    out: Annotated[Path, typer.Option(help="Folder for generator.safetensors, samples.png (and synthetic.npz)")],
    site: Annotated[int, typer.Option(help="Simulated site to train at (its index), without --site-dir")] = 0,
    site_dir: Annotated[Path | None, typer.Option(help="A site folder (manifest.csv) to train at")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="The site's state folder, whose privacy ledger is charged (default: OUT/state)")
    ] = None,
    budget: Annotated[float, typer.Option(help="The site's lifetime ε cap (0: privacy.budget of the config)")] = 0.0,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Sample this trained generator (e.g. a federated run's round checkpoint) instead of training"
        ),
    ] = None,
    ratio: Annotated[
        float,
        typer.Option(
            help="Also write synthetic.npz: this many generated images per training image, scarce classes "
            "first (ddpm-mask: for the site's training masks, flipped or turned)"
        ),
    ] = 0.0,
    sample_steps: Annotated[int, typer.Option(help="Denoising steps per sample (DDIM)")] = 25,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value")] = None,
    verbose: bool = False,
) -> None:
    """Train a class-conditional generator on one site's training images (DP-SGD charged to the site's
    privacy ledger when privacy.enabled; refused past the site's budget), or load one, and write a
    grid of its samples. With model.name = 'ddpm-mask' the generator draws an image for a label mask
    and learns from a 2D segmentation site's images and masks (data.source 'synthetic': lesion
    phantoms; 'sites' or 'pairs': the mask column or folder). Without DP its samples may reproduce the
    site's images: keep them at the site."""
    setup_logging(verbose)
    try:
        config = load_config(config_file, dict(parse_override(item) for item in set_ or []))
    except ConfigError as err:
        raise fail(str(err)) from err
    if config.run.task != "generation":
        raise fail(f"run.task = {config.run.task!r} in {config_file}: expected 'generation' for medfed generate "
                   "(with model.name = 'ddpm-mask' for a 2D segmentation site's images and masks)")  # fmt: skip
    if not 1 <= sample_steps <= 1000:
        raise fail(f"--sample-steps {sample_steps}: expected a whole number in [1, 1000]")
    if not 0 <= ratio <= 10:
        raise fail(f"--ratio {ratio:g}: expected a number in [0, 10]")
    if not (budget == 0 or 0 < budget <= 1000):
        raise fail(f"--budget {budget:g}: expected a number in (0, 1000], or 0 for the config's")
    out.mkdir(parents=True, exist_ok=True)
    model, info, train_labels = _generator(config, site, site_dir, state_dir or out / "state", budget, checkpoint)
    _write_samples(config, model, info, out, sample_steps, ratio, train_labels)


def _generator(
    config: Any, index: int, site_dir: Path | None, state_dir: Path, budget: float, checkpoint: Path | None
) -> tuple[Any, dict[str, Any], np.ndarray | None]:
    """The generator (trained here, or loaded from ``checkpoint``), what was done, and the training
    targets (labels, or masks) of the site it was trained at (None when loaded)."""
    from medfed.data import DataError, load_simulated_site
    from medfed.data.manifest import SiteReading, read_site
    from medfed.generative import fit_generator
    from medfed.privacy import BudgetExceeded, LedgerError
    from medfed.tasks import get_task
    from medfed.weights import CheckpointError, load_checkpoint, load_state

    if checkpoint is not None and config.model.name == "ddpm-mask":
        raise fail("--checkpoint samples a class-conditional generator; one with model.name = 'ddpm-mask' draws "
                   "images for a site's masks: train it at the site instead (leave out --checkpoint)")  # fmt: skip
    if checkpoint is not None:  # post-processing of a model already trained: no data, no charge
        model = get_task("generation").build_model(config)
        try:
            state, _ = load_checkpoint(checkpoint)
            load_state(
                model, state, checkpoint, "this config's generator", "pass the config the generator was trained with"
            )
        except (CheckpointError, FileNotFoundError) as err:
            raise fail(str(err), code=1) from err
        return model, {"checkpoint": checkpoint.name}, None
    masks = config.model.name == "ddpm-mask"
    try:
        if site_dir is not None:
            data = read_site(site_dir, SiteReading.from_config(config.data, "mask" if masks else "label"))
            name = site_dir.name
        else:
            if not 0 <= index < config.data.sites:
                raise fail(f"--site {index}: expected an index in [0, data.sites - 1 = {config.data.sites - 1}]")
            # the masks of a segmentation site: its data as a segmentation run reads them
            reader = config.with_overrides({"run.task": "segmentation", "model.name": ""}) if masks else config
            name, data = load_simulated_site(reader, index)
    except ConfigError as err:
        raise fail(f"{err} (reading the segmentation site of model.name = 'ddpm-mask')", code=1) from err
    except DataError as err:
        raise fail(f"site data failed validation: {err}", code=1) from err
    except (OSError, ValueError) as err:
        raise fail(str(err), code=1) from err
    if not (data.splits == "train").any():
        raise fail(f"site {name}: no training images", code=1)
    cap = budget or config.privacy.site_budget
    try:
        model, fit = fit_generator(config, data, state_dir=state_dir, budget=cap, run_key=config.run.name,
                                   seed=config.run.seed)  # fmt: skip
    except BudgetExceeded as err:
        raise fail(f"site {name} refuses to train the generator: {err}", code=1) from err
    except (LedgerError, ValueError) as err:
        raise fail(str(err), code=1) from err
    info = {"site": name, "private": config.privacy.enabled, **fit.as_dict()}
    if fit.epsilon is not None:
        console.print(f"site {plain(name)}: {fit.steps} DP-SGD steps (σ {fit.noise_multiplier:.2f}), "
                      f"ε spent at the site {fit.epsilon:.2f} of {cap:g}, {fit.seconds:.0f} s")  # fmt: skip
    else:
        console.print(f"site {plain(name)}: {fit.steps} steps WITHOUT DP, {fit.seconds:.0f} s: its samples "
                      "may reproduce the site's images and must stay at the site")  # fmt: skip
    return model, info, data.targets[data.splits == "train"]


def _write_samples(
    config: Any, model: Any, info: dict[str, Any], out: Path, steps: int, ratio: float, targets: np.ndarray | None
) -> None:
    """The generator's checkpoint (when trained here), its sample grid and the synthetic set (the
    site's training ``targets``: class labels, or masks for the mask-conditional generator)."""
    import torch

    from medfed.generative import GRID_PER_CLASS, sample, save_grid, save_pair_grid, synthetic_counts, synthetic_masks
    from medfed.weights import model_to_arrays, save_checkpoint

    if "checkpoint" not in info:
        meta = {"round": 0, "task": "generation", "config": config.to_public_dict(), "generator": info}
        save_checkpoint(out / "generator.safetensors", model_to_arrays(model), meta)
    title = "generated samples" + (" (DP)" if info.get("private") else " (no DP)" if "private" in info else "")
    size, classes = config.data.image_size, config.data.num_classes
    if config.model.name == "ddpm-mask":
        assert targets is not None  # trained here: the CLI refuses a mask generator's checkpoint
        shown, _ = synthetic_masks(targets, classes, GRID_PER_CLASS / len(targets), config.run.seed)
        images = sample(model, torch.as_tensor(shown), size, steps, config.run.seed)
        grid = save_pair_grid(torch.as_tensor(shown), images, out / "samples.png", title, classes)
    else:
        wanted = torch.arange(classes).repeat_interleave(GRID_PER_CLASS)
        images = sample(model, wanted, size, steps, config.run.seed)
        grid = save_grid(images, wanted, out / "samples.png", title, config.data.class_names)
    console.print(f"sample grid: {plain(str(grid))}")
    if not ratio or targets is None:
        return
    if config.model.name == "ddpm-mask":
        masks, _ = synthetic_masks(targets, classes, ratio, config.run.seed + 1)
        made = sample(model, torch.as_tensor(masks), size, steps, config.run.seed + 1)
        np.savez(out / "synthetic.npz", images=made.numpy(), masks=masks)
        console.print(f"synthetic.npz: {len(masks)} generated images, each with the training mask (flipped or "
                      "turned) it was drawn for")  # fmt: skip
        return
    counts = synthetic_counts(targets, classes, ratio)
    wanted = torch.arange(classes).repeat_interleave(torch.as_tensor(counts))
    made = sample(model, wanted, size, steps, config.run.seed + 1)
    np.savez(out / "synthetic.npz", images=made.numpy(), labels=wanted.numpy())
    console.print(f"synthetic.npz: {counts.tolist()} images per class")
