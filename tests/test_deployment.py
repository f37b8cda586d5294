"""The deployment, as real processes on loopback: deploy/make-certificates.sh, deploy/superlink.sh
(TLS + SuperNode authentication) and deploy/site.sh (SuperNodes), then `flwr run` of a tiny job.

Fast tests: certificates and keys, a SuperLink that refuses to start without certificates, an
unregistered SuperNode key refused, a SuperNode that does not trust the federation CA unable to
connect. The happy path (about 5 minutes on 2 CPU cores: every message starts a ClientApp process
that imports torch + Opacus) runs by default too: a 3-site, 2-round DP federation through the
deployment scripts.

Every process runs in its own session with a marker in its environment; teardown stops each one
by id (SIGTERM, then SIGKILL), including the helper processes Flower detaches.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
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

DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
MARKER = "MEDFED_DEPLOYMENT_TEST"
SESSION = uuid.uuid4().hex[:12]
SITES = ("site-a", "site-b", "site-c")
CONNECTION = "medfed-test"
TINY_RUN = [  # overrides of configs/classification-synthetic.toml for a federation of minutes
    "run.rounds=2",
    "run.min-sites=3",
    "data.image-size=16",
    "train.local-epochs=1",
    "evaluation.cross-site=false",
    "evaluation.example-images=0",
]

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (needed for the TLS CA)"),
    pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed (SuperNode keys)"),
    pytest.mark.skipif(
        not (VENV_BIN / "flower-superlink").exists(), reason=f"flower-superlink not found next to {sys.executable}"
    ),
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="process clean-up reads /proc (Linux)"),
]


# ---------------------------------------------------------------- processes


def _environ_marker(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(MARKER.encode() + b"="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


def _pids_with_marker(prefix: str) -> list[int]:
    own = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != own:
            marker = _environ_marker(int(entry.name))
            if marker is not None and marker.startswith(prefix):
                found.append(int(entry.name))
    return found


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children, found, todo = _children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop_pids(pids: list[int], marker_prefix: str, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` s, SIGKILL: only processes that still carry our marker."""
    ours = [pid for pid in pids if (_environ_marker(pid) or "").startswith(marker_prefix)]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in ours):
        time.sleep(0.2)
    for pid in ours:
        if _alive(pid) and (_environ_marker(pid) or "").startswith(marker_prefix):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class Proc:
    """A process in its own session, logging to a file; ``stop`` ends it and everything it started."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> None:
        self.name = name
        self.log = log
        self.marker = f"{SESSION}/{name}/{uuid.uuid4().hex[:8]}"
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**env, MARKER: self.marker},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 5000) -> str:
        return f"--- {self.name} ({self.log}) ---\n{self.text()[-chars:]}"

    def stop(self, grace: float = 15.0) -> None:
        # Flower detaches some helpers (flower-superexec runs in a new session): find them by
        # parentage and by the marker in their environment, then stop them by id.
        pids = {self.popen.pid, *_descendants(self.popen.pid), *_pids_with_marker(self.marker)}
        _stop_pids(sorted(pids), self.marker, grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        leftovers = _pids_with_marker(self.marker)
        if leftovers:
            _stop_pids(leftovers, self.marker, 2.0)
        self._out.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """A short command (a CLI call), in its own session, never longer than ``timeout``."""
    marker = f"{SESSION}/cmd/{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**env, MARKER: marker},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_pids([proc.pid, *_descendants(proc.pid), *_pids_with_marker(marker)], marker, 2.0)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"{cmd} took more than {timeout} s\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---------------------------------------------------------------- the deployment


@dataclass
class Deployment:
    base: Path
    certs: Path
    port: int
    env: dict[str, str]
    superlink: Proc
    procs: list[Proc] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run([str(VENV_BIN / "flwr"), *args], self.env, timeout=timeout)

    def register(self, public_key: Path, name: str) -> None:
        result = _run([str(DEPLOY / "superlink.sh"), "register", CONNECTION, str(public_key), "--name", name], self.env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "registered successfully" in result.stdout

    def nodes(self) -> list[dict]:
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout[result.stdout.index("{") :])["nodes"]

    def start(self, name: str, cmd: list[str]) -> Proc:
        proc = Proc(name, cmd, self.base / "logs" / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc

    def wait_online(self, sites: list[Proc], timeout: float = 180) -> None:
        """Until every one of ``sites`` is listed online by the SuperLink; fails at once if one exits."""
        deadline = time.monotonic() + timeout
        while sum(node["status"] == "online" for node in self.nodes()) < len(sites):
            for site in sites:
                assert site.alive(), "a site exited\n" + site.tail()
            assert time.monotonic() < deadline, "the sites did not come online\n" + "\n".join(s.tail() for s in sites)
            time.sleep(2)

    def run_to_report(self, sites: list[Proc], out: Path, overrides: list[str], timeout: float = 900) -> dict:
        """``flwr run`` a job of configs/classification-synthetic.toml; its report.json once written,
        after `flwr run --stream` has exited with 0."""
        run_config = (
            f'config-file="configs/classification-synthetic.toml" out-dir="{out}" overrides="{";".join(overrides)}"'
        )
        run = self.start("flwr-run", [str(VENV_BIN / "flwr"), "run", ".", CONNECTION, "--stream",
                                      "--run-config", run_config])  # fmt: skip
        report_path, report = out / "report.json", None
        deadline = time.monotonic() + timeout
        while report is None:
            if report_path.exists():
                try:
                    report = json.loads(report_path.read_text())
                    break
                except json.JSONDecodeError:
                    pass  # still being written
            for proc in (self.superlink, *sites):
                assert proc.alive(), f"{proc.name} exited during the run\n" + proc.tail() + "\n" + run.tail()
            if not run.alive() and not report_path.exists():
                time.sleep(2)  # the report may land just after the stream ends
                assert report_path.exists(), "the run ended without a report\n" + run.tail() + "\n" + sites[0].tail()
            assert time.monotonic() < deadline, f"no report after {timeout} s\n" + run.tail() + self.superlink.tail()
            time.sleep(2)
        assert run.wait(timeout=120) == 0, run.tail()
        return report

    def site(self, name: str, data: Path, key: Path, *extra: str) -> Proc:
        cmd = [
            str(DEPLOY / "site.sh"),
            "--site-name", name,
            "--data", str(data),
            "--state", str(self.base / "sites" / name),
            "--superlink", self.address,
            "--ca", str(self.certs / "ca" / "ca.crt"),
            "--key", str(key),
            "--port", str(_free_port()),
            *extra,
        ]  # fmt: skip
        return self.start(name, cmd)


def _wait_healthy(superlink: Proc, port: int, ca: Path, timeout: float = 90) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not superlink.alive():
            raise AssertionError("the SuperLink exited\n" + superlink.tail())
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the SuperLink was not healthy after {timeout} s\n" + superlink.tail())


def deployment_env(base: Path) -> dict[str, str]:
    """The environment of every deployment process: the coordinator's flwr CLI home, caches and temp
    folders under ``base``, Flower's telemetry and update check off, the venv first on PATH."""
    return {
        **os.environ,
        "FLWR_HOME": str(base / "coordinator-flwr-home"),
        "UV_CACHE_DIR": str(base / "uv-cache"),
        "RAY_TMPDIR": str(base / "ray-tmp"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "VENV_BIN": str(VENV_BIN),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@contextlib.contextmanager
def coordinator(
    base: Path, sites: list[str], sans: list[str], host: str = "127.0.0.1", cert_timeout: float = 120
) -> Iterator[Deployment]:
    """A coordinator as the deploy scripts set it up: certificates for ``sites`` (server names
    ``sans``), the SuperLink on ``host`` with TLS and site authentication, and the default flwr
    connection to it. On exit every process the deployment started, then the SuperLink and
    anything else left of this test session, is stopped."""
    (base / "logs").mkdir(parents=True, exist_ok=True)
    env = deployment_env(base)
    certs = base / "certs"
    san_args = [arg for san in sans for arg in ("--san", san)]
    made = _run([str(DEPLOY / "make-certificates.sh"), "--out", str(certs), *san_args, "--site", *sites], env,
                timeout=cert_timeout)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    port = _free_port()
    superlink = Proc(
        "superlink",
        [str(DEPLOY / "superlink.sh"), "start", "--certs", str(certs / "superlink"), "--state",
         str(base / "superlink"), "--host", host, "--port", str(port)],
        base / "logs" / "superlink.log",
        env,
    )  # fmt: skip
    deployment = Deployment(base, certs, port, env, superlink)
    try:
        _wait_healthy(superlink, port, certs / "ca" / "ca.crt")
        added = _run([str(DEPLOY / "superlink.sh"), "add-connection", CONNECTION, "--address", deployment.address,
                      "--ca", str(certs / "ca" / "ca.crt"), "--default"], env)  # fmt: skip
        assert added.returncode == 0, added.stdout + added.stderr
        yield deployment
    finally:
        for proc in deployment.procs:
            proc.stop()
        superlink.stop()
        leftovers = _pids_with_marker(SESSION)
        if leftovers:
            _stop_pids(leftovers, SESSION, 5.0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("deployment")
    with coordinator(base, [*SITES, "intruder", "probe"], ["IP:127.0.0.1"], cert_timeout=60) as started:
        yield started


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small synthetic hospitals (40 images of 16 px each), written as real site folders."""
    root = tmp_path_factory.mktemp("hospitals")
    return {
        name: write_site(root / name, synthetic_site(index, 40, image_size=16, seed=index))
        for index, name in enumerate(SITES)
    }


# ---------------------------------------------------------------- fast tests


def test_certificates_keys_and_no_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    cmd = [str(DEPLOY / "make-certificates.sh"), "--out", str(out), "--san", "IP:10.1.2.3", "--san",
           "DNS:fl.hospital.org", "--site", "hospital-a", "hospital-b"]  # fmt: skip
    made = _run(cmd, dict(os.environ), timeout=60)
    assert made.returncode == 0, made.stderr
    for key in (out / "ca/ca.key", out / "superlink/server.key", out / "sites/hospital-a/hospital-a.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    text = subprocess.run(
        ["openssl", "x509", "-in", str(out / "superlink/server.crt"), "-noout", "-text"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    for san in ("IP Address:10.1.2.3", "DNS:fl.hospital.org", "IP Address:127.0.0.1", "DNS:localhost"):
        assert san in text
    verified = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(out / "ca/ca.crt"), str(out / "superlink/server.crt")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    public = (out / "sites/hospital-a/hospital-a.pub").read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ")
    assert (out / "sites/hospital-a/hospital-a.key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (out / "sites/hospital-a/ca.crt").read_bytes() == (out / "ca/ca.crt").read_bytes()

    ca_before, key_before = (out / "ca/ca.key").read_bytes(), (out / "sites/hospital-a/hospital-a.key").read_bytes()
    again = _run(cmd, dict(os.environ), timeout=60)
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr
    assert (out / "sites/hospital-a/hospital-a.key").read_bytes() == key_before
    forced = _run([*cmd, "--force"], dict(os.environ), timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert (out / "sites/hospital-a/hospital-a.key").read_bytes() != key_before
    assert (out / "ca/ca.key").read_bytes() == ca_before  # the CA is reused, never replaced

    at_site = tmp_path / "at-site"  # a hospital makes its own key pair: no CA, no TLS certificate
    keys_only = _run([str(DEPLOY / "make-certificates.sh"), "--out", str(at_site), "--keys-only", "--site", "h"],
                     dict(os.environ), timeout=60)  # fmt: skip
    assert keys_only.returncode == 0, keys_only.stderr
    assert sorted(p.name for p in at_site.rglob("*") if p.is_file()) == ["h.key", "h.pub"]


def test_superlink_refuses_to_start_without_certificates(tmp_path: Path) -> None:
    result = _run([str(DEPLOY / "superlink.sh"), "start", "--state", str(tmp_path / "state")], dict(os.environ))
    assert result.returncode == 2
    assert "--certs DIR is required" in result.stderr


def test_unregistered_supernode_is_refused(deployment: Deployment, site_folders: dict[str, Path]) -> None:
    online_before = sum(node["status"] == "online" for node in deployment.nodes())
    intruder = deployment.site(
        "intruder", site_folders["site-a"], deployment.certs / "sites" / "intruder" / "intruder.key"
    )
    code = intruder.wait(timeout=90)
    assert code is not None, "the unregistered SuperNode was not refused within 90 s\n" + intruder.tail()
    assert code != 0
    assert "Failed to activate SuperNode" in intruder.text(), intruder.tail()
    assert sum(node["status"] == "online" for node in deployment.nodes()) == online_before


@pytest.fixture(scope="module")
def probe_key(deployment: Deployment) -> Path:
    """A registered key: refusals that use it come from TLS, not from node authentication."""
    key = deployment.certs / "sites" / "probe" / "probe.key"
    deployment.register(key.with_suffix(".pub"), "probe")
    return key


@pytest.mark.parametrize("trust", ["system-cas", "other-ca"])
def test_supernode_that_does_not_trust_the_ca_cannot_connect(
    deployment: Deployment, probe_key: Path, tmp_path: Path, trust: str
) -> None:
    """Without --root-certificates (system CAs) or with another CA: the TLS handshake fails."""
    roots: list[str] = []
    if trust == "other-ca":
        other = tmp_path / "other"
        made = _run([str(DEPLOY / "make-certificates.sh"), "--out", str(other)], deployment.env, timeout=60)
        assert made.returncode == 0, made.stderr
        roots = ["--root-certificates", str(other / "ca" / "ca.crt")]
    node = deployment.start(
        f"no-ca-{trust}",
        [str(VENV_BIN / "flower-supernode"), *roots, "--superlink", deployment.address,
         "--auth-supernode-private-key", str(probe_key), "--node-config", 'site-name="probe"',
         "--port", str(_free_port()), "--max-retries", "1", "--max-wait-time", "20"],
    )  # fmt: skip
    code = node.wait(timeout=90)
    assert code is not None, "the SuperNode kept running without a trusted connection\n" + node.tail()
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in node.text(), node.tail()


# ---------------------------------------------------------------- a real federation


def netns_available() -> bool:
    """Whether this process may create network namespaces (root and the ``ip`` tool)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"mfprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=20)
    if made.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return True


@pytest.mark.skipif(
    netns_available(), reason="tests/test_deployment_netns.py runs this federation with each site on its own network"
)
def test_three_sites_federate_over_tls(deployment: Deployment, site_folders: dict[str, Path]) -> None:
    for name in SITES:
        deployment.register(deployment.certs / "sites" / name / f"{name}.pub", name)
    sites = [
        deployment.site(name, site_folders[name], deployment.certs / "sites" / name / f"{name}.key",
                        "--privacy-budget", "20", "--allowed-tasks", "classification")
        for name in SITES
    ]  # fmt: skip
    deployment.wait_online(sites)
    report = deployment.run_to_report(sites, deployment.base / "run-out", TINY_RUN)

    assert report["sites"] == list(SITES)
    assert [entry["round"] for entry in report["rounds"]] == [0, 1, 2]
    assert all(entry["sites_aggregated"] == list(SITES) for entry in report["rounds"][1:])
    # One message per site per round: each round's request carries the model once, scored (the previous
    # round's figures) and then trained from; round 0 itself sends nothing (its scores come with round 1).
    down = [entry["bytes_down"] for entry in report["rounds"]]
    assert down[0] == 0 < down[1] == down[2]
    for name in SITES:
        privacy = report["privacy"][name]
        assert 0 < privacy["epsilon"] <= 8.0 + 1e-6  # DP stayed on: the run's target ε
        assert privacy["budget"] == 20.0  # the site's own node config (privacy-budget) was applied
        assert (deployment.base / "sites" / name / "privacy.json").exists()  # the ledger is in state-dir
        assert any((deployment.base / "sites" / name / "flwr-home" / "apps").iterdir())
    # Nothing was installed at run time: no uv cache at the SuperLink or the sites.
    for uv_cache in [deployment.base / "superlink" / "uv-cache", *(deployment.base / "sites").glob("*/uv-cache")]:
        assert not any(uv_cache.iterdir()), uv_cache
