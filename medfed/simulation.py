"""A whole federation on one machine: Flower's simulation runtime running our ServerApp logic and
ClientApp, one virtual SuperNode per site, in the already-installed environment (no runtime
dependency install, no download)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.config import Config
from medfed.data import simulated_site_names
from medfed.data.sites import SIMULATION_CACHE
from medfed.federation import run_federation
from medfed.run_folder import RunFolder
from medfed.tracking import check_tracking

__all__ = ["simulate"]

log = logging.getLogger("medfed.simulation")


def simulate(
    config: Config,
    out_dir: str | Path,
    state_dir: str | Path | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the federation described by ``config``; return the report (also written to ``out_dir``).

    Simulated sites keep their privacy ledgers under ``state_dir``, one folder per site. By
    default that is ``out_dir/state``, started afresh for each run; pass a folder of your own to
    make ε accumulate across simulated runs, as it does at a real site. Flower's own log lines are
    shown only with ``verbose``; medfed's round-by-round log is always shown. ``resume`` continues
    the run checkpointed in ``out_dir`` (its sites' state kept).
    """
    from flwr.simulation import run_simulation

    from client.app import app as client_app

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if state_dir is None:
        state_dir = RunFolder(out_dir).site_states
        if not resume:
            shutil.rmtree(state_dir, ignore_errors=True)
    num_sites = len(simulated_site_names(config))
    if num_sites < config.run.min_sites:
        raise ValueError(f"the data has {num_sites} site(s) but run.min-sites = {config.run.min_sites}")
    if config.privacy.site_level:  # its settings refused here, before any site starts
        from medfed.site_level_dp import plan_for_config

        plan_for_config(config, num_sites)
    check_tracking(config)  # the package run.tracking needs, before any site starts
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result.update(run_federation(grid, config, out_dir, state_dir, resume=resume))

    _quiet_flower(verbose)
    scratch = Path(tempfile.mkdtemp(prefix="medfed-sim-"))
    env = {
        "FLWR_HOME": str(scratch / "flwr"),
        "RAY_TMPDIR": str(scratch / "ray"),
        "UV_CACHE_DIR": str(scratch / "uv"),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        SIMULATION_CACHE: str(scratch / "sites"),
    }
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": _gpu_share()},
                    "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": True},
                },
            )
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(scratch, ignore_errors=True)
    if not result:
        raise RuntimeError("the simulation ended without a report; see the log above for the site or server error")
    return result


def _quiet_flower(verbose: bool) -> None:
    """Keep Flower's records on its own console handler, errors only unless ``verbose``."""
    flower = logging.getLogger("flwr")
    flower.propagate = False
    for handler in flower.handlers:
        handler.setLevel(logging.DEBUG if verbose else logging.ERROR)


def _gpu_share() -> float:
    """Share one GPU between the simulated sites when there is one."""
    import torch

    return 0.5 if torch.cuda.is_available() else 0.0
