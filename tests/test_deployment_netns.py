"""The deployment happy path with each hospital on its own network: every site's SuperNode runs in
its own Linux network namespace, joined to the coordinator's host by a veth pair (10.231.N.0/30),
and reaches the SuperLink only at that link's address, over TLS with node authentication.

Needs root and ``ip netns`` (skipped otherwise; tests/test_deployment.py then runs the same
federation over loopback instead). About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfed.data import write_site
from medfed.data.synthetic import synthetic_site
from tests.test_deployment import (
    DEPLOY,
    SITES,
    TINY_RUN,
    Deployment,
    coordinator,
    netns_available,
)

NETNS = netns_available()
pytestmark = pytest.mark.skipif(not NETNS, reason="network namespaces need root and `ip netns`")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


class SiteNetwork:
    """One namespace per site, each linked to the host by a veth pair: host 10.231.N.1, site 10.231.N.2."""

    def __init__(self, count: int) -> None:
        tag = uuid.uuid4().hex[:4]
        self.namespaces = [f"medfed-{tag}-{i}" for i in range(count)]
        self.host_links = [f"mfh{tag}{i}" for i in range(count)]
        self.host_addresses = [f"10.231.{i + 1}.1" for i in range(count)]
        for i, (ns, link) in enumerate(zip(self.namespaces, self.host_links, strict=True)):
            peer = f"mfs{tag}{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("addr", "add", f"{self.host_addresses[i]}/30", "dev", link)
            _ip("link", "set", link, "up")
            _ip("-n", ns, "addr", "add", f"10.231.{i + 1}.2/30", "dev", peer)
            _ip("-n", ns, "link", "set", peer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # the SuperNode's own runtime port is on its loopback

    def remove(self) -> None:
        for ns, link in zip(self.namespaces, self.host_links, strict=True):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=20)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def networked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, SiteNetwork]]:
    base = tmp_path_factory.mktemp("netns-deployment")
    network = SiteNetwork(len(SITES))
    try:
        sans = [f"IP:{address}" for address in network.host_addresses]
        with coordinator(base, SITES, sans, host="0.0.0.0") as deployment:
            yield deployment, network
    finally:
        network.remove()


def test_three_sites_on_their_own_networks_federate_over_tls(
    networked: tuple[Deployment, SiteNetwork], tmp_path: Path
) -> None:
    deployment, network = networked
    sites = []
    for index, name in enumerate(SITES):
        data = write_site(tmp_path / name, synthetic_site(index, 40, image_size=16, seed=index))
        deployment.register(deployment.certs / "sites" / name / f"{name}.pub", name)
        cmd = [
            "ip", "netns", "exec", network.namespaces[index], str(DEPLOY / "site.sh"),
            "--site-name", name, "--data", str(data), "--state", str(deployment.base / "sites" / name),
            "--superlink", f"{network.host_addresses[index]}:{deployment.port}",
            "--ca", str(deployment.certs / "ca" / "ca.crt"),
            "--key", str(deployment.certs / "sites" / name / f"{name}.key"),
            "--port", "9094",  # each namespace has its own loopback: the same port at every site
            "--privacy-budget", "20", "--allowed-tasks", "classification",
        ]  # fmt: skip
        sites.append(deployment.start(name, cmd))
    deployment.wait_online(sites)
    # one round: the network path is what this test adds to tests/test_deployment.py's two-round run
    one_round = ["run.rounds=1", *(item for item in TINY_RUN if not item.startswith("run.rounds="))]
    report = deployment.run_to_report(sites, deployment.base / "run-out", one_round)
    assert report["sites"] == list(SITES)
    assert [entry["round"] for entry in report["rounds"]] == [0, 1]
    assert all(entry["sites_aggregated"] == list(SITES) for entry in report["rounds"][1:])
    # one message per site per round: round 1's request carries the model once, to be scored (round 0's
    # figures) and then trained from; round 0 itself sends nothing
    assert report["rounds"][0]["bytes_down"] == 0 < report["rounds"][1]["bytes_down"]
    for name in SITES:
        assert 0 < report["privacy"][name]["epsilon"] <= 8.0 + 1e-6 and report["privacy"][name]["budget"] == 20.0
