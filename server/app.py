"""Flower ServerApp: reads the run config, hands the run to :func:`medfed.federation.run_federation`."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.config import load_config, parse_override
from medfed.federation import run_federation, untrained_reason
from medfed.prompt_grid import PromptGrid

app = ServerApp()

APP_DIR = Path(__file__).resolve().parent.parent


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``run_config``: ``config-file`` (TOML, relative to the app), ``out-dir``, ``overrides``
    (``;``-separated ``section.key=value``), ``resume`` (true: continue the run checkpointed in
    ``out-dir`` after its last completed round)."""
    run_config = context.run_config
    config_file = Path(str(run_config["config-file"]))
    if not config_file.is_absolute():
        config_file = APP_DIR / config_file
    overrides = dict(parse_override(item) for item in str(run_config.get("overrides", "")).split(";") if item.strip())
    config = load_config(config_file, overrides)
    resume = run_config.get("resume", False)
    if not isinstance(resume, bool):
        raise ValueError(f"run config resume = {resume!r}: expected true or false")
    report = run_federation(PromptGrid(grid), config, Path(str(run_config["out-dir"])), resume=resume)
    failure = untrained_reason(report)
    if failure:  # the report is written; the run must still not end as a success
        raise RuntimeError(failure)
