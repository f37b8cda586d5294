"""``medfed site``: a deployed site, as its operator sees it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.approval import ApprovalError, load_approvals
from medfed.cli.common import console, fail
from medfed.cli.render import ledger_table
from medfed.display import plain

__all__ = ["app", "approvals", "approve", "revoke", "status"]

app = typer.Typer(no_args_is_help=True, help="A deployed site, as its operator sees it.")


NodeConfigOption = Annotated[
    Path | None, typer.Option(help="The site's node config (deploy/site.sh writes STATE_DIR/node-config.toml)")
]
StateDirOption = Annotated[Path | None, typer.Option(help="The site's state folder, if no node config is given")]


def _node_settings(node_config: Path | None) -> dict[str, Any]:
    """The node config file's keys ({} without one); exit 1 naming the file when it is not TOML."""
    import tomllib

    if node_config is None:
        return {}
    try:
        settings = tomllib.loads(node_config.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as err:
        raise fail(f"--node-config {node_config}: not a readable TOML file ({type(err).__name__})", code=1) from err
    return settings


def _state_folder(settings: dict[str, Any], state_dir: Path | None) -> Path:
    """--state-dir, else the node config's state-dir, else its data-path's state folder."""
    from medfed.data.manifest import STATE_FOLDER

    if state_dir is not None:
        return state_dir
    if "state-dir" in settings:
        return Path(str(settings["state-dir"]))
    if "data-path" in settings:
        return Path(str(settings["data-path"])) / STATE_FOLDER
    raise fail("give --node-config (with state-dir) or --state-dir")


@app.command("status")
def status(
    node_config: NodeConfigOption = None,
    state_dir: StateDirOption = None,
    budget: Annotated[float | None, typer.Option(help="Lifetime ε budget, if the node config does not set one")] = None,
) -> None:
    """Privacy spent at this site over all runs, the budget and what remains (read from its ledger)."""
    from medfed.privacy import LEDGER_FILE, LedgerError, PrivacyLedger

    settings = _node_settings(node_config)
    folder = _state_folder(settings, state_dir)
    lifetime = budget if budget is not None else settings.get("privacy-budget")
    if lifetime is not None and (
        isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime < math.inf
    ):
        raise fail(f"--budget / privacy-budget = {str(lifetime)[:40]!r}: expected a finite number > 0")
    ledger_path = folder / LEDGER_FILE
    try:
        ledger = PrivacyLedger.open(folder, 0.0)
    except LedgerError as err:
        raise fail(str(err), code=1) from err
    if not ledger_path.is_file():
        console.print(f"no ledger at {plain(ledger_path)}: this site has not trained with differential privacy yet")
        raise typer.Exit(code=0)
    title = f"site {settings.get('site-name', folder.name)}: privacy ledger {ledger_path}"
    console.print(ledger_table(title, ledger, None if lifetime is None else float(lifetime)))


@app.command("approve")
def approve(
    config_file: Annotated[Path, typer.Argument(help="The run's TOML config, as the coordinator will run it")],
    by: Annotated[str, typer.Option("--by", help="Who approves (recorded with the time, UTC)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="An override the coordinator applies: section.key=value")
    ] = None,
    node_config: NodeConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Approve a run: record its config digest, so that a site with require-approval = true trains it."""
    from medfed import approval
    from medfed.config import ConfigError, load_config, parse_override

    folder = _state_folder(_node_settings(node_config), state_dir)
    try:
        config = load_config(config_file, dict(parse_override(item) for item in set_ or []))
    except ConfigError as err:
        raise fail(str(err)) from err
    try:
        recorded = approval.approve(folder, config, by)
    except ApprovalError as err:
        raise fail(str(err)) from err
    console.print(
        f"approved run {plain(recorded.run_name)} ({recorded.task}), config digest {recorded.digest}, "
        f"by {plain(recorded.approved_by)} at {recorded.approved_at}"
    )


@app.command("approvals")
def approvals(node_config: NodeConfigOption = None, state_dir: StateDirOption = None) -> None:
    """List the runs this site approved (and those withdrawn), one per line."""
    folder = _state_folder(_node_settings(node_config), state_dir)
    try:
        recorded = load_approvals(folder)
    except ApprovalError as err:
        raise fail(str(err)) from err
    if not recorded:
        console.print(f"no run approved in {plain(str(folder))}")
    for entry in recorded:
        withdrawn = f"; revoked by {plain(entry.revoked_by)} at {entry.revoked_at}" if entry.revoked_at else ""
        console.print(
            f"{entry.digest} {'approved' if entry.active else 'REVOKED'}  run {plain(entry.run_name)} "
            f"({plain(entry.task)}), approved by {plain(entry.approved_by)} at {entry.approved_at}{withdrawn}"
        )


@app.command("revoke")
def revoke(
    digest: Annotated[str, typer.Argument(help="The approved config digest, or its first 8+ characters")],
    by: Annotated[str, typer.Option("--by", help="Who withdraws the approval")],
    node_config: NodeConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Withdraw an approval: the site refuses that run from its next message on."""
    from medfed import approval

    folder = _state_folder(_node_settings(node_config), state_dir)
    try:
        revoked = approval.revoke(folder, digest, by)
    except ApprovalError as err:
        raise fail(str(err)) from err
    for entry in revoked:
        console.print(f"revoked run {plain(entry.run_name)}, config digest {entry.digest}")
