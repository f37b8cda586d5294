"""The empirical privacy audit: membership inference and canary exposure on a tiny site, without DP
and with DP-SGD, next to the ceiling each model's ε puts on any attack.

One synthetic hospital (4 lesion classes, 28 px; 40 % of its images train, the other 60 % are held
out) trains the demo's CNN with the project's recipe (``configs/classification-synthetic.toml``,
one privacy unit per image) for 40 epochs: without DP Adam (lr 0.003) in batches of 8, so that it
overfits (a site's worst case); under DP SGD (lr 0.5) in batches of 32 (with 8, the noise per
averaged gradient leaves a model no better than chance at ε = 1, which would make its audit say
nothing), through :func:`medfed.audit.canary_test`
(:func:`medfed.central.train_central` plus 5 inserted canaries: random blocky patterns, each with
a random training image's label). Then, per setting (no DP, DP ε = 8, DP ε = 1, each the whole
training's ε at δ = 1/(10 n)):

- the loss-threshold attack and offline LiRA (4 reference models trained on halves of the held-out
  images with the same recipe) at the site: AUC with a 95 % bootstrap interval (1000 resamples)
  and TPR at 1 % FPR with its exact interval (0.1 % needs 1000 held-out images: n/a here);
- the 5 canaries' exposure in bits against 100 reference canaries never trained on (at most
  log2(101) = 6.7 bits);
- the held-out accuracy of the model (what the privacy costs).

    .venv/bin/medfed bench privacy_audit [--quick]

Writes benchmarks/results/privacy_audit.json and plots/privacy_audit.png (``--quick``: 60 images
of 16 px, 30 epochs, no DP and ε = 1 only, no reference models, 3 canaries against 30:
privacy_audit-quick.json; under a minute). ``--out`` keeps the site folder and each released model,
for ``medfed privacy audit --model OUT/no-dp.safetensors --data OUT/hospital --out ...`` by hand.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import bench_config, pyplot, results_path, save_figure, write_results
from medfed.audit import FPRS, canary_test, membership_groups, run_attacks, verdict, with_ceilings
from medfed.data import write_site
from medfed.data.synthetic import synthetic_site
from medfed.tasks import get_task
from medfed.training import evaluate
from medfed.weights import model_to_arrays, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
SITE = "hospital"
SETTINGS: dict[str, float | None] = {"no DP": None, "DP ε=8": 8.0, "DP ε=1": 1.0}
FULL = {"images": 300, "image_size": 28, "epochs": 40, "shadows": 4, "canaries": (5, 100), "replicates": 1000}
QUICK = {"images": 60, "image_size": 16, "epochs": 30, "shadows": 0, "canaries": (3, 30), "replicates": 200}


def audit_setting(name: str, epsilon: float | None, plan: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """Train at the site with ``epsilon`` (None: no DP) and canaries; attack the model; its figures."""
    overrides: dict[str, Any] = {
        "run.rounds": 1, "run.seed": seed, "train.local-epochs": plan["epochs"],
        "train.batch-size": 8 if epsilon is None else 32,
        "data.image-size": plan["image_size"], "data.num-classes": 4, "privacy.unit": "image",
        "privacy.enabled": epsilon is not None, "train.schedule": "constant",  # its results: a constant step
    }  # fmt: skip
    overrides |= {"privacy.target-epsilon": epsilon} if epsilon is not None else {"train.lr": 0.003}
    config = bench_config("classification-synthetic.toml", None, overrides)
    site = synthetic_site(0, plan["images"], plan["image_size"], 4, seed=seed, split_fractions=(0.4, 0.0, 0.6))
    if not (out / SITE).is_dir():
        write_site(out / SITE, site)
    started = time.perf_counter()
    inserted, references = plan["canaries"]
    model, info, canaries = canary_test(config, site, epsilon is not None, inserted, references, seed)
    stem = name.lower().replace(" ", "-").replace("ε=", "eps-")
    save_checkpoint(out / f"{stem}.safetensors", model_to_arrays(model),
                    {"round": 1, "task": config.run.task, "config": config.to_public_dict()})  # fmt: skip
    groups = membership_groups(site, ("val", "test"), SITE)
    attacks = run_attacks(config, model, groups, torch.device("cpu"), plan["shadows"], plan["replicates"], seed)
    held_out = evaluate(get_task(config.run.task), model, site.split("test"), config, torch.device("cpu"))
    theory = with_ceilings({"epsilon": info["epsilon"], "delta": info["delta"]} if epsilon else {"epsilon": None})
    return {
        "setting": name,
        "epsilon": info["epsilon"],
        "delta": info["delta"],
        "noise_multiplier": info["noise_multiplier"],
        "steps": info["steps"],
        "held_out_accuracy": held_out["accuracy"],
        **attacks,
        "theory": theory,
        "verdict": verdict(attacks["attacks"], theory),
        "canaries": canaries,
        "seconds": time.perf_counter() - started,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    labels = [row["setting"] for row in rows]
    for x, row in enumerate(rows):
        for offset, (attack, color) in enumerate((("loss", "#58a"), ("lira-offline", "#d62"))):
            if attack not in row["attacks"]:
                continue
            result = row["attacks"][attack]
            low, high = result["auc_ci95"]
            left.errorbar(x + 0.12 * offset, result["auc"], yerr=[[result["auc"] - low], [high - result["auc"]]],
                          fmt="o", color=color, capsize=3, label=attack if x == 0 else None)  # fmt: skip
        if row["theory"].get("auc_ceiling") is not None:
            left.plot([x - 0.2, x + 0.3], [row["theory"]["auc_ceiling"]] * 2, color="black", linewidth=1,
                      label="ceiling ε permits" if x == len(rows) - 1 else None)  # fmt: skip
        bits = row["canaries"]["exposure_bits"]
        right.plot([x] * len(bits), bits, "o", color="#58a", alpha=0.6)
        right.plot([x - 0.2, x + 0.2], [row["canaries"]["max_bits"]] * 2, color="black", linewidth=1)
    left.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    left.set_xticks(range(len(rows)), labels)
    left.set(title="membership inference at the site", ylabel="attack AUC (95% CI)", ylim=(0.3, 1.02))
    left.legend(fontsize=7)
    right.set_xticks(range(len(rows)), labels)
    right.set(title="canary exposure (line: the most measurable)", ylabel="bits")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 images of 16 px, no DP and ε = 1, no LiRA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-privacy-audit")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a 30k-parameter CNN: a second thread costs more than it gives on a shared machine
    plan = QUICK if args.quick else FULL
    rows = []
    for name, epsilon in SETTINGS.items():
        if args.quick and epsilon == 8.0:
            continue
        rows.append(audit_setting(name, epsilon, plan, args.seed, args.out))
        row = rows[-1]
        rate = row["attacks"]["loss"]["tpr_at_fpr"][f"{FPRS[0]:g}"]
        tpr = "n/a" if rate is None else f"{rate['tpr']:.3f}"
        spent = "-" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        print(f"{name}: ε={spent}; held-out accuracy {row['held_out_accuracy']:.3f}; "
              f"loss attack TPR at 1% FPR {tpr}; canary exposure "
              f"{row['canaries']['mean_bits']:.2f} of {row['canaries']['max_bits']:.2f} bits "
              f"({row['seconds']:.0f} s)", flush=True)  # fmt: skip
        for line in row["verdict"]:
            print(f"  {line}", flush=True)
    summary = {
        "benchmark": "privacy_audit",
        "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores, 1 torch thread",
        "plan": plan,
        "seed": args.seed,
        "settings": rows,
    }
    write_results(results_path("privacy_audit", args.quick), summary, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
