"""BCCD blood cells at 3 sites: pooled vs FedAvg mAP@0.5, without and with DP, and the cost of DP in
training throughput.

- **FedAvg**: ``medfed simulate configs/detection-bccd.toml`` (images dealt to 3 sites in name
  order) with ``privacy.enabled`` false (cross-site matrix on: local-only models too) and true
  (cross-site off, so that the run's whole ε = 8 goes to the federated model, as in the pooled
  run); the global model's mAP@0.5 on each site's test split.
- **Pooled**: one model trained on the union of the three sites' training images for as many
  epochs as a site makes in FedAvg (rounds x local epochs), same batch size, and ε = 8 over the
  pooled images when DP is on; scored on the same test images.
- **Throughput**: training samples/s at one site, the same model and batch, without and with
  DP-SGD (Opacus hooks, Poisson sampling).

    .venv/bin/medfed bench detection_bccd [--rounds N] [--out DIR]

Writes benchmarks/results/detection_bccd.json and prints each result as it comes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.harness import fedavg, pooled, results_path, save_json, throughput, write_results
from medfed.config import load_config
from medfed.data.sites import load_simulated_site

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "detection-bccd.toml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="override run.rounds (0: the config's)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-bccd")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "bccd" / "BCCD")
    parser.add_argument("--only", choices=["throughput", "nodp", "dp"], default=None, help="run one part")
    args = parser.parse_args(argv)
    overrides = {"data.path": str(args.data.resolve()), "evaluation.example-images": 0}
    if args.rounds:
        overrides["run.rounds"] = args.rounds
    base = load_config(CONFIG, overrides)
    sites = [load_simulated_site(base, i)[1] for i in range(base.data.sites)]
    target = results_path("detection_bccd")
    summary = json.loads(target.read_text()) if target.is_file() else {}
    summary.update({"benchmark": "detection-bccd", "config": base.to_public_dict()})
    if args.only in (None, "throughput"):
        summary["throughput"] = throughput(base, sites[0])
        print("throughput:", summary["throughput"], flush=True)
    for private in (False, True):
        tag = "dp" if private else "nodp"
        if args.only not in (None, tag):
            continue
        config = base.with_overrides({"privacy.enabled": private, "evaluation.cross-site": not private})
        summary[f"pooled_{tag}"] = pooled(config, sites, private)
        print(f"pooled {tag}:", {k: v for k, v in summary[f"pooled_{tag}"].items() if k != "metrics"}, flush=True)
        summary[f"fedavg_{tag}"] = fedavg(config, args.out / f"fedavg-{tag}")
        print(f"fedavg {tag}:", {k: v for k, v in summary[f"fedavg_{tag}"].items() if k != "metrics"}, flush=True)
        save_json(target, summary)
    write_results(target, summary)


if __name__ == "__main__":
    main()
