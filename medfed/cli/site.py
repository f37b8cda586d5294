"""``medfed site``: a deployed site, as its operator sees it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.cli.common import console, fail
from medfed.cli.render import ledger_table
from medfed.display import plain

__all__ = ["app", "status"]

app = typer.Typer(no_args_is_help=True, help="A deployed site, as its operator sees it.")


@app.command("status")
def status(
    node_config: Annotated[
        Path | None,
        typer.Option(help="The site's node config (deploy/site.sh writes STATE_DIR/node-config.toml)"),
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="The site's state folder, if no node config is given")] = None,
    budget: Annotated[float | None, typer.Option(help="Lifetime ε budget, if the node config does not set one")] = None,
) -> None:
    """Privacy spent at this site over all runs, the budget and what remains (read from its ledger)."""
    import tomllib

    from medfed.privacy import LEDGER_FILE, LedgerError, PrivacyLedger

    settings: dict[str, Any] = {}
    if node_config is not None:
        try:
            settings = tomllib.loads(node_config.read_bytes().decode("utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as err:
            raise fail(f"--node-config {node_config}: not a readable TOML file ({type(err).__name__})", code=1) from err
    folder = state_dir or (Path(str(settings["state-dir"])) if "state-dir" in settings else None)
    if folder is None:
        raise fail("give --node-config (with state-dir) or --state-dir")
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
