"""The site worker (medfed.site_worker): one long-lived process answers a deployed site's messages."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medfed import site_worker, wire
from medfed.tasks import get_task
from medfed.weights import model_to_arrays
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def node(site_dir: Path, tmp_path: Path) -> Iterator[dict]:
    """A deployed site's node config; every worker it started is stopped afterwards."""
    config = {"data-path": str(site_dir), "site-name": "hospital-a", "state-dir": str(tmp_path / "state")}
    yield config
    pid_file = site_worker.socket_path(config).parent / site_worker.PID_NAME
    if pid_file.is_file():
        _stop(int(pid_file.read_text()))


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_gone(pid)


def _gone(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # a worker this test process started (and must reap)
            return True
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


def _request(config, message_type: str, **extra) -> Message:
    arrays = model_to_arrays(get_task(config.run.task).build_model(config))
    record = ConfigRecord({wire.MEDFED_CONFIG: config.to_json(), wire.STATE_ROOT: "/nonexistent", **extra})
    return Message(
        content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: record}), dst_node_id=1, message_type=message_type
    )


def _context(node: dict) -> Context:
    return Context(7, 1, node, RecordDict(), {})


@pytest.mark.slow  # the worker imports torch and MONAI: about a minute on 2 busy cores
def test_one_worker_answers_every_message_and_rereads_changed_data(node: dict, site_dir: Path) -> None:
    config = tiny_config(**{"run.rounds": 1})
    me = os.getpid()
    reply = site_worker.forward(_request(config, MessageType.EVALUATE, split="val"), _context(node), parent=me)
    assert reply.content["site"]["status"] == "ok", dict(reply.content["site"])
    val_before = reply.content["metrics"]["num-examples"]
    pid = site_worker.ping(node, parent=me)["pid"]
    reply = site_worker.forward(_request(config, MessageType.TRAIN), _context(node), parent=me)
    assert reply.content["site"]["status"] == "ok", dict(reply.content["site"])
    assert reply.content["metrics"]["num-examples"] == 42 and reply.content["metrics"]["epsilon"] > 0
    assert "arrays" in reply.content

    manifest = site_dir / "manifest.csv"  # the hospital drops its first validation image
    lines = manifest.read_text().splitlines()
    first_val = next(i for i, line in enumerate(lines) if line.endswith(",val") or ",val," in line)
    manifest.write_text("\n".join(lines[:first_val] + lines[first_val + 1 :]) + "\n")
    reply = site_worker.forward(_request(config, MessageType.EVALUATE, split="val"), _context(node), parent=me)
    assert reply.content["metrics"]["num-examples"] == val_before - 1  # not the worker's old copy

    answer = site_worker.ping(node, parent=me)
    assert answer == {"pid": pid, "served": 3}  # one process answered all three messages
    path = site_worker.socket_path(node)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_killed_worker_is_replaced_by_the_next_message(node: dict) -> None:
    first = site_worker.ping(node, parent=os.getpid())["pid"]
    os.kill(first, signal.SIGKILL)
    assert _wait_gone(first)
    second = site_worker.ping(node, parent=os.getpid())["pid"]
    assert second != first and not _gone(second)


def test_the_worker_exits_when_idle(node: dict) -> None:
    node["site-worker-idle-minutes"] = 0.02  # 1.2 s
    pid = site_worker.ping(node, parent=os.getpid())["pid"]
    assert _wait_gone(pid, 15)
    assert not site_worker.socket_path(node).exists()


def test_the_worker_exits_with_its_supernode_and_serves_no_other(node: dict) -> None:
    supernode = subprocess.Popen(["sleep", "60"])
    try:
        pid = site_worker.ping(node, parent=supernode.pid)["pid"]
        other = site_worker.ping(node, parent=os.getpid())["pid"]  # another SuperNode: the first retires
        assert other != pid and _wait_gone(pid)
        third = site_worker.ping(node, parent=supernode.pid)["pid"]
    finally:
        supernode.kill()
        supernode.wait()
    assert _wait_gone(third, 15)


def test_an_unusable_socket_path_falls_back_to_this_process(
    node: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node["state-dir"] = str(tmp_path / ("x" * 60) / ("y" * 60) / "state")  # beyond a socket path's 108 bytes
    config = tiny_config(**{"run.rounds": 1})
    with caplog.at_level(logging.WARNING, logger="medfed.site_worker"):
        reply = site_worker.forward(_request(config, MessageType.EVALUATE, split="val"), _context(node))
    assert reply.content["site"]["status"] == "ok"
    assert len([r for r in caplog.records if "handling the message in this process" in r.getMessage()]) == 1
    assert not site_worker.socket_path(node).parent.exists()


@pytest.mark.parametrize(
    ("key", "value"), [("site-worker", "yes"), ("site-worker-idle-minutes", 0), ("site-worker-idle-minutes", "nan")]
)
def test_bad_worker_settings_are_an_error_reply_naming_the_key(node: dict, key: str, value: object) -> None:
    node[key] = value
    with pytest.raises(ValueError, match=key):
        site_worker.worker_settings(node)
    reply = site_worker.forward(_request(tiny_config(), MessageType.EVALUATE, split="val"), _context(node))
    assert reply.content["site"]["status"] == "error" and key in reply.content["site"]["reason"]
    assert str(node["data-path"]) not in reply.content["site"]["reason"]


def test_a_site_without_the_worker_answers_in_process(node: dict) -> None:
    node["site-worker"] = False
    reply = site_worker.forward(_request(tiny_config(), MessageType.EVALUATE, split="val"), _context(node))
    assert reply.content["site"]["status"] == "ok"
    assert not site_worker.socket_path(node).parent.exists()


def test_the_worker_tells_its_own_user_from_others(monkeypatch: pytest.MonkeyPatch) -> None:
    mine, peer = socket.socketpair()
    with mine, peer:
        assert site_worker._same_user(mine)  # SO_PEERCRED: the peer's uid is this process's
        other = os.getuid() + 1
        monkeypatch.setattr(site_worker.os, "getuid", lambda: other)
        assert not site_worker._same_user(mine)
