"""What a real deployment costs over the simulation: the same tiny federation run both ways.

Config: configs/classification-synthetic.toml with 3 sites, 3 rounds, DP on, 40 samples per site
at 16 px, one local epoch, cross-site evaluation off (``OVERRIDES``); ``--long`` adds
``LONG_OVERRIDES``, ``--no-site-worker`` starts the sites with ``site.sh --no-site-worker``.

1. **Simulation**: ``medfed.simulation.simulate(config, out)`` (Flower's simulation runtime, one
   process).
2. **Deployment**: the deploy scripts as real processes on 127.0.0.1, as tests/test_deployment.py
   runs them (its process helpers are reused): ``make-certificates.sh``, ``superlink.sh start``
   (TLS + SuperNode authentication), three ``site.sh`` SuperNodes on the simulation's own site
   data written as site folders, then ``flwr run . CONNECTION``.

From each report.json, per round: wall seconds (``rounds[i]["seconds"]``), the slowest site's
local training seconds (``max(local_seconds)``), their ratio, and the bytes down and up per site per
round in units of the float32 model (sum of numel x 4 over the model's state dict).

What crossed the wire: each SuperNode reaches the SuperLink through its own byte-counting TCP
relay (a thread here, on another loopback port; TLS stays end to end, the relay sees ciphertext
only). Its counters are read when each round's checkpoint appears, so rounds 2.. are measured
alone (round 1's segment also holds the app download and the round-0 evaluation). The SuperNode
processes' ``/proc/PID/io`` (rchar/wchar: every read and write syscall, sockets to the SuperLink
and to its ClientApp processes, and files) is recorded as well, as an upper bound.

    .venv/bin/medfed bench deployment_overhead

Writes benchmarks/results/deployment_overhead[_long][_no_worker].json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import model_bytes, per_round, results_path, write_results
from medfed.config import load_config, parse_override
from medfed.data import write_site
from medfed.data.sites import load_simulated_site, simulated_site_names
from medfed.run_folder import RunFolder
from medfed.simulation import simulate
from tests.test_deployment import (
    CONNECTION,
    DEPLOY,
    VENV_BIN,
    Proc,
    _free_port,
    coordinator,
)

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = "configs/classification-synthetic.toml"
OVERRIDES = (
    "run.rounds=3",
    "run.min-sites=3",
    "data.sites=3",
    "data.samples-per-site=40",
    "data.image-size=16",
    "train.local-epochs=1",
    "privacy.enabled=true",
    "evaluation.cross-site=false",
    "evaluation.example-images=0",
)
# ``--long``: rounds with seconds of local training (12-42 s on 2 busy CPU cores), so that a round's
# fixed cost (messages, the ClientApp's process) is measured against real training
LONG_OVERRIDES = ("data.samples-per-site=200", "data.image-size=32")
RUN_DEADLINE = 1800


class CountingRelay:
    """A TCP relay 127.0.0.1:port -> upstream that counts the bytes each way (threads, no parsing)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.up = 0  # client -> upstream (site -> SuperLink)
        self.down = 0  # upstream -> client
        self.connections = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"up": self.up, "down": self.down, "connections": self.connections}

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(chunk))
        except OSError:
            pass
        finally:
            for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
                with contextlib.suppress(OSError):
                    sock.shutdown(how)


def _config(overrides: tuple[str, ...]):  # noqa: ANN202
    return load_config(REPO / CONFIG_FILE, dict(parse_override(item) for item in overrides))


def _proc_io(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def run_simulation(config, base: Path) -> dict[str, Any]:  # noqa: ANN001
    out = base / "simulation"
    started = time.perf_counter()
    report = simulate(config, out)
    return {"total_seconds": time.perf_counter() - started, "report": report}


def run_deployment(config, base: Path, overrides: tuple[str, ...], site_flags: list[str]) -> dict[str, Any]:  # noqa: ANN001
    names = simulated_site_names(config)
    relays: dict[str, CountingRelay] = {}
    try:
        with coordinator(base, names, ["IP:127.0.0.1"]) as deployment:  # (Ray's temp folder goes under base)
            certs, port = deployment.certs, deployment.port
            sites: dict[str, Proc] = {}
            for index, name in enumerate(names):
                deployment.register(certs / "sites" / name / f"{name}.pub", name)
                folder = write_site(base / "data" / name, load_simulated_site(config, index)[1])
                relays[name] = CountingRelay(("127.0.0.1", port))
                sites[name] = deployment.start(name, [str(DEPLOY / "site.sh"), "--site-name", name,
                                                      "--data", str(folder), "--state", str(base / "sites" / name),
                                                      "--superlink", f"127.0.0.1:{relays[name].port}",
                                                      "--ca", str(certs / "ca" / "ca.crt"),
                                                      "--key", str(certs / "sites" / name / f"{name}.key"),
                                                      "--port", str(_free_port()), *site_flags])  # fmt: skip
            deployment.wait_online(list(sites.values()), timeout=300)

            out = RunFolder(base / "deployment")
            run_config = f'config-file="{CONFIG_FILE}" out-dir="{out.root}" overrides="{";".join(overrides)}"'
            marks = [{"event": "start", "t": 0.0, "relays": {n: r.snapshot() for n, r in relays.items()}}]
            started = time.perf_counter()
            run = deployment.start("flwr-run", [str(VENV_BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream",
                                                "--run-config", run_config])  # fmt: skip
            pending = [(f"round-{r}", out.round_model(r)) for r in range(1, config.run.rounds + 1)]
            pending.append(("report", out.report_json))
            deadline = time.monotonic() + RUN_DEADLINE
            while pending:
                if pending[0][1].exists():
                    event, _ = pending.pop(0)
                    marks.append({"event": event, "t": time.perf_counter() - started,
                                  "relays": {n: r.snapshot() for n, r in relays.items()}})  # fmt: skip
                    continue
                assert deployment.superlink.alive() and all(s.alive() for s in sites.values()), "a process exited"
                assert run.alive() or pending[0][1].exists(), "the run ended early\n" + run.tail()
                assert time.monotonic() < deadline, "the deployment run took too long\n" + run.tail()
                time.sleep(0.2)
            total = time.perf_counter() - started
            code = run.wait(timeout=120)
            assert code == 0, run.tail()
            report = json.loads(out.report_json.read_text())  # whole: the run has exited
            marks.append({"event": "run exited", "t": time.perf_counter() - started,
                          "relays": {n: r.snapshot() for n, r in relays.items()}})  # fmt: skip
            proc_io = {name: _proc_io(site.popen.pid) for name, site in sites.items()}
            return {"total_seconds": total, "report": report, "marks": marks, "supernode_proc_io": proc_io}
    finally:
        for relay in relays.values():
            relay.close()


def wire_summary(deployment: dict[str, Any], report: dict[str, Any], sites: int, model: int) -> dict[str, Any]:
    """Relay bytes per round segment (between checkpoints), per site, against the report's payload bytes."""
    marks = deployment["marks"]
    names = sorted(marks[0]["relays"])

    def total(mark: dict[str, Any], direction: str) -> int:
        return sum(mark["relays"][n][direction] for n in names)

    segments = []
    for before, after in zip(marks, marks[1:], strict=False):
        segments.append(
            {
                "segment": f"{before['event']} -> {after['event']}",
                "seconds": after["t"] - before["t"],
                "wire_down_models_per_site": (total(after, "down") - total(before, "down")) / sites / model,
                "wire_up_models_per_site": (total(after, "up") - total(before, "up")) / sites / model,
            }
        )
    payload_down = sum(r["bytes_down"] for r in report["rounds"])
    payload_up = sum(r["bytes_up"] for r in report["rounds"])
    # After the rounds, the last round's validation scoring sends the released model once more to
    # every site (the test split's request names it by digest): not in a round's figures.
    final_eval_down = sites * model
    last = marks[-1]
    return {
        "per_segment": segments,
        "whole_run": {
            "wire_down_bytes": total(last, "down"),
            "wire_up_bytes": total(last, "up"),
            "connections": sum(last["relays"][n]["connections"] for n in names),
            "report_payload_down_bytes": payload_down + final_eval_down,
            "report_payload_up_bytes": payload_up,
            "wire_over_payload_down": total(last, "down") / (payload_down + final_eval_down),
            "wire_over_payload_up": total(last, "up") / payload_up if payload_up else None,
        },
        "supernode_proc_io": deployment["supernode_proc_io"],
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medfed bench deployment_overhead", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"add {' '.join(LONG_OVERRIDES)} (more local training per round); writes deployment_overhead_long.json",
    )
    parser.add_argument(
        "--no-site-worker",
        action="store_true",
        help="sites answer every message in its own ClientApp process (site.sh --no-site-worker), as "
        "before medfed.site_worker; writes deployment_overhead_no_worker.json (or _long_no_worker)",
    )
    args = parser.parse_args(argv)
    overrides = OVERRIDES + LONG_OVERRIDES if args.long else OVERRIDES
    config = _config(overrides)
    sites = len(simulated_site_names(config))
    model = model_bytes(config)
    base = Path(tempfile.mkdtemp(prefix="medfed-deployment-overhead-"))
    try:
        simulation = run_simulation(config, base)
        deployment = run_deployment(config, base, overrides, ["--no-site-worker"] if args.no_site_worker else [])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "benchmark": "deployment_overhead",
        "setting": ("DP CNN, 200 images of 32 px" if args.long else "tiny DP CNN")
        + (", no site worker" if args.no_site_worker else ""),
        "config_file": CONFIG_FILE,
        "overrides": list(overrides),
        "sites": sites,
        "model_float32_bytes": model,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "simulation": {
            "total_seconds": simulation["total_seconds"],
            "rounds": per_round(simulation["report"], sites, model),
        },
        "deployment": {
            "total_seconds": deployment["total_seconds"],
            "rounds": per_round(deployment["report"], sites, model),
            "wire": wire_summary(deployment, deployment["report"], sites, model),
        },
    }
    print(f"model: {model} bytes as float32; {sites} sites; DP on; 2 runs of {config.run.rounds} rounds")
    header = f"{'mode':<11}{'round':>6}{'wall s':>9}{'local s':>9}{'wall/local':>11}{'down/site':>11}{'up/site':>9}"
    print(header)
    for mode in ("simulation", "deployment"):
        for row in result[mode]["rounds"]:
            print(
                f"{mode:<11}{row['round']:>6}{row['wall_seconds']:>9.1f}{_fmt(row['slowest_local_seconds'], '9.1f'):>9}"
                f"{_fmt(row['wall_over_local'], '11.1f'):>11}{row['down_models_per_site']:>11.2f}"
                f"{row['up_models_per_site']:>9.2f}"
            )
        print(f"{mode:<11}{'total':>6}{result[mode]['total_seconds']:>9.1f}")
    print("\nwire (TLS bytes through the relays), per site, in float32 models:")
    for seg in result["deployment"]["wire"]["per_segment"]:
        print(
            f"  {seg['segment']:<24}{seg['seconds']:>7.1f} s  down {seg['wire_down_models_per_site']:>6.2f}"
            f"  up {seg['wire_up_models_per_site']:>6.2f}"
        )
    whole = result["deployment"]["wire"]["whole_run"]
    print(
        f"  whole run: wire/report payload down {whole['wire_over_payload_down']:.2f}, "
        f"up {_fmt(whole['wire_over_payload_up'], '.2f')}, {whole['connections']} TCP connections"
    )
    name = "deployment_overhead" + ("_long" if args.long else "") + ("_no_worker" if args.no_site_worker else "")
    write_results(results_path(name), result)


if __name__ == "__main__":
    main()
