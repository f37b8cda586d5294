"""``medfed privacy``: plan the differential-privacy noise before a run: at a site (``plan``), or
site-level at the server (``site-plan``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.common import console, fail, with_options
from medfed.cli.render import larger_batches_table
from medfed.config import Config, ConfigError, load_config
from medfed.display import plain

__all__ = ["app", "plan"]

app = typer.Typer(
    no_args_is_help=True,
    help="Differential privacy: plan the noise before a run (at each site, or site-level at the server).",
)


@app.command("plan")
def plan(
    site_size: Annotated[int, typer.Option(help="Privacy units in the site's training split (images, or patients)")],
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (default: the config's run.rounds)")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size (default: the config's train.batch-size)")] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="ε the run may spend at the site (default: the config's)")
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round (default: the config's)")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Local steps per round; 0 uses local epochs")] = None,
    delta: Annotated[float | None, typer.Option(help="δ (default: the config's; 0 means 1/(10 units))")] = None,
    cross_site: Annotated[
        bool | None, typer.Option(help="Local-only models are trained too (doubles the steps; default: the config's)")
    ] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="Take unset values from this run config")] = None,
) -> None:
    """The noise multiplier, ε after each round and a warning when the noise is too large to learn,
    computed exactly as a site computes them before it trains (it logs the same lines)."""
    from medfed.privacy import MAX_COUNT, PrivacyPlan, check_delta, plan_privacy

    try:
        config = load_config(config_file) if config_file else Config()
    except ConfigError as err:
        raise fail(str(err)) from err
    if not 1 <= site_size <= MAX_COUNT:
        raise fail(f"--site-size {site_size}: expected the number of training units at the site, in [1, {MAX_COUNT:g}]")
    config = with_options(
        config,
        {
            "--rounds": ("run.rounds", rounds),
            "--batch": ("train.batch-size", batch),
            "--epsilon": ("privacy.target-epsilon", epsilon),
            "--local-epochs": ("train.local-epochs", local_epochs),
            "--local-steps": ("train.local-steps", local_steps),
            "--delta": ("privacy.delta", delta),
            "--cross-site": ("evaluation.cross-site", cross_site),
        },
    )

    def planned(batch_size: int) -> PrivacyPlan:
        """The site's plan with batches of ``batch_size``, the other settings as configured."""
        return plan_privacy(
            site_size,
            batch_size,
            config.run.rounds,
            config.privacy.target_epsilon,
            local_epochs=config.train.local_epochs,
            local_steps=config.train.local_steps,
            delta=config.privacy.delta,
            accountant=config.privacy.accountant,
            runs_per_round=2 if config.evaluation.cross_site else 1,
        )

    try:
        check_delta(config.privacy.delta, site_size)
    except ValueError as err:
        raise fail(f"--delta {delta}: {err}" if delta is not None else str(err)) from err
    try:
        site_plan = planned(config.train.batch_size)
        lines = site_plan.lines()  # calibrates σ: an ε that cannot be met is a ValueError
    except ValueError as err:
        raise fail(str(err)) from err
    for line in lines:
        console.print(plain(line), style="bold red" if line.startswith("WARNING") else None, highlight=False)
    if site_plan.warnings() and site_plan.batch_size < site_size:
        sizes = sorted({min(site_plan.batch_size * k, site_size) for k in (2, 4, 8)})
        console.print(larger_batches_table([planned(size) for size in sizes]))


@app.command("site-plan")
def site_plan(
    sites: Annotated[int, typer.Option(help="Sites in the federation (N); site-level DP needs at least 10")],
    fraction_train: Annotated[
        float | None, typer.Option(help="Each site's chance to train in a round (default: the config's)")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (default: the config's run.rounds)")] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="Site-level ε of the whole run (default: the config's privacy.site-epsilon)")
    ] = None,
    delta: Annotated[
        float | None, typer.Option(help="Site-level δ (default: the config's; 0 means 1/(10 sites))")
    ] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="Take unset values from this run config")] = None,
) -> None:
    """Site-level DP at the server (privacy.level = 'site'): the noise multiplier for a target ε, its
    split between the update and the adaptive clipping's count, and ε after each round, computed as
    the server computes them at the start of a run (it logs the same lines)."""
    from medfed.site_level_dp import plan_site_level

    try:
        config = load_config(config_file) if config_file else Config()
    except ConfigError as err:
        raise fail(str(err)) from err
    config = with_options(
        config,
        {
            "--fraction-train": ("run.fraction-train", fraction_train),
            "--rounds": ("run.rounds", rounds),
            "--epsilon": ("privacy.site-epsilon", epsilon),
            "--delta": ("privacy.site-delta", delta),
        },
    )
    privacy = config.privacy
    try:
        plan = plan_site_level(
            sites,
            config.run.fraction_train,
            config.run.rounds,
            privacy.site_epsilon,
            delta=privacy.site_delta,
            accountant=privacy.accountant,
            adaptive=privacy.site_clip_lr > 0,
        )
        lines = plan.lines()
    except ValueError as err:
        raise fail(f"--sites {sites}: {err}" if "at least" in str(err) else str(err)) from err
    for line in lines:
        console.print(plain(line), style="bold red" if line.startswith("WARNING") else None, highlight=False)
