"""How a simulated federation scales with the number of sites on one machine.

Simulated federations of 10, 50 and 100 synthetic hospitals (``--quick``: 5 and 10), each a tiny
DP classification site (40 images of 16 px, a small CNN), 2 rounds (``--quick``: 1): seconds per
round, seconds per round per site, and the peak resident memory of the whole process tree (the
driver and Flower's Ray workers, sampled from /proc every 0.2 s). Cost should grow linearly with
the number of sites and memory should stay bounded (sites run one after another on 2 workers).

    .venv/bin/medfed bench scale [--quick]

Writes benchmarks/results/scale.json (scale-quick.json) and plots/scale.png beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.harness import PeakMemory, pyplot, results_path, save_figure, write_results
from medfed.config import Config
from medfed.simulation import simulate

REPO = Path(__file__).resolve().parent.parent


def tiny_federation(sites: int, rounds: int) -> Config:
    return Config().with_overrides(
        {
            "run.rounds": rounds,
            "run.min-sites": sites,
            "data.sites": sites,
            "data.samples-per-site": 40,
            "data.image-size": 16,
            "model.width": 8,
            "model.depth": 2,
            "train.batch-size": 16,
            "evaluation.cross-site": False,
            "evaluation.example-images": 0,
        }
    )


def measure(sites: int, rounds: int, out: Path) -> dict[str, float]:
    config = tiny_federation(sites, rounds)
    with PeakMemory() as memory:
        started = time.perf_counter()
        report = simulate(config, out / f"sites-{sites}")
        wall = time.perf_counter() - started
    per_round = [r["seconds"] for r in report["rounds"][1:]]
    seconds = sum(per_round) / len(per_round)
    return {
        "sites": sites,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "seconds_per_round_per_site": seconds / sites,
        "wall_seconds": wall,
        "peak_rss_mib": memory.peak_mib,
        "sites_aggregated_last_round": len(report["rounds"][-1]["sites_aggregated"]),
    }


def plot(rows: list[dict[str, float]], path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    sites = [r["sites"] for r in rows]
    left.plot(sites, [r["seconds_per_round"] for r in rows], "o-")
    left.set(xlabel="simulated sites", ylabel="seconds per round", title="Round time")
    right.plot(sites, [r["peak_rss_mib"] for r in rows], "o-")
    right.set(xlabel="simulated sites", ylabel="peak RSS (MiB)", title="Memory (driver + workers)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 and 10 sites, 1 round (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-scale")
    args = parser.parse_args(argv)
    counts, rounds = ((5, 10), 1) if args.quick else ((10, 50, 100), 2)
    rows = []
    for sites in counts:
        rows.append(measure(sites, rounds, args.out))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    summary = {
        "benchmark": "scale",
        "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores",
        "runs": rows,
        "time_growth_per_site_growth": (last["seconds_per_round"] / first["seconds_per_round"])
        / (last["sites"] / first["sites"]),
        "memory_growth": last["peak_rss_mib"] / first["peak_rss_mib"],
    }
    write_results(results_path("scale", args.quick), summary, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
