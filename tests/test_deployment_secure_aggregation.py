"""Secure aggregation over the real deployment (deploy/superlink.sh, deploy/site.sh, `flwr run` over
TLS on loopback): three SuperNodes with DP-SGD, one killed while it trains (after it shared its keys),
the round completes with the other two, and the round's model is the plain FedAvg of their updates.

Slow (several minutes on 2 CPU cores: each of the protocol's messages starts a ClientApp process,
and Flower reports the killed SuperNode only when its heartbeat expires, 2 x 30 s); runs with
``-m slow``. tests/test_secure_aggregation.py tests the same in-process in seconds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from medfed.config import load_config, parse_override
from medfed.federation import initial_model
from medfed.run_folder import RunFolder
from medfed.weights import load_checkpoint
from tests import test_deployment as _deployment_tests
from tests.conftest import REPO
from tests.test_deployment import CONNECTION, SITES, VENV_BIN, Deployment, _descendants, _pids_with_marker
from tests.test_deployment_faults import SITE_BUDGET, _sigkill, _start_sites, _stop, _wait_report, registered
from tests.test_secure_aggregation import _copies, _fedavg, _plain_updates

pytestmark = [*_deployment_tests.pytestmark, pytest.mark.slow, pytest.mark.usefixtures("task_identity")]

deployment = _deployment_tests.deployment
site_folders = _deployment_tests.site_folders
__all__ = ["registered"]  # the fixture, imported

OVERRIDES = (
    "run.rounds=1",
    "run.min-sites=2",
    "run.round-timeout=300",
    "run.site-wait=120",
    "run.secure-aggregation=true",
    "data.image-size=16",
    "train.local-epochs=1",
    "evaluation.cross-site=false",
    "evaluation.example-images=0",
)


def test_secure_aggregation_with_dp_survives_a_site_killed_while_training(
    registered: Deployment, site_folders: dict[str, Path], tmp_path: Path
) -> None:
    sites = _start_sites(registered, site_folders, "secagg")
    # copies of site-a's and site-b's state as it is before the run starts (each with its site secret drawn):
    # replayed below, their first request for round 1 is seeded as the sites' own was
    states = registered.base / "sites-secagg"
    nodes = {
        i: {"data-path": str(site_folders[name]), "site-name": name, "state-dir": str(states / name),
            "privacy-budget": float(SITE_BUDGET)}
        for i, name in enumerate(("site-a", "site-b"))
    }  # fmt: skip
    replay = _copies(nodes, tmp_path / "replay")
    out = registered.base / "out-secagg"
    run_config = (
        f'config-file="configs/classification-synthetic.toml" out-dir="{out}" overrides="{";".join(OVERRIDES)}"'
    )
    try:
        run = registered.start(
            "secagg-run", [str(VENV_BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream", "--run-config", run_config]
        )
        # site-c's ledger appears when it reserves the round's ε: it is training, its keys are shared
        ledger, deadline = registered.base / "sites-secagg" / "site-c" / "privacy.json", time.monotonic() + 600
        while not ledger.exists():
            assert run.alive() and time.monotonic() < deadline, "site-c never trained\n" + run.tail()
            time.sleep(0.2)
        victim = sites["site-c"]
        os.killpg(victim.popen.pid, signal.SIGKILL)
        _sigkill([*_descendants(victim.popen.pid), *_pids_with_marker(victim.marker)], victim.marker)
        report = _wait_report(registered, run, sites, out, dead=("site-c",))
        server_log = run.text()
    finally:
        _stop(list(sites.values()))

    entry = report["rounds"][1]
    assert report["protections"]["secure_aggregation"] is True and report["protections"]["sample_level_dp"] is True
    assert entry["sites_aggregated"] == ["site-a", "site-b"]
    assert entry["secure_aggregation"]["dropped"] == ["site-c"]
    assert "update norm" not in server_log  # no per-site update statistic in the server's log

    # the same two updates, trained again in-process from copies of the sites' state before the run
    config = load_config(REPO / "configs" / "classification-synthetic.toml", dict(parse_override(o) for o in OVERRIDES))
    updates = _plain_updates(replay, config, tmp_path)
    start = initial_model(config).state_dict()
    expected = _fedavg(start, list(updates.values()), config.run.max_update_norm)
    got = load_checkpoint(RunFolder(out).round_model(1))[0]
    for key in start:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=0, atol=2e-5)
    for path in out.rglob("*.safetensors"):  # only global models: no site's own trained weights
        stored = load_checkpoint(path)[0]
        for weights, _ in updates.values():
            assert max(float((stored[k].double() - weights[k].double()).abs().max()) for k in stored) > 1e-3
    assert set(SITES) >= set(report["sites"])
