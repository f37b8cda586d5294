"""What the benchmarks share, for any task (the metric is the task's primary one): a pooled model's
metric per site, a federation run and its global model, DP vs non-DP training throughput,
traffic per round in float32 models, the peak memory of a process tree, and figures. Training on
the union of sites is :mod:`medfed.central`; bootstrap intervals are
:mod:`medfed.evaluation.bootstrap`."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfed.central import train_central, train_loader
from medfed.cli.common import console
from medfed.config import Config, load_config
from medfed.data import SiteArrays
from medfed.privacy import make_private
from medfed.progress import run_rounds
from medfed.protocol import global_model
from medfed.simulation import simulate
from medfed.site import seed_everything
from medfed.tasks import get_task
from medfed.training import build_optimizer, evaluate, loop_options, train

# where benchmarks write NAME.json and plots/NAME.png (tests point it at a temporary folder)
RESULTS = Path(os.environ.get("MEDFED_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

__all__ = [
    "RESULTS",
    "PeakMemory",
    "bench_config",
    "fedavg",
    "federated_model",
    "model_bytes",
    "per_round",
    "pooled",
    "pyplot",
    "results_path",
    "save_figure",
    "save_json",
    "throughput",
    "write_results",
]


def bench_config(file: str, data: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """``configs/FILE`` for a benchmark: cross-site matrix and example images off, ``data.path`` at
    ``data`` (None: the config's own synthetic data), then ``overrides``."""
    base: dict[str, Any] = {"evaluation.cross-site": False, "evaluation.example-images": 0}
    if data is not None:
        if not data.exists():
            raise SystemExit(f"data not found at {data} (the benchmarks read ../shared/data beside the repo)")
        base["data.path"] = str(data)
    return load_config(CONFIGS / file, base | (overrides or {}))


def pooled(config: Config, sites: list[SiteArrays], private: bool, epochs: int = 0) -> dict[str, Any]:
    """:func:`train_central` on all sites; the task's metric on each site's test split."""
    task = get_task(config.run.task)
    model, info = train_central(config, sites, private, epochs)
    results = {
        f"site-{i + 1}": evaluate(task, model, s.split("test"), config, torch.device("cpu"))
        for i, s in enumerate(sites)
    }
    per_site = {site: r[task.PRIMARY_METRIC] for site, r in results.items()}
    return {"per_site": per_site, "mean": float(np.mean(list(per_site.values()))), **info, "metrics": results}


def fedavg(config: Config, out: Path) -> dict[str, Any]:
    """``medfed simulate`` with ``config``: per-site test metric, local-only diagonal, ε and σ per site."""
    started = time.perf_counter()
    with run_rounds(console, out, config.run.rounds):
        report = simulate(config, out)
    metric = report["primary_metric"]
    per_site = {s: m[metric] for s, m in report["final"]["per_site"].items()}
    cross = report["final"].get("cross_site") or {}
    local = {
        m: row[cross["sites"].index(m)] for m, row in zip(cross.get("models", []), cross.get("matrix", []), strict=True)
        if m != "global"
    }  # fmt: skip
    privacy = report["privacy"]
    return {
        "per_site": per_site,
        "mean": float(np.mean(list(per_site.values()))),
        "local_only_on_own_test": local,
        "local_only_mean": float(np.mean(list(local.values()))) if local else None,
        "epsilon": {s: p["epsilon"] for s, p in privacy.items()},
        "unit": {s: p.get("unit") for s, p in privacy.items()},
        "noise_multiplier": {s: p["noise_multiplier"] for s, p in privacy.items()},
        "seconds": time.perf_counter() - started,
        "metrics": report["final"]["per_site"],
    }


def federated_model(config: Config, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``medfed simulate`` with ``config`` into ``out``: the final global model and the report."""
    with run_rounds(console, out, config.run.rounds):
        report = simulate(config, out)
    return global_model(config, out), report


def throughput(config: Config, site: SiteArrays, steps: int = 20) -> dict[str, float]:
    """Training samples per second at one site, without and with DP-SGD (same model, batch, data), and their ratio."""
    task = get_task(config.run.task)
    result: dict[str, float] = {}
    for private in (False, True):
        seed_everything(config.run.seed)  # as a site seeds itself before it builds its loader
        model = task.build_model(config)
        loader = train_loader(config, site)
        optimizer = build_optimizer(model, config.train)
        if private:
            model, optimizer, loader = make_private(model, optimizer, loader, 1.0, config.privacy.max_grad_norm)
        options = loop_options(config.train)
        train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=2, **options)  # warm-up
        stats = train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=steps, **options)
        result["dp_samples_per_s" if private else "samples_per_s"] = stats.examples / stats.seconds
    result["dp_ratio"] = result["dp_samples_per_s"] / result["samples_per_s"]
    return result


def model_bytes(config: Config) -> int:
    """The size of ``config``'s model as float32 (numel x 4 over its state dict)."""
    model = get_task(config.run.task).build_model(config)
    return sum(t.numel() * 4 for t in model.state_dict().values())


def per_round(report: dict[str, Any], sites: int, model: int) -> list[dict[str, Any]]:
    """Per round of a report: wall seconds, the slowest site's local training seconds and their
    ratio, and the bytes down and up per site in units of the float32 model (``model`` bytes)."""
    rows = []
    for entry in report["rounds"]:
        slowest = max(entry["local_seconds"].values()) if entry["local_seconds"] else None
        rows.append(
            {
                "round": entry["round"],
                "wall_seconds": entry["seconds"],
                "slowest_local_seconds": slowest,
                "wall_over_local": entry["seconds"] / slowest if slowest else None,
                "down_models_per_site": entry["bytes_down"] / sites / model,
                "up_models_per_site": entry["bytes_up"] / sites / model,
                "sites_aggregated": entry["sites_aggregated"],
            }
        )
    return rows


def _tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
        rss[int(entry.name)] = int(line.split()[1])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 1024


class PeakMemory:
    """Samples this process tree's resident memory in a thread; ``peak_mib`` once stopped."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, _tree_rss_mib(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def results_path(name: str, quick: bool = False) -> Path:
    """``RESULTS/NAME.json``, or ``NAME-quick.json`` for a ``--quick`` run."""
    return RESULTS / f"{name}-quick.json" if quick else RESULTS / f"{name}.json"


def save_json(path: Path, summary: dict[str, Any]) -> None:
    """``summary`` as indented JSON at ``path`` (numpy numbers as floats); also a run's partial results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=float))


def write_results(
    path: Path, summary: dict[str, Any], plot: Callable[[Path], None] | None = None, note: str = ""
) -> Path:
    """A benchmark's last step: ``summary`` at ``path`` (see :func:`results_path`), the figure ``plot``
    draws at ``plots/STEM.png`` beside it, and ``written PATH`` (then ``note``) printed."""
    save_json(path, summary)
    if plot is not None:
        plot(path.parent / "plots" / f"{path.stem}.png")
    print(f"written {path}{note}")
    return path
