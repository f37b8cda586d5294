"""``medfed pretrain``: a starting model from data that holds no patient."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.cli.common import console, fail, setup_logging
from medfed.config import Config, ConfigError, load_config, parse_override
from medfed.display import plain
from medfed.progress import steps as progress_of

__all__ = ["pretrain"]


def pretrain(
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors; a .json with provenance beside it)")],
    task: Annotated[
        str | None, typer.Option(help="classification, segmentation or detection (default: the config's)")
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="The run config the model is for ([model], [data], [train] settings)"),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Public site folder(s) holding no patient (default: synthetic hospitals)")
    ] = None,
    phantom: Annotated[
        str,
        typer.Option(
            help="Synthetic segmentation data: lesions, vessels (2D fundus-like), nuclei (microscopy-like) or organs"
        ),
    ] = "lesions",
    sites: Annotated[int, typer.Option(help="Synthetic hospitals (each its own scanner)")] = 3,
    samples: Annotated[int, typer.Option(help="Synthetic images per hospital")] = 200,
    epochs: Annotated[int, typer.Option(help="Passes over the pre-training data")] = 5,
    steps: Annotated[int, typer.Option(help="Train exactly this many steps instead of --epochs (0: use epochs)")] = 0,
    lr: Annotated[
        float, typer.Option(help="Learning rate for all weights (0: the config's train.lr for SGD, 2e-3 for Adam)")
    ] = 0.0,
    momentum: Annotated[float, typer.Option(help="SGD momentum")] = 0.9,
    optimizer: Annotated[str, typer.Option(help="sgd (phantoms) or adam (real public data)")] = "sgd",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value")] = None,
    verbose: bool = False,
) -> None:
    """Build a starting model from data that holds no patient; start a federation from it with
    --set run.initial-model=OUT (the report records where it came from)."""
    setup_logging(verbose)
    from medfed.pretrain import PHANTOMS
    from medfed.pretrain import pretrain as run_pretrain

    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
        if task is not None:
            overrides["run.task"] = task
        config = load_config(config_file, overrides) if config_file else Config().with_overrides(overrides)
    except ConfigError as err:
        raise fail(str(err)) from err
    if phantom not in PHANTOMS:
        raise fail(f"--phantom {phantom!r}: expected one of {', '.join(PHANTOMS)}")
    if optimizer not in ("sgd", "adam"):
        raise fail(f"--optimizer {optimizer!r}: expected sgd or adam")
    if lr < 0 or not 0 <= momentum < 1:
        raise fail(f"--lr {lr} / --momentum {momentum}: expected a learning rate >= 0 and a momentum in [0, 1)")
    if data is not None and not data.is_dir():
        raise fail(f"--data {data}: not a folder (a public site folder, or a folder of them, expected)")
    try:
        with progress_of(console, "pre-training: preparing the data") as progress:
            path = run_pretrain(config, out, data, epochs=epochs, steps=steps, sites=sites, samples_per_site=samples,
                                phantom=phantom, lr=lr, momentum=momentum, optimizer=optimizer,  # type: ignore[arg-type]
                                progress=progress)  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    meta = json.loads(path.with_suffix(".json").read_text())["provenance"]
    console.print(f"wrote {plain(path)}: {plain(meta['data'])}; {meta['images']} images, {meta['steps']} steps, "
                  f"final loss {meta['final_train_loss']:.3f}")  # fmt: skip
    console.print(f"start a run from it: --set run.initial-model={plain(path)}")
