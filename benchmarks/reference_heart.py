"""A hand-written FedAvg reference for configs/tabular-heart.toml: torch and scikit-learn only.

What a careful researcher writes without medfed, to check that medfed's shipped tabular config
trains a model at least as good. Only the ROWS come from medfed (``heart_sites``: the four
hospitals' files, cholesterol / blood pressure of 0 as missing, the seeded 60/20/20 stratified
split per hospital that medfed's ``data.source = "heart-uci"`` uses), so both score the same test
patients. Everything else is this file's own, following FLamby's Fed-Heart-Disease: each hospital
imputes (median) and standardises with its own train rows; the pooled model standardises with the
statistics of all train rows together (what centralising allows); a logistic regression or a
2-hidden-layer MLP (32 units), Adam, batch 16, binary cross-entropy; FedAvg by averaging state
dicts in-process, weighted by train rows; ``--rounds`` rounds of one local epoch (the pooled model
trains as many epochs). Score: test accuracy at 0.5 (FLamby's metric), mean over the hospitals,
over ``--seeds`` seeds. ``--indicators`` adds a 0/1 missing indicator per feature (as medfed does).

    .venv/bin/medfed bench reference-heart [--seeds 5] [--rounds 20] [--lr 0.01]

Writes benchmarks/results/reference_heart.json (every model x indicators setting) and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.harness import results_path, save_json
from medfed.data.heart_uci import heart_sites
from medfed.data.tabular import feature_rows

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "heart_uci"
FEATURES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]  # the config's

Rows = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # hospital: (values with NaN, labels, splits)


def hospitals(seed: int) -> Rows:
    """Each hospital's raw feature values (NaN: missing), labels and split names."""
    sites, _ = heart_sites(DATA, seed)
    out = {}
    for name, rows in sites.items():
        values, _ = feature_rows(rows, FEATURES)
        out[name] = (values, np.array([int(r["label"]) for r in rows]), np.array([r["split"] for r in rows]))
    return out


def scaled(values: np.ndarray, fit_rows: np.ndarray, indicators: bool) -> np.ndarray:
    """Median-imputed, standardised ``values`` (statistics of ``fit_rows``), plus indicators."""
    medians = np.nan_to_num(np.nanmedian(np.where(np.isnan(fit_rows).all(0), 0.0, fit_rows), axis=0))
    filled_fit = np.where(np.isnan(fit_rows), medians, fit_rows)
    mean, sd = filled_fit.mean(0), filled_fit.std(0)
    x = (np.where(np.isnan(values), medians, values) - mean) / np.where(sd < 1e-8, 1.0, sd)
    return np.concatenate([x, np.isnan(values)], 1) if indicators else x


def network(width: int, kind: str) -> nn.Module:
    """Logistic regression, or an MLP with two hidden layers of 32 units."""
    if kind == "logistic":
        return nn.Linear(width, 1)
    return nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch: int = 16) -> None:
    """``epochs`` of Adam on binary cross-entropy in shuffled batches."""
    optimizer = torch.optim.Adam(model.parameters(), lr)
    xs, ys = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        for i in range(0, len(xs), batch):
            rows = order[i : i + batch]
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(xs[rows]).squeeze(1), ys[rows]).backward()
            optimizer.step()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy at probability 0.5."""
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.tensor(x, dtype=torch.float32)).squeeze(1)).numpy()
    return float(np.mean((probs >= 0.5) == (y == 1)))


def run(seed: int, kind: str, indicators: bool, rounds: int, lr: float) -> dict[str, dict[str, float]]:
    """Test accuracy per hospital of the pooled model and of FedAvg at one seed."""
    torch.manual_seed(seed)
    rows = hospitals(seed)
    train = {n: s == "train" for n, (_, _, s) in rows.items()}
    local = {n: (scaled(v, v[train[n]], indicators), y, s) for n, (v, y, s) in rows.items()}
    all_train = np.concatenate([v[train[n]] for n, (v, _, _) in rows.items()])
    pooled_rows = {n: (scaled(v, all_train, indicators), y, s) for n, (v, y, s) in rows.items()}
    width = next(iter(local.values()))[0].shape[1]
    pooled = network(width, kind)
    pooled_x = np.concatenate([x[s == "train"] for x, _, s in pooled_rows.values()])
    pooled_y = np.concatenate([y[s == "train"] for _, y, s in pooled_rows.values()])
    fit(pooled, pooled_x, pooled_y, rounds, lr)
    global_model = network(width, kind)
    for _ in range(rounds):
        states, weights = [], []
        for x, y, s in local.values():
            model = network(width, kind)
            model.load_state_dict(global_model.state_dict())
            fit(model, x[s == "train"], y[s == "train"], 1, lr)
            states.append(model.state_dict())
            weights.append(float((s == "train").sum()))
        total = sum(weights)
        global_model.load_state_dict(
            {k: sum(w * st[k] for w, st in zip(weights, states, strict=True)) / total for k in states[0]}
        )
    return {
        "pooled": {n: accuracy(pooled, x[s == "test"], y[s == "test"]) for n, (x, y, s) in pooled_rows.items()},
        "fedavg": {n: accuracy(global_model, x[s == "test"], y[s == "test"]) for n, (x, y, s) in local.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"data not found at {DATA} (the benchmarks read ../shared/data beside the repo)")
    torch.set_num_threads(1)
    started, results = time.perf_counter(), {}
    for kind in ("logistic", "mlp"):
        for indicators in (False, True):
            runs = [run(seed, kind, indicators, args.rounds, args.lr) for seed in range(args.seeds)]
            entry: dict[str, Any] = {"runs": runs}
            for method in ("pooled", "fedavg"):
                means = [float(np.mean(list(r[method].values()))) for r in runs]
                entry[method] = {"mean": float(np.mean(means)), "sd": float(np.std(means)), "per_seed": means}
            entry["fedavg_over_pooled"] = entry["fedavg"]["mean"] / entry["pooled"]["mean"]
            label = f"{kind}{' + indicators' if indicators else ''}"
            results[label] = entry
            print(f"{label:24s} pooled {entry['pooled']['mean']:.3f} ± {entry['pooled']['sd']:.3f}   FedAvg "
                  f"{entry['fedavg']['mean']:.3f} ± {entry['fedavg']['sd']:.3f}   ratio {entry['fedavg_over_pooled']:.3f}")  # fmt: skip
    summary = {"benchmark": "reference_heart", "seeds": args.seeds, "rounds": args.rounds, "lr": args.lr,
               "batch": 16, "seconds": time.perf_counter() - started, "results": results}  # fmt: skip
    save_json(results_path("reference_heart"), summary)


if __name__ == "__main__":
    main()
