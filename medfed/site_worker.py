"""A deployed site's long-lived worker: the ClientApp forwards every message to it.

Flower 1.42's SuperNode starts one ``flwr-clientapp`` process per message (both isolation modes),
so each message paid for the interpreter, torch, MONAI, the model's code and the site's data
cache again (benchmarks/deployment_overhead.py: most of a deployed round). The ClientApp
(:func:`forward`, which imports neither torch nor the site's code) hands each message to a
worker process per site that keeps them loaded:

- The worker listens on ``STATE_DIR/worker/site.sock`` (folder 0700, socket 0600) and answers
  only processes of its own user (``SO_PEERCRED``). It is started by the first message that
  finds none (detached; its log lines go where the SuperNode's go; its pid is in
  ``worker.pid``), and imports the site's code when the first message arrives.
- It runs the very handlers the ClientApp ran in-process (:func:`handle`), one message at a
  time, with the message's own node config and context state: the privacy ledger, approvals,
  seeds and secure aggregation's state are as before, and the site's data is re-read when its
  files change (the pre-flight cache's key, :func:`medfed.site.resolve_site`).
- It exits when idle for ``site-worker-idle-minutes`` (node config, default 30) and when the
  process that started its ClientApps (the SuperNode's executor) is gone; a worker started by
  another executor or for other code on disk retires, and the next message starts a new one.
- A worker that dies with a message in hand (or queued) is replaced and the message sent again,
  once. Whenever the worker cannot be used (``site-worker = false`` in the node config, a socket
  path too long for the system, a worker that does not start or dies twice), the message is
  handled in the ClientApp's own process, as before, with one log line saying why.

    python -m medfed.site_worker --socket PATH --parent PID --key KEY --idle-seconds S
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from medfed import packing, wire
from medfed.config import finite_number, node_state_dir

__all__ = ["IDLE_MINUTES", "WORKER_FOLDER", "forward", "handle", "serve", "socket_path", "worker_settings"]

log = logging.getLogger("medfed.site_worker")

WORKER_FOLDER = "worker"  # under the site's state folder: socket, pid file, start lock
SOCKET_NAME = "site.sock"
PID_NAME = "worker.pid"
IDLE_MINUTES = 30.0
MAX_IDLE_MINUTES = 7 * 24 * 60.0
START_SECONDS = 60.0  # how long a new worker may take to answer its first ping
MAX_FRAME = 1 << 34  # bytes of one frame (a model far larger than any this project trains)
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL (Linux)
_POLL_SECONDS = 1.0

Handler = Callable[[Message, Context], Message]


class WorkerUnavailable(Exception):
    """The worker cannot answer this message: it is handled in the ClientApp's process instead."""


def worker_settings(node_config: dict[str, Any]) -> tuple[bool, float]:
    """Whether this site uses a worker (``site-worker``, default true; a simulated site never
    does) and after how many idle seconds it exits (``site-worker-idle-minutes``).

    Raises:
        ValueError: a setting that is not a TOML boolean, or not a number of minutes in (0, 1 week].
    """
    enabled = node_config.get("site-worker", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"node config site-worker = {str(enabled)[:40]!r}: expected true or false")
    value = node_config.get("site-worker-idle-minutes", IDLE_MINUTES)
    minutes = finite_number(value)
    if minutes is None or not 0 < minutes <= MAX_IDLE_MINUTES:
        raise ValueError(
            f"node config site-worker-idle-minutes = {str(value)[:40]!r}: expected a number of minutes "
            f"> 0 and <= {MAX_IDLE_MINUTES:g}"
        )
    return enabled and "data-path" in node_config, minutes * 60


def socket_path(node_config: dict[str, Any]) -> Path:
    """Where the site's worker listens: ``STATE_DIR/worker/site.sock``."""
    return node_state_dir(node_config) / WORKER_FOLDER / SOCKET_NAME


def handle(msg: Message, context: Context) -> Message:
    """Answer ``msg`` as the site's ClientApp does (in the worker, or in-process as the fallback)."""
    return _handlers()[msg.metadata.message_type](msg, context)


def _handlers() -> dict[str, Handler]:
    """The site's handler of each message type; imports torch and the site's code (slow, once)."""
    from medfed import secure_aggregation  # noqa: PLC0415 - the heavy imports the ClientApp skips
    from medfed.site import handle_evaluate, handle_train  # noqa: PLC0415

    def train(msg: Message, context: Context) -> Message:
        node_config = dict(context.node_config)
        refusal = secure_aggregation.plain_training_refusal(msg, node_config)
        return refusal or handle_train(msg, node_config, context.run_id)

    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, dict(context.node_config))

    return {"train": train, "evaluate": evaluate, **secure_aggregation.SITE_HANDLERS}


# ---------------------------------------------------------------- the ClientApp's side


def forward(msg: Message, context: Context, parent: int | None = None) -> Message:
    """Answer ``msg`` through the site's worker (started if none is running), else in-process;
    a model travels as one array (:mod:`medfed.packing`): unpacked here, and the reply's packed.

    ``parent``: the process whose end stops the worker (default: this process's parent, the
    SuperNode's executor that starts one ClientApp process per message).
    """
    try:
        packing.unpack(msg)
    except ValueError as err:
        log.error("site cannot read the request: %s", err)
        site = str(context.node_config.get("site-name", "unknown"))
        return wire.encode_reply(msg, wire.SiteReply(site, wire.ERROR, f"the request is malformed: {err}"))
    reply = _forward(msg, context, parent)
    packing.pack(reply)
    return reply


def _forward(msg: Message, context: Context, parent: int | None) -> Message:
    """:func:`forward` of an unpacked message."""
    node_config = dict(context.node_config)
    try:
        enabled, idle_seconds = worker_settings(node_config)
    except ValueError as err:
        log.error("site refuses every message until this is fixed: %s", err)
        reason = (
            "this site's worker settings are broken (site-worker, site-worker-idle-minutes); details are in its log"
        )
        return wire.encode_reply(msg, wire.SiteReply(str(node_config.get("site-name", "unknown")), wire.ERROR, reason))
    if not enabled:
        return handle(msg, context)
    path = socket_path(node_config)
    key = _code_key(os.getppid() if parent is None else parent)
    try:
        header, frames = _exchange(path, key, idle_seconds, parent, msg, context)
    except WorkerUnavailable as err:
        log.warning("site worker unavailable (%s): handling the message in this process", err)
        return handle(msg, context)
    reply = message_from_proto(ProtoMessage.FromString(frames[0]))
    context.state = recorddict_from_proto(ProtoRecordDict.FromString(frames[1]))
    log.info("site worker (pid %s) answered a %s message", header.get("pid"), msg.metadata.message_type)
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    return Message(reply.content, reply_to=msg)


def ping(node_config: dict[str, Any], parent: int | None = None) -> dict[str, Any]:
    """Start the site's worker if needed and return its answer to a ping (``pid``, ``served``).

    Raises:
        WorkerUnavailable: the worker cannot be started or reached.
    """
    _, idle_seconds = worker_settings(node_config)
    key = _code_key(os.getppid() if parent is None else parent)
    return _exchange(socket_path(node_config), key, idle_seconds, parent, None, None)[0]


def _exchange(
    path: Path, key: str, idle_seconds: float, parent: int | None, msg: Message | None, context: Context | None
) -> tuple[dict[str, Any], list[bytes]]:
    """Send one request (``msg`` with ``context``, or a ping) to the worker at ``path``, starting
    a new worker when none answers or the one answering retires; its header and frames."""
    if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
        raise WorkerUnavailable(f"the socket path is longer than {_SOCKET_PATH_MAX} bytes")
    frames = [] if msg is None or context is None else _request_frames(msg, context)
    request = {"op": "ping" if msg is None else "handle", "key": key}
    for attempt in range(2):  # a worker that retires or dies (even idle, with this request queued) is replaced once
        conn = _connect_or_start(path, key, idle_seconds, parent)
        try:
            with conn:
                _send(conn, [json.dumps(request).encode(), *frames])
                header, *answer = _receive(conn)
        except (OSError, ValueError) as err:
            if attempt:
                raise WorkerUnavailable(f"the worker stopped answering: {err}") from err
            log.warning("site worker stopped answering (%s): starting another", err)
            continue
        reply = json.loads(header)
        if reply.get("retired"):
            log.info("site worker (pid %s) retired: it ran other code or for another SuperNode", reply.get("pid"))
            continue
        if reply.get("error"):
            raise WorkerUnavailable(f"the worker failed: {reply['error']}")
        return reply, answer
    raise WorkerUnavailable("a new worker retired at once")  # two SuperNodes or two code versions at one site


def _request_frames(msg: Message, context: Context) -> list[bytes]:
    return [message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString()]


def _connect_or_start(path: Path, key: str, idle_seconds: float, parent: int | None) -> socket.socket:
    """A connection to the worker at ``path``; one is started (by one ClientApp at a time: a lock
    file beside the socket) when none answers."""
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        with contextlib.suppress(OSError):
            return _connect(path)
        with open(folder / "start.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(OSError):
                return _connect(path)  # another ClientApp started it meanwhile
            worker = _start(path, key, idle_seconds, os.getppid() if parent is None else parent)
            deadline = time.monotonic() + START_SECONDS
            while True:
                try:
                    return _connect(path)
                except OSError:
                    if worker.poll() is not None:
                        raise WorkerUnavailable(f"the new worker exited with code {worker.returncode}") from None
                    if time.monotonic() > deadline:
                        raise WorkerUnavailable(f"no worker answered within {START_SECONDS:g} s") from None
                    time.sleep(0.05)
    except OSError as err:
        raise WorkerUnavailable(f"its folder is unusable: {err.strerror or err}") from err


def _connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.fspath(path))
    except OSError:
        conn.close()
        raise
    return conn


def _start(path: Path, key: str, idle_seconds: float, parent: int) -> subprocess.Popen[bytes]:
    """Start a detached worker with this process's interpreter and the medfed code it runs."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "medfed.site_worker", "--socket", os.fspath(path), "--parent", str(parent)]
    command += ["--key", key, "--idle-seconds", repr(idle_seconds)]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: S603


def _code_key(parent: int) -> str:
    """What a worker must share with the ClientApp to answer it: the interpreter, the medfed code on
    disk (paths, sizes, modification times) and the parent process (pid and start time)."""
    digest = hashlib.sha256(f"{sys.executable}|{parent}|{_start_time(parent)}".encode())
    package = Path(__file__).resolve().parent
    for file in sorted(package.rglob("*.py")):
        stat = file.stat()
        digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _start_time(pid: int) -> str:
    """A process's start time (``/proc``), to tell it from a later process with its pid; "" when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


# ---------------------------------------------------------------- framing


def _send(conn: socket.socket, frames: list[bytes]) -> None:
    conn.sendall(struct.pack(">I", len(frames)))
    for frame in frames:
        conn.sendall(struct.pack(">Q", len(frame)))
        conn.sendall(frame)


def _receive(conn: socket.socket) -> list[bytes]:
    """The frames of one request or reply. Raises ValueError on a malformed or truncated one."""
    (count,) = struct.unpack(">I", _read(conn, 4))
    if not 1 <= count <= 4:
        raise ValueError(f"{count} frames")
    frames = []
    for _ in range(count):
        (size,) = struct.unpack(">Q", _read(conn, 8))
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        frames.append(_read(conn, size))
    return frames


def _read(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ValueError("the connection closed mid-frame")
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------- the worker's side


def serve(path: Path, parent: int, key: str, idle_seconds: float) -> None:
    """Answer requests on ``path`` until idle for ``idle_seconds``, ``parent`` is gone (even
    mid-message), or a request for other code or another parent comes (it is told ``retired``)."""
    parent_started = _start_time(parent)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        server.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    inode = path.stat().st_ino
    server.listen(8)
    server.settimeout(_POLL_SECONDS)
    (path.parent / PID_NAME).write_text(f"{os.getpid()}\n")
    threading.Thread(target=_watch_parent, args=(parent, parent_started, path, inode), daemon=True).start()
    log.info("site worker (pid %d) listening for its ClientApp", os.getpid())
    handlers: dict[str, Handler] | None = None
    served, last = 0, time.monotonic()
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:  # nothing queued: idle
                if time.monotonic() - last > idle_seconds:
                    log.info("site worker (pid %d) exits after %.0f s idle", os.getpid(), idle_seconds)
                    return
                continue
            with conn:
                conn.settimeout(None)
                if not _same_user(conn):
                    log.warning("site worker refused a connection from another user")
                    continue
                try:
                    header, *frames = _receive(conn)
                    request = json.loads(header)
                except (OSError, ValueError) as err:
                    log.warning("site worker ignored a malformed request: %s", err)
                    continue
                if request.get("key") != key:  # stop listening first: the next connection finds its successor
                    _close(server, path, inode)
                    with contextlib.suppress(OSError):
                        _send(conn, [json.dumps({"retired": True, "pid": os.getpid()}).encode()])
                    return
                if request.get("op") == "handle":
                    if handlers is None:
                        handlers = _handlers()
                    served += 1
                answer = _answer(request, frames, handlers or {}, served)
                with contextlib.suppress(OSError):
                    _send(conn, answer)
                last = time.monotonic()
    finally:
        _close(server, path, inode)


def _watch_parent(parent: int, started: str, path: Path, inode: int) -> None:
    """Exit, even mid-message, once ``parent`` is gone (as Flower's ClientApp processes do)."""
    while started and _start_time(parent) == started:
        time.sleep(_POLL_SECONDS)
    log.info("site worker (pid %d) exits: the process that started it is gone", os.getpid())
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()
    os._exit(0)


def _close(server: socket.socket, path: Path, inode: int) -> None:
    """Stop listening and remove the socket file, unless a newer worker's replaced it."""
    server.close()
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer runs as this process's user (``SO_PEERCRED``: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] == os.getuid()


def _answer(request: dict[str, Any], frames: list[bytes], handlers: dict[str, Handler], served: int) -> list[bytes]:
    """The reply frames to one request: a ping's header, or a handled message and the context's state."""
    header = {"pid": os.getpid(), "served": served}
    if request.get("op") != "handle":
        return [json.dumps(header).encode()]
    try:
        msg = message_from_proto(ProtoMessage.FromString(frames[0]))
        context = context_from_proto(ProtoContext.FromString(frames[1]))
        reply = handlers[msg.metadata.message_type](msg, context)
    except Exception as err:  # noqa: BLE001 - the ClientApp handles the message itself then
        log.exception("site worker could not handle a message")
        return [json.dumps({**header, "error": type(err).__name__}).encode()]
    return [
        json.dumps(header).encode(),
        message_to_proto(reply).SerializeToString(),
        recorddict_to_proto(context.state).SerializeToString(),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medfed.site_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    parser.add_argument("--parent", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--key", required=True, help="the code key a request must carry")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_MINUTES * 60, help="exit when idle this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.socket, args.parent, args.key, args.idle_seconds)


if __name__ == "__main__":
    main()
