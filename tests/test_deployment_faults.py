"""Faults in the real deployment (deploy/superlink.sh, deploy/site.sh, `flwr run` over TLS on loopback):
a site that dies mid-run, a server that dies after round 1 and is resumed, a site that sends garbage.

The same faults are tested in-process in tests/test_fault_tolerance.py; here they go through Flower
1.42's real SuperLink, SuperNodes and ServerApp/ClientApp processes. Every test is slow (a few
minutes each on 2 CPU cores: every Flower message starts a ClientApp process that imports torch
and Opacus) and runs only with ``-m slow``.

The SuperLink, the certificates, the process helpers and the site folders (40 images of 16 px per
site) are those of tests/test_deployment.py, imported. Each federation here gets its own SuperNodes
with fresh state folders (a fresh privacy ledger), started with the sites' registered keys.
What Flower does when a process dies:

- a SuperNode killed with SIGKILL keeps its ``online`` status until its heartbeat expires
  (2 x its 30 s heartbeat interval); from then on the SuperLink answers every message to it with
  an error reply ("Node Unavailable"), which the server leaves out of the round, and no longer
  lists it among the run's nodes. The round waits at most that long, never ``run.round-timeout``.
- a ServerApp process killed with SIGKILL: ``flwr list`` shows the run ``running`` until its task's
  heartbeat expires (2 x 30 s; about 50 s after the kill here), then ``finished:failed`` ("No
  heartbeat received from the task"). SuperNodes then ignore the run's pending messages ("not in
  RUNNING status") and the SuperLink refuses their object pulls ("Run is finished"); the SuperNodes
  stay online. ``flwr stop`` on that run fails ("[code: 18] Run is already finished"); on a run
  still ``running`` it would stop it at once. A new ``flwr run`` with ``resume=true`` and the same
  ``out-dir`` continues from ``out-dir/checkpoints`` as a new run id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.run_folder import RunFolder
from medfed.weights import load_checkpoint
from tests import test_deployment as _deployment_tests
from tests.conftest import REPO
from tests.test_deployment import (
    CONNECTION,
    DEPLOY,
    SITES,
    VENV_BIN,
    Deployment,
    Proc,
    _alive,
    _descendants,
    _environ_marker,
    _free_port,
    _pids_with_marker,
)

pytestmark = [*_deployment_tests.pytestmark, pytest.mark.slow]

# The module-scoped fixtures of tests/test_deployment.py (this module gets its own SuperLink + CA).
deployment = _deployment_tests.deployment
site_folders = _deployment_tests.site_folders

ROUNDS = 2
ROUND_TIMEOUT = 180  # s: the most a round waits for a site (Flower reports a dead one sooner)
OVERRIDES = (
    f"run.rounds={ROUNDS}",
    "run.min-sites=2",
    f"run.round-timeout={ROUND_TIMEOUT}",
    "run.site-wait=120",
    "data.image-size=16",
    "train.local-epochs=1",
    "evaluation.cross-site=false",
    "evaluation.example-images=0",
)
RUN_DEADLINE = 900  # s for a whole federation
ONLINE_DEADLINE = 180  # s for the sites to come online
SITE_BUDGET = "8"  # ε: the run's own target ε; the round the resumed run repeats is not charged again


# ---------------------------------------------------------------- helpers


def _sigkill(pids: list[int], marker_prefix: str) -> None:
    for pid in pids:
        if _alive(pid) and (_environ_marker(pid) or "").startswith(marker_prefix):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _start_sites(
    deployment: Deployment, folders: dict[str, Path], tag: str, secrets_from: Path | None = None
) -> dict[str, Proc]:
    """The three sites as SuperNodes (deploy/site.sh) with fresh state folders under ``sites-TAG``;
    each gets the site secret (the seed of its local training) of ``secrets_from/NAME`` if given.
    Returns once all three are online."""
    sites = {}
    for name in SITES:
        state = deployment.base / f"sites-{tag}" / name
        state.mkdir(parents=True)
        if secrets_from is not None:
            shutil.copy(secrets_from / name / "site-secret", state / "site-secret")
        key = deployment.certs / "sites" / name / f"{name}.key"
        sites[name] = deployment.start(
            f"{tag}-{name}",
            [str(DEPLOY / "site.sh"), "--site-name", name, "--data", str(folders[name]), "--state", str(state),
             "--superlink", deployment.address, "--ca", str(deployment.certs / "ca" / "ca.crt"), "--key", str(key),
             "--port", str(_free_port()), "--privacy-budget", SITE_BUDGET, "--allowed-tasks", "classification"],
        )  # fmt: skip
    deadline = time.monotonic() + ONLINE_DEADLINE
    try:
        while sum(node["status"] == "online" for node in deployment.nodes()) < len(SITES):
            for site in sites.values():
                assert site.alive(), "a site exited\n" + site.tail()
            assert time.monotonic() < deadline, "the sites did not come online\n" + _tails(sites.values())
            time.sleep(2)
    except BaseException:
        _stop(list(sites.values()))
        raise
    return sites


def _stop(procs: list[Proc]) -> None:
    for proc in procs:
        proc.stop()


def _tails(procs: Iterable[Proc], chars: int = 3000) -> str:
    return "\n".join(proc.tail(chars) for proc in procs)


def _start_run(deployment: Deployment, name: str, out: Path, app: Path = REPO, resume: bool = False) -> Proc:
    run_config = (
        f'config-file="configs/classification-synthetic.toml" out-dir="{out}" overrides="{";".join(OVERRIDES)}"'
        f" resume={'true' if resume else 'false'}"
    )
    return deployment.start(
        name, [str(VENV_BIN / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", run_config]
    )


def _run_id(run: Proc, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while (found := re.search(r"Successfully started run (\d+)", run.text())) is None:
        assert run.alive() and time.monotonic() < deadline, "`flwr run` did not start a run\n" + run.tail()
        time.sleep(1)
    return int(found.group(1))


def _watch(deployment: Deployment, run: Proc, sites: dict[str, Proc], dead: tuple[str, ...] = ()) -> None:
    """Fail at once, with the logs, if a process that should be running has exited."""
    for name, site in sites.items():
        if name not in dead:
            assert site.alive(), f"{site.name} exited during the run\n" + site.tail() + "\n" + run.tail()
    assert deployment.superlink.alive(), "the SuperLink exited\n" + deployment.superlink.tail()


def _wait_for_file(
    deployment: Deployment, run: Proc, sites: dict[str, Proc], path: Path, timeout: float = RUN_DEADLINE
) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        _watch(deployment, run, sites)
        assert run.alive(), f"the run ended before {path.name} was written\n" + run.tail()
        assert time.monotonic() < deadline, f"no {path} after {timeout} s\n" + run.tail()
        time.sleep(0.5)


def _wait_report(
    deployment: Deployment, run: Proc, sites: dict[str, Proc], out: Path, dead: tuple[str, ...] = ()
) -> dict:
    """The run's report.json, once written; then the `flwr run --stream` exits with 0."""
    path, deadline = out / "report.json", time.monotonic() + RUN_DEADLINE
    while True:
        if path.exists():
            with contextlib.suppress(json.JSONDecodeError):  # still being written
                report = json.loads(path.read_text())
                break
        _watch(deployment, run, sites, dead)
        if not run.alive() and not path.exists():
            time.sleep(3)  # the report may land just after the stream ends
            assert path.exists(), "the run ended without a report\n" + run.tail() + deployment.superlink.tail()
        assert time.monotonic() < deadline, f"no report after {RUN_DEADLINE} s\n" + run.tail()
        time.sleep(2)
    assert run.wait(timeout=120) == 0, run.tail()
    return report


def _run_status(deployment: Deployment, run_id: int) -> str:
    result = deployment.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = json.loads(result.stdout[result.stdout.index("{") :])["runs"]
    return str(runs[0]["status"])


def _node_status(deployment: Deployment) -> list[str]:
    return sorted(node["status"] for node in deployment.nodes())


def _serverapp_pids(deployment: Deployment) -> list[int]:
    """The SuperLink's ServerApp processes (`flwr-serverapp`, started by its `flower-superexec`)."""
    found = []
    for pid in _pids_with_marker(deployment.superlink.marker):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(Path(arg.decode(errors="replace")).name == "flwr-serverapp" for arg in argv[:2]):
                found.append(pid)
    return found


def _global(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(RunFolder(out).global_model)[0]


def _mean_test_loss(report: dict) -> float:
    return float(np.mean([metrics["loss"] for metrics in report["final"]["per_site"].values()]))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def registered(deployment: Deployment) -> Deployment:
    """The deployment with the three sites' public keys registered."""
    for name in SITES:
        deployment.register(deployment.certs / "sites" / name / f"{name}.pub", name)
    return deployment


@dataclass
class CleanRun:
    report: dict
    out: Path
    states: Path  # STATE_DIR of each site, by name: their site-secret files


@pytest.fixture(scope="module")
def clean_run(registered: Deployment, site_folders: dict[str, Path]) -> CleanRun:
    """An uninterrupted run of the tests' config, all three sites honest: the reference."""
    sites = _start_sites(registered, site_folders, "clean")
    try:
        out = registered.base / "out-clean"
        run = _start_run(registered, "clean-run", out)
        report = _wait_report(registered, run, sites, out)
    finally:
        _stop(list(sites.values()))
    assert all(entry["sites_aggregated"] == list(SITES) for entry in report["rounds"][1:]), report["rounds"]
    return CleanRun(report, out, registered.base / "sites-clean")


# ---------------------------------------------------------------- tests


@pytest.mark.slow
def test_a_site_killed_mid_run_is_left_out_and_the_run_completes(
    registered: Deployment, site_folders: dict[str, Path]
) -> None:
    """SIGKILL site-c's SuperNode (its process group, and the ClientApp helpers Flower detached from
    it: the hospital's machine dies) as round 2 starts; the run finishes with site-a and site-b."""
    sites = _start_sites(registered, site_folders, "kill")
    try:
        out = registered.base / "out-kill"
        run = _start_run(registered, "kill-run", out)
        _wait_for_file(registered, run, sites, RunFolder(out).round_model(1))
        victim = sites["site-c"]
        killed_at = time.monotonic()
        os.killpg(victim.popen.pid, signal.SIGKILL)
        _sigkill([*_descendants(victim.popen.pid), *_pids_with_marker(victim.marker)], victim.marker)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        report = _wait_report(registered, run, sites, out, dead=("site-c",))
        finished_after = time.monotonic() - killed_at
        statuses = _node_status(registered)
    finally:
        _stop([*sites.values()])

    print(f"\n[site killed] round 2 took {report['rounds'][2]['seconds']:.0f} s; the run ended "
          f"{finished_after:.0f} s after the kill; SuperNode statuses then: {statuses}")  # fmt: skip
    assert [entry["round"] for entry in report["rounds"]] == [0, 1, 2]
    assert report["rounds"][1]["sites_aggregated"] == list(SITES)  # before the kill
    assert report["rounds"][2]["sites_aggregated"] == ["site-a", "site-b"]  # without the dead site
    assert set(report["rounds"][2]["metrics"]) == {"site-a", "site-b"}
    assert set(report["final"]["per_site"]) == {"site-a", "site-b"}
    # Flower reported the dead node (heartbeat expiry, 2 x 30 s) long before run.round-timeout.
    assert report["rounds"][2]["seconds"] < ROUND_TIMEOUT
    assert "Node Unavailable" in run.text()  # Flower's error reply for the dead node, logged by the server
    assert "site site-c failed" in run.text()  # named after the node it was sent to, not the SuperLink's id
    assert any("Node Unavailable" in note for note in report["site_notes"]["site-c"])
    assert "offline" in statuses  # site-c, once its heartbeat expired


@pytest.mark.slow
def test_a_server_killed_after_round_1_resumes_to_the_uninterrupted_runs_model(
    registered: Deployment, site_folders: dict[str, Path], clean_run: CleanRun
) -> None:
    """SIGKILL the ServerApp process (and stop `flwr run`) once round 1 is checkpointed; a new `flwr run`
    with resume=true and the same out-dir finishes rounds 1..R and ends with the model of an
    uninterrupted run whose sites hold the same site secrets (same training seeds)."""
    sites = _start_sites(registered, site_folders, "crash", secrets_from=clean_run.states)
    observed: list[str] = []
    try:
        out = registered.base / "out-crash"
        run = _start_run(registered, "crash-run", out)
        run_id = _run_id(run)
        progress = RunFolder(out).progress
        _wait_for_file(registered, run, sites, progress)
        assert json.loads(progress.read_text())["round"] == 1
        assert RunFolder(out).round_model(1).is_file()

        serverapps = _serverapp_pids(registered)
        assert serverapps, "no flwr-serverapp process found\n" + registered.superlink.tail()
        killed_at = time.monotonic()
        _sigkill(
            [pid for p in serverapps for pid in (p, *_descendants(p))], registered.superlink.marker
        )  # fmt: skip
        run.stop()  # the coordinator's `flwr run --stream` goes too
        observed.append(
            f"after SIGKILL of flwr-serverapp {serverapps}: run {run_id} is {_run_status(registered, run_id)}"
        )

        # How Flower 1.42 notices: the run's task stops sending heartbeats and its token expires.
        deadline, status = killed_at + 150, "running"
        while status.startswith("running") and time.monotonic() < deadline:
            time.sleep(5)
            status = _run_status(registered, run_id)
        observed.append(f"{time.monotonic() - killed_at:.0f} s after the kill: run {run_id} is {status}")
        stopped = registered.flwr("stop", str(run_id), CONNECTION)
        observed.append(
            f"`flwr stop {run_id}` -> exit {stopped.returncode}: {(stopped.stdout + stopped.stderr).strip()[-300:]}"
        )
        observed.append(
            f"then run {run_id} is {_run_status(registered, run_id)}; SuperNodes {_node_status(registered)}"
        )
        assert not _run_status(registered, run_id).startswith("running")
        assert not _serverapp_pids(registered)
        assert json.loads(progress.read_text())["round"] == 1  # nothing after round 1 was checkpointed

        resumed_run = _start_run(registered, "resume-run", out, resume=True)
        report = _wait_report(registered, resumed_run, sites, out)
    finally:
        print("\n[server killed]\n" + "\n".join(observed))
        _stop([*sites.values()])

    assert report["resumed_after_round"] == 1
    assert [entry["round"] for entry in report["rounds"]] == list(range(ROUNDS + 1))
    assert all(entry["sites_aggregated"] == list(SITES) for entry in report["rounds"][1:])
    clean, resumed = _global(clean_run.out), _global(out)
    assert clean.keys() == resumed.keys()
    worst = max(float((clean[k].double() - resumed[k].double()).abs().max()) for k in clean)
    print(f"largest difference from the uninterrupted run's model: {worst:.2e}")
    assert all(torch.allclose(clean[k].float(), resumed[k].float(), rtol=0, atol=1e-5) for k in clean)
    for site, metrics in clean_run.report["final"]["per_site"].items():
        assert report["final"]["per_site"][site] == pytest.approx(metrics, abs=1e-4, nan_ok=True)


TAMPER_ANCHOR = "        return refusal or handle_train(msg, node_config, context.run_id)\n"
TAMPER = """        reply = refusal or handle_train(msg, node_config, context.run_id)
        # MEDFED-TEST-TAMPER: a faulty site-c, x1e6 in odd rounds and NaN in even ones.
        if str(context.node_config.get("site-name")) == "site-c" and "arrays" in reply.content.array_records:
            import torch
            from flwr.app import ArrayRecord

            server_round = int(msg.content["config"].get("server-round", 1))
            state = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord(
                {
                    key: (value * 1e6 if server_round % 2 else torch.full_like(value, float("nan")))
                    if value.is_floating_point()
                    else value
                    for key, value in state.items()
                }
            )
        return reply
"""


@pytest.mark.slow
def test_a_site_sending_huge_or_nan_updates_is_left_out(
    registered: Deployment, site_folders: dict[str, Path], clean_run: CleanRun, tmp_path: Path
) -> None:
    """site-c multiplies its trained weights by 1e6 (round 1) or sends NaN (round 2): the server
    rejects its update every round and the run ends close to the clean run.

    There is no test hook in medfed: the faulty site is a patched copy of the app, and the sites
    run the patched code only because `flwr run` bundled it from that copy into the FAB it sent to
    them. This also shows that the code a site runs is the code the coordinator bundles (see
    deploy/README.md, "The code that runs at a site is the code the coordinator sends")."""
    app = tmp_path / "app"
    shutil.copytree(
        REPO,
        app,
        ignore=shutil.ignore_patterns(
            ".venv", "runs", ".git", "tests", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"
        ),
    )
    handlers = app / "medfed" / "site_worker.py"
    source = handlers.read_text()
    assert TAMPER_ANCHOR in source, "medfed/site_worker.py changed: update TAMPER_ANCHOR"
    handlers.write_text(source.replace(TAMPER_ANCHOR, TAMPER))

    sites = _start_sites(registered, site_folders, "tamper")
    try:
        out = registered.base / "out-tamper"
        run = _start_run(registered, "tamper-run", out, app=app)
        report = _wait_report(registered, run, sites, out)
    finally:
        _stop([*sites.values()])

    assert [entry["round"] for entry in report["rounds"]] == list(range(ROUNDS + 1))
    assert all(entry["sites_aggregated"] == ["site-a", "site-b"] for entry in report["rounds"][1:])
    assert set(report["final"]["per_site"]) == set(SITES)  # site-c still evaluates the global model
    log = run.text()  # the ServerApp's log, streamed by `flwr run --stream`
    assert "round 1: reply left out: update from site site-c rejected: update norm" in log, run.tail()
    assert "round 2: reply left out: update from site site-c rejected: tensor" in log and "NaN or Inf" in log
    tampered, clean = _mean_test_loss(report), _mean_test_loss(clean_run.report)
    print(f"\n[bad updates] mean final test loss {tampered:.4f}, clean run {clean:.4f}")
    assert np.isfinite(tampered)
    assert tampered == pytest.approx(clean, rel=0.10)
    # The code site-c ran came from the FAB: the patched handlers are in its FLWR_HOME/apps.
    installed = list(
        (registered.base / "sites-tamper" / "site-c" / "flwr-home" / "apps").rglob("medfed/site_worker.py")
    )
    assert installed and all("MEDFED-TEST-TAMPER" in path.read_text() for path in installed)
