"""``medfed privacy``: plan the differential-privacy noise before a run, at a site (``plan``) or
site-level at the server (``site-plan``); audit a released model (``audit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medfed.cli.common import console, fail, with_options
from medfed.cli.render import larger_batches_table, num
from medfed.config import Config, ConfigError, load_config
from medfed.display import plain

__all__ = ["app", "audit", "plan"]

app = typer.Typer(
    no_args_is_help=True,
    help="Differential privacy: plan the noise before a run (at each site, or site-level at the server); audit a released model.",
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
    from medfed.personalization import privacy_shape
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
            **privacy_shape(config),
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
    from medfed.site_level_dp import plan_for_config

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
    try:
        plan = plan_for_config(config, sites)
        lines = plan.lines()
    except ValueError as err:
        raise fail(f"--sites {sites}: {err}" if "at least" in str(err) else str(err)) from err
    for line in lines:
        console.print(plain(line), style="bold red" if line.startswith("WARNING") else None, highlight=False)


@app.command("audit")
def audit(
    model: Annotated[Path, typer.Option(help="The released model (.safetensors with its .json beside it)")],
    out: Annotated[Path, typer.Option(help="Folder for audit.json (stays at the site)")],
    data: Annotated[
        Path | None, typer.Option(help="This site's data folder (default: a simulated site of the run's config)")
    ] = None,
    site: Annotated[
        str, typer.Option(help="This site's name in the run (default: the data folder's name, or the first site)")
    ] = "",
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="The run's config, for its simulated sites (default: the checkpoint's own)"),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="The run's report.json, for the model's ε (default: the run folder's, beside checkpoints/)"),
    ] = None,
    held_out: Annotated[str, typer.Option(help="The non-members: test, val or val+test")] = "val+test",
    shadows: Annotated[
        int, typer.Option(help="Reference models for offline LiRA (even; each a training run at the site; 0: off)")
    ] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the AUC's 95% interval")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the reference models' data halves")] = 0,
) -> None:
    """Membership inference against a released model at this site: can an attacker holding the model
    tell the site's training images from its held-out ones? Attack AUC and TPR at 1% and 0.1% FPR,
    next to the ceiling the model's ε permits any attack (nothing leaves the machine)."""
    import json

    from medfed.audit import AuditError, audit_checkpoint
    from medfed.data import DataError
    from medfed.evaluation.report import json_safe

    if out.exists() and not out.is_dir():
        raise fail(f"--out {out}: a file is there; expected a folder for audit.json")
    try:
        result = audit_checkpoint(model, data=data, site=site, config_file=config_file, report=report,
                                  held_out=held_out, shadows=shadows, replicates=bootstrap, seed=seed)  # fmt: skip
    except (AuditError, DataError, ConfigError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from err
    console.print(audit_table(result))
    for line in result["verdict"]:
        console.print(plain(line), highlight=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(json.dumps(json_safe(result), indent=1))
    except OSError as err:
        raise fail(f"--out {out}: cannot write audit.json there ({err.strerror or err})") from err
    console.print(f"written: {plain(out / 'audit.json')}", highlight=False)


def audit_table(result: dict[str, Any]) -> Table:
    """The attacks' AUC and TPR at low FPRs, and the ceiling the model's ε puts on any attack."""
    from medfed.audit import FPRS

    title = (
        f"Membership inference at {result['site']}: {result['members']} training vs {result['nonmembers']} "
        f"held-out ({' + '.join(result['held_out'])}) images, {result['checkpoint']} round {result['round']}"
    )
    table = Table(title=plain(title))
    table.add_column("attack")
    table.add_column("AUC [95% CI]", justify="right")
    for fpr in FPRS:
        table.add_column(f"TPR at {fpr:.1%} FPR", justify="right")
    for name, attack in result["attacks"].items():
        low, high = attack["auc_ci95"]
        table.add_row(name, f"{num(attack['auc'])} [{num(low)}, {num(high)}]",
                      *(_rate(attack["tpr_at_fpr"][f"{fpr:g}"], fpr) for fpr in FPRS))  # fmt: skip
    theory = result["theory"]
    if theory.get("epsilon") is not None:
        table.add_row(
            f"ceiling at ε = {theory['epsilon']:.3g}, δ = {theory['delta']:.1e}",
            num(theory["auc_ceiling"]),
            *(num(theory["tpr_ceiling"][f"{fpr:g}"]) for fpr in FPRS),
            style="bold",
        )
    else:
        table.caption = plain(f"no ε to compare with: {theory['reason']}")
    return table


def _rate(rate: dict[str, Any] | None, fpr: float) -> str:
    """A TPR with its exact counts and interval, or n/a with fewer than 1/FPR non-members."""
    if rate is None:
        return f"n/a (< {round(1 / fpr)} held out)"
    low, high = rate["ci95"]
    return f"{num(rate['tpr'])} ({rate['flagged']}/{rate['members']}; {num(low)}-{num(high)})"
