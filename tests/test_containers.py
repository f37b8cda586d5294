"""deploy/Dockerfile.server and deploy/Dockerfile.site, built with podman and run as a federation.

The two images are built from this checkout (tagged ``localhost/medfed-server:test`` and
``localhost/medfed-site:test``); then a 2-site federation runs in containers as
deploy/compose.yaml lays it out: certificates and site keys made by the server image into a
volume, a SuperLink with TLS and SuperNode authentication, the coordinator's `flwr` CLI
registering the sites' keys and starting a 2-round DP run, and two sites, each with its data
mounted read-only and its privacy ledger in its own state volume. Every container runs as the
image's unprivileged user, with a read-only root file system, no capabilities and
no-new-privileges. All containers share the host's network and talk over 127.0.0.1 only.

Slow (the first build downloads about 1 GB of wheels; the federation takes minutes on 2 CPU
cores). Skipped, with the reason, where podman is missing, the base image cannot be had or a
container cannot start at all. Settings (environment):

- ``MEDFED_CONTAINER_BASE``: the ``BASE`` build argument (default ``python:3.11-slim-bookworm``,
  from Docker Hub); where Docker Hub cannot be reached, make one with deploy/make-base-image.sh.
- ``MEDFED_CONTAINER_BUILD_ARGS``: more `podman build` arguments, shell-quoted (a wheel folder or
  a package mirror and its CA, see deploy/README.md).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medfed.data import write_site
from medfed.data.synthetic import synthetic_site
from tests.conftest import REPO

pytestmark = pytest.mark.slow

PODMAN = shutil.which("podman")
BASE = os.environ.get("MEDFED_CONTAINER_BASE", "python:3.11-slim-bookworm")
SERVER, SITE = "localhost/medfed-server:test", "localhost/medfed-site:test"
SITES = ("hospital-1", "hospital-2")
CONNECTION = "containers"
USER = "10001"  # the images' unprivileged user
HARDENED = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
TINY_RUN = "run.rounds=2;run.min-sites=2;data.image-size=16;train.local-epochs=1;evaluation.cross-site=false;evaluation.example-images=0"  # fmt: skip


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert PODMAN is not None
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"podman {' '.join(args[:3])}... exited {result.returncode}\n{result.stderr[-3000:]}"
        )
    return result


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Both images, built from this checkout; skips where no container can be built or run here."""
    if PODMAN is None:
        pytest.skip("podman is not installed (Debian: apt-get install podman)")
    if _podman("image", "exists", BASE, check=False).returncode != 0:
        pulled = _podman("pull", BASE, timeout=600, check=False)
        if pulled.returncode != 0:
            pytest.skip(
                f"base image {BASE} cannot be pulled ({_last_line(pulled.stderr)}); make one from Debian packages "
                "with deploy/make-base-image.sh and set MEDFED_CONTAINER_BASE to its tag"
            )
    started = _podman("run", "--rm", BASE, "python3", "-c", "print('ok')", check=False)
    if started.returncode != 0:
        pytest.skip(f"podman cannot start a container here: {_last_line(started.stderr)} (see deploy/README.md)")
    extra = shlex.split(os.environ.get("MEDFED_CONTAINER_BUILD_ARGS", ""))
    for kind, tag in (("server", SERVER), ("site", SITE)):
        _podman("build", "--build-arg", f"BASE={BASE}", *extra, "-f", str(REPO / "deploy" / f"Dockerfile.{kind}"),
                "-t", tag, str(REPO), timeout=3600)  # fmt: skip
    return {"server": SERVER, "site": SITE}


def test_images_run_as_an_unprivileged_user_with_a_cpu_torch_and_no_simulation_engine(images: dict[str, str]) -> None:
    for tag in images.values():
        inspected = json.loads(_podman("image", "inspect", tag).stdout)[0]
        assert inspected["Config"]["User"] == "medfed", tag
        assert "/state" in inspected["Config"]["Volumes"], tag
        # 2.0-2.1 GB with torch's C++ tests and headers and Ray; 1.64 (site) and 1.73 GB (server) without
        assert inspected["Size"] < 1.85e9, f"{tag}: {inspected['Size'] / 1e9:.2f} GB"
        probe = _podman("run", "--rm", *HARDENED, "--entrypoint", "/opt/venv/bin/python", tag, "-c",
                        "import os, importlib.util, torch; "
                        "print(os.getuid(), torch.__version__, importlib.util.find_spec('ray') is None)")  # fmt: skip
        assert probe.stdout.split() == [USER, "2.13.0+cpu", "True"], probe.stdout + probe.stderr
    usage = _podman("run", "--rm", *HARDENED, images["site"], "--help")
    assert "--site-name" in usage.stdout
    # the entrypoint refuses to start a site without its settings, naming the missing one
    refused = _podman("run", "--rm", *HARDENED, images["site"], check=False)
    assert refused.returncode == 2 and "SITE_NAME" in refused.stderr, refused.stderr


@dataclass
class Federation:
    """Containers and volumes of one test federation, removed by name when it ends."""

    prefix: str = field(default_factory=lambda: f"medfed-test-{uuid.uuid4().hex[:8]}")
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def volume(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        _podman("volume", "create", full)
        self.volumes.append(full)
        return full

    def run(self, name: str, image: str, options: list[str], *command: str, timeout: float = 300) -> str:
        """Run a container to its end (``podman run --rm``); its output, or the test fails with its log."""
        full = f"{self.prefix}-{name}"
        self.containers.append(full)  # removed at the end even if the client times out
        result = _podman("run", "--rm", "--name", full, "--network", "host", *HARDENED, *options, image, *command,
                         timeout=timeout, check=False)  # fmt: skip
        assert result.returncode == 0, (
            f"{name} exited {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
        return result.stdout

    def start(self, name: str, image: str, options: list[str], *command: str) -> str:
        """Start a container in the background (``podman run -d``); its name."""
        full = f"{self.prefix}-{name}"
        self.containers.append(full)
        _podman("run", "-d", "--name", full, "--network", "host", *HARDENED, *options, image, *command)
        return full

    def logs(self, name: str) -> str:
        result = _podman("logs", "--tail", "40", name, check=False)
        return f"--- {name} ---\n{result.stdout}{result.stderr}"

    def running(self, name: str) -> bool:
        state = _podman("inspect", "--format", "{{.State.Running}}", name, check=False)
        return state.stdout.strip() == "true"

    def remove(self) -> None:
        for name in reversed(self.containers):
            _podman("rm", "--force", "--time", "10", name, check=False)
        for name in self.volumes:
            _podman("volume", "rm", "--force", name, check=False)


@pytest.fixture
def federation(images: dict[str, str]) -> Iterator[Federation]:
    made = Federation()
    try:
        yield made
    finally:
        made.remove()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(federation: Federation, superlink: str, port: int, ca: Path, timeout: float = 120) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        assert federation.running(superlink), "the SuperLink exited\n" + federation.logs(superlink)
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=context):
                return
        except OSError as error:
            assert time.monotonic() < deadline, f"SuperLink not healthy: {error}\n" + federation.logs(superlink)
            time.sleep(2)


def test_two_sites_federate_in_containers_over_tls_with_registered_site_keys(
    federation: Federation, images: dict[str, str], tmp_path: Path
) -> None:
    fed = federation
    certs, link_state, cli = fed.volume("certs"), fed.volume("superlink"), fed.volume("coordinator")
    site_args = [arg for name in SITES for arg in ("--site", name)]
    fed.run("certs", SERVER, ["-v", f"{certs}:/certs", "--entrypoint", "/opt/medfed/deploy/make-certificates.sh"],
            "--out", "/certs", "--san", "DNS:localhost", *site_args)  # fmt: skip
    ca = tmp_path / "ca.crt"
    ca.write_text(fed.run("ca", SERVER, ["-v", f"{certs}:/certs:ro", "--entrypoint", "cat"], "/certs/ca/ca.crt"))

    port = _free_port()
    superlink = fed.start("superlink", SERVER, ["-v", f"{certs}:/certs:ro", "-v", f"{link_state}:/state"],
                          "start", "--certs", "/certs/superlink", "--state", "/state", "--host", "127.0.0.1",
                          "--port", str(port))  # fmt: skip
    _wait_healthy(fed, superlink, port, ca)
    coordinator = ["-v", f"{certs}:/certs:ro", "-v", f"{cli}:/flwr", "--entrypoint", "/bin/sh"]
    register = " && ".join(
        [f"/opt/medfed/deploy/superlink.sh add-connection {CONNECTION} --address 127.0.0.1:{port} "
         "--ca /certs/ca/ca.crt --default"]
        + [f"/opt/medfed/deploy/superlink.sh register {CONNECTION} /certs/sites/{s}/{s}.pub --name {s}" for s in SITES]
    )  # fmt: skip
    fed.run("register", SERVER, coordinator, "-c", register)

    states, sites = {}, []
    for index, name in enumerate(SITES):
        folder = write_site(tmp_path / "data" / name, synthetic_site(index, 40, image_size=16, seed=index))
        states[name] = fed.volume(name)
        sites.append(fed.start(name, SITE, [
            "-v", f"{certs}:/certs:ro", "-v", f"{folder}:/data:ro", "-v", f"{states[name]}:/state",
            "-e", f"SITE_NAME={name}", "-e", f"SUPERLINK=127.0.0.1:{port}", "-e", "CA_CERT=/certs/ca/ca.crt",
            "-e", f"AUTH_KEY=/certs/sites/{name}/{name}.key", "-e", f"CLIENTAPP_PORT={_free_port()}",
            "-e", "PRIVACY_BUDGET=20", "-e", "ALLOWED_TASKS=classification",
        ]))  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        for site in sites:
            assert fed.running(site), "a site exited\n" + fed.logs(site)
        listed = fed.run("list", SERVER, coordinator, "-c", f"flwr supernode list {CONNECTION} --format json")
        nodes = json.loads(listed[listed.index("{") :])["nodes"]
        if sum(node["status"] == "online" for node in nodes) == len(SITES):
            break
        assert time.monotonic() < deadline, "the sites did not come online\n" + "".join(map(fed.logs, sites))
        time.sleep(3)

    run_config = f'config-file="configs/classification-synthetic.toml" out-dir="runs/containers" overrides="{TINY_RUN}"'
    fed.run("coordinator", SERVER, [*coordinator[:-2], "--workdir", "/opt/medfed", "--entrypoint", "flwr"],
            "run", "/opt/medfed", CONNECTION, "--stream", "--run-config", run_config, timeout=1800)  # fmt: skip
    read_state = ["-v", f"{link_state}:/state:ro", "--entrypoint", "cat"]
    deadline = time.monotonic() + 120  # the report lands just after the stream ends
    while True:
        found = _podman("run", "--rm", "--network", "none", *read_state, SERVER, "/state/runs/containers/report.json",
                        check=False)  # fmt: skip
        if found.returncode == 0:
            report = json.loads(found.stdout)
            break
        assert time.monotonic() < deadline, "no report.json\n" + fed.logs(superlink) + "".join(map(fed.logs, sites))
        time.sleep(3)

    assert report["sites"] == list(SITES)
    assert [entry["round"] for entry in report["rounds"]] == [0, 1, 2]
    assert all(entry["sites_aggregated"] == list(SITES) for entry in report["rounds"][1:])
    for name, site in zip(SITES, sites, strict=True):
        privacy = report["privacy"][name]
        assert 0 < privacy["epsilon"] <= 8.0 + 1e-6 and privacy["budget"] == 20.0
        # the site ran as the image's user, could not write to its data, and kept its ledger in the volume
        assert _podman("exec", site, "id", "-u").stdout.strip() == USER
        wrote = _podman("exec", site, "touch", "/data/written-by-the-site", check=False)
        assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, wrote.stderr
        kept = ["-v", f"{states[name]}:/state:ro", "--entrypoint", "/bin/sh"]
        ledger = json.loads(fed.run(f"{name}-ledger", SITE, kept, "-c", "cat /state/privacy.json"))
        assert ledger["history"], ledger  # the DP steps of this run, in the volume that outlives the container
        assert fed.run(f"{name}-uv", SITE, kept, "-c", "ls -A /state/uv-cache") == ""  # nothing installed at run time
