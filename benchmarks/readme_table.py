"""The README's results table, generated from benchmarks/results/*.json (never typed by hand).

    .venv/bin/python benchmarks/readme_table.py          # rewrite the table in README.md
    .venv/bin/python benchmarks/readme_table.py --check  # exit 1 if README.md is out of date

The table sits between the ``<!-- results:start -->`` and ``<!-- results:end -->`` lines. Each
result file with a known ``benchmark`` gives a few rows: what was run, the number, and the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
Row = tuple[str, str, str]  # setting, measure, value


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _spread(values: list[float]) -> str:
    """One value, or the mean with the range over runs."""
    if len(values) == 1:
        return _f(values[0])
    return f"{_f(sum(values) / len(values))} ({_f(min(values))}-{_f(max(values))}, {len(values)} draws)"


def _spine(r: dict[str, Any]) -> Iterator[Row]:
    groups: dict[tuple[str, bool, bool], list[dict[str, Any]]] = {}
    for run in r["runs"]:  # runs of one setting differ only in run.seed (the partition draw)
        groups.setdefault((run["setup"], run["dp"], bool(run.get("delta")) and run["delta"] <= 1e-5), []).append(run)
    for (setup, private, literature_delta), runs in groups.items():
        mode = "no DP"
        if private:
            delta = "1e-05" if literature_delta else f"1/(10 n) <= {max(run['delta'] for run in runs):.0e}"
            mode = f"DP ε={_f(max(run['epsilon'] for run in runs), 1)} δ={delta}"
        setting = f"PneumoniaMNIST, {setup}, {mode}"
        if all(run.get("pooled_sites") for run in runs):
            sensitivity = _f(sum(run["pooled_sites"]["sensitivity"] for run in runs) / len(runs))
            specificity = _f(sum(run["pooled_sites"]["specificity"] for run in runs) / len(runs))
            value = f"{_spread([run['test_auroc'] for run in runs])} / {sensitivity} / {specificity}"
            yield setting, "official test AUROC / sensitivity / specificity (means)", value
        else:
            yield setting, "test AUROC / accuracy", f"{_spread([run['test_auroc'] for run in runs])}"
    yield "PneumoniaMNIST CNN", "DP / non-DP samples/s", _f(r["throughput"]["dp_over_non_dp"], 2)


def _pooled_vs_fedavg(dataset: str, metric: str) -> Callable[[dict[str, Any]], Iterator[Row]]:
    def rows(r: dict[str, Any]) -> Iterator[Row]:
        for key, label in (("pooled_nodp", "pooled, no DP"), ("fedavg_nodp", "FedAvg 3 sites, no DP")):
            yield f"{dataset}, {label}", f"test {metric} (mean of sites)", _f(r[key]["mean"])
        yield f"{dataset}, local-only, no DP", f"test {metric} (own site)", _f(r["fedavg_nodp"]["local_only_mean"])
        yield f"{dataset}, FedAvg / pooled", "ratio, no DP", _f(r["fedavg_nodp"]["mean"] / r["pooled_nodp"]["mean"], 2)
        for key, label in (("pooled_dp", "pooled, DP ε=8"), ("fedavg_dp", "FedAvg 3 sites, DP ε=8")):
            yield f"{dataset}, {label}", f"test {metric} (mean of sites)", _f(r[key]["mean"])

    return rows


def _data_loading(r: dict[str, Any]) -> Iterator[Row]:
    speed = r["slices_per_second"]
    yield (
        "64 x 256² CT, DICOM series / NIfTI",
        "read, slices/s",
        f"{speed['dicom_series_read']:.0f} / {speed['nifti_gz_read']:.0f}",
    )
    if "dicom_import" in speed:
        yield "64 x 256² CT, PACS export import", "slices/s", f"{speed['dicom_import']:.0f}"
    yield "60 volumes 32³", "reading share of read + 1 DP epoch", f"{r['epoch']['read_share_of_epoch']:.0%}"


def _scale(r: dict[str, Any]) -> Iterator[Row]:
    for run in r["runs"]:
        yield (
            f"{run['sites']} simulated sites",
            "s/round, s/round/site, peak RSS MiB",
            f"{run['seconds_per_round']:.1f}, {run['seconds_per_round_per_site']:.2f}, {run['peak_rss_mib']:.0f}",
        )


def _overhead(r: dict[str, Any]) -> Iterator[Row]:
    for mode in ("simulation", "deployment"):
        rounds = [x for x in r[mode]["rounds"] if x["round"] > 0 and x["wall_over_local"]]
        ratio = sum(x["wall_over_local"] for x in rounds) / len(rounds)
        up = sum(x["up_models_per_site"] for x in rounds) / len(rounds)
        down = sum(x["down_models_per_site"] for x in rounds) / len(rounds)
        yield (
            f"{mode}, {r['sites']} sites, {r.get('setting', 'tiny DP CNN')}",
            "round wall / slowest local training; bytes down; up per site per round / float32 model",
            f"{ratio:.1f}; {down:.2f}; {up:.2f}",
        )
    wire = r["deployment"]["wire"]["whole_run"]
    yield (
        "deployment over TLS, whole run",
        "bytes on the wire / report payload (down; up)",
        f"{wire['wire_over_payload_down']:.2f}; {wire['wire_over_payload_up']:.2f}",
    )


def _ci(score: dict[str, Any], digits: int = 3) -> str:
    return f"{_f(score['value'], digits)} [{_f(score['low'], digits)}, {_f(score['high'], digits)}]"


def _utility(r: dict[str, Any]) -> Iterator[Row]:
    for name, d in r["datasets"].items():
        setups = d["setups"]
        measure = f"test {d['metric']}, mean of 3 sites [95% CI]"
        yield (
            f"{name}: pooled / local-only",
            measure,
            f"{_ci(setups['pooled']['mean'])} / {_ci(setups['local-only']['mean'])}",
        )
        yield (
            f"{name}: FedAvg / FedProx / FedAdam",
            measure,
            " / ".join(_ci(setups[s]["mean"]) for s in ("fedavg", "fedprox", "fedadam")),
        )
        yield f"{name}: FedAvg / pooled", "ratio [95% CI]", _ci(d["fedavg_over_pooled"], 2)


def _privacy(r: dict[str, Any]) -> Iterator[Row]:
    for run in r.get("utility", []):
        eps = run["epsilon_target"]
        setting = f"PneumoniaMNIST FedAvg 3 sites, {'ε=' + format(eps, 'g') if eps else 'no DP'}"
        yield setting, "test AUROC [95% CI] / accuracy", f"{_ci(run['test_auroc'])} / {_f(run['test_accuracy'])}"
    for name, c in r.get("cost", {}).items():
        yield (
            name,
            "DP / non-DP: samples/s; peak training memory",
            f"{c['dp_over_non_dp_samples_per_s']:.2f}; {c['dp_over_non_dp_peak_memory']:.1f}x",
        )


def _sim_overhead(r: dict[str, Any]) -> Iterator[Row]:
    for run in r["runs"]:
        yield (
            f"simulation, PneumoniaMNIST 3 sites DP, update compression {run['compression']}",
            "round wall / slowest local; bytes down, up per site per round / float32 model; test AUROC change",
            f"{run['wall_over_slowest_local']:.2f}; {run['down_models_per_site_per_round']:.2f}, "
            f"{run['up_models_per_site_per_round']:.2f}; {run['auroc_change']['absolute']:+.4f}",
        )


def _generalization(r: dict[str, Any]) -> Iterator[Row]:
    for name, d in r["datasets"].items():
        yield (
            f"{name}: local models, own site / other sites",
            "test AUROC (gap)",
            f"{d['local_own_site']:.3f} / {d['local_other_sites']:.3f} ({d['local_gap']:+.3f})",
        )
        yield (
            f"{name}: FedAvg all sites / leave-one-site-out, at the site",
            "test AUROC (gap)",
            f"{d['fedavg_all_mean']:.3f} / {d['loso_mean']:.3f} ({d['loso_gap']:+.3f})",
        )


def _repeatability(r: dict[str, Any]) -> Iterator[Row]:
    for name, result in r["configs"].items():
        figures = " and ".join(f"{metric} >= {low}" for metric, low in result["figures"].items())
        worst = " / ".join(
            f"{metric} {_f(min(site[metric] for run in result['runs'] for site in run['per_site'].values()))}"
            for metric in result["figures"]
        )
        value = f"{result['reached']} of {len(result['runs'])} runs (worst site of any run: {worst})"
        yield (
            f"configs/{name}.toml, {'as shipped' if r.get('as_shipped') else 'cross-site matrix off'}, "
            f"run.seed 0..{len(result['runs']) - 1}",
            f"{figures} at every site",
            value,
        )


def _dp_small_sites(r: dict[str, Any]) -> Iterator[Row]:
    for row in r.get("chasedb1", {}).get("rows", []):
        sites = " / ".join(_f(site["value"]) for site in row["per_site"].values())
        yield (
            f"CHASE_DB1 3 sites, ε=8 per image: {row['name']}",
            "test Dice per site (worst)",
            f"{sites} ({_f(row['worst'])})",
        )
    for row in r.get("pneumoniamnist", {}).get("rows", []):
        yield (
            f"PneumoniaMNIST 3 sites, ε=8: {row['name']}",
            "test AUROC [95% CI]; / no DP",
            f"{_ci(row['test_auroc'])}; {_ci(row['auroc_over_no_dp'], 3)}",
        )
    for row in r.get("speed", []):
        yield (
            row["name"],
            "images/s without / with DP (ratio)",
            (f"{row['samples_per_s']:.0f} / {row['dp_samples_per_s']:.0f} ({row['dp_ratio']:.2f})"),
        )


def _heart(r: dict[str, Any]) -> Iterator[Row]:
    for mode, privacy in (("nodp", "no DP"), ("dp", "ε=8 per patient")):
        if mode not in r["results"]:
            continue
        entry = r["results"][mode]
        seeds = len(entry["runs"])
        for method in ("local", "pooled", "fedavg", "fedprox"):
            acc = entry["summary"][method]["accuracy"]["mean_of_sites"]
            auc = entry["summary"][method]["auroc"]["mean_of_sites"]
            yield (
                f"UCI heart, 4 real hospitals, {method}, {privacy}",
                f"test accuracy / AUROC (mean of hospitals; mean ± SD over {seeds} seed(s))",
                f"{_f(acc['mean'])} ± {_f(acc['sd'])} / {_f(auc['mean'])} ± {_f(auc['sd'])}",
            )
    yield "UCI heart, FedAvg / pooled accuracy", "goal >= 0.97", _f(r["goals"]["fedavg_over_pooled_accuracy"])


def _natural_sites(r: dict[str, Any]) -> Iterator[Row]:
    for part, privacy in (("protocol", "no DP"), ("protocol-dp", "ε=8 per image")):
        if part not in r:
            continue
        report, sites = r[part], r[part]["sites"]
        rows = dict(zip(report["models"], report["matrix"], strict=True))
        at = {s: i for i, s in enumerate(sites)}
        federated = rows[report["federated"]]
        own = [rows[f"local:{s}"][at[s]]["value"] for s in sites]
        best_other = [max(rows[f"local:{m}"][at[s]]["value"] for m in sites if m != s) for s in sites]
        loso = [report["leave_one_site_out"][s]["value"] for s in sites]
        label = f"3 real hospitals ({' / '.join(sites)}), {privacy}"
        yield f"{label}: FedAvg", "test Dice at each site", " / ".join(_f(c["value"]) for c in federated)
        yield f"{label}: each site's local model", "test Dice at its own site", " / ".join(map(_f, own))
        yield f"{label}: best other site's local model", "test Dice at the site", " / ".join(map(_f, best_other))
        yield f"{label}: FedAvg without the site (LOSO)", "test Dice at the unseen site", " / ".join(map(_f, loso))
        yield f"{label}: pooled", "test Dice at each site", " / ".join(_f(c["value"]) for c in rows["pooled"])
    for third, result in r.get("ladder", {}).items():
        for name, row in result["rows"].items():
            sites = " / ".join(_f(site["value"]) for site in row["per_site"].values())
            yield (f"{third} as 3 private sites, ε=8 per image: {name}", "test Dice per site (worst)",
                   f"{sites} ({_f(row['worst'])})")  # fmt: skip


def _site_level_dp(r: dict[str, Any]) -> Iterator[Row]:
    for run in r["runs"]:
        spent = run["site_level"].get("epsilon")
        privacy = f", site-level ε {spent:.2f}" if spent is not None else ""
        yield (f"{r['sites']} synthetic sites, {r['rounds']} rounds: {run['label']}{privacy}",
               "test AUROC, mean of sites (worst)", f"{_f(run['mean_auroc'])} ({_f(run['worst_auroc'])})")  # fmt: skip


def _privacy_audit(r: dict[str, Any]) -> Iterator[Row]:
    for row in r["settings"]:
        spent = (
            f" (spent {_f(row['epsilon'], 2)}, AUC ceiling {_f(row['theory']['auc_ceiling'])})"
            if row["epsilon"]
            else ""
        )
        setting = f"synthetic site, {row['members']} train / {row['nonmembers']} held out, {row['setting']}{spent}"
        for attack, result in row["attacks"].items():
            low, high = result["auc_ci95"]
            rate = result["tpr_at_fpr"]["0.01"]
            yield (setting, f"{attack} attack AUC [95% CI]; TPR at 1% FPR",
                   f"{_f(result['auc'])} [{_f(low)}, {_f(high)}]; {_f(rate['tpr'] if rate else None)}")  # fmt: skip
        canaries = row["canaries"]
        yield (
            setting,
            "canary exposure, mean bits (at most)",
            f"{_f(canaries['mean_bits'], 2)} ({_f(canaries['max_bits'], 2)})",
        )


def _multilabel(r: dict[str, Any]) -> Iterator[Row]:
    for mode, label in (("dp", "DP ε=8"), ("no_dp", "no DP")):
        runs = [run for run in r["runs"] if run["dp"] == (mode == "dp")]
        if not runs:
            continue
        setting = f"3 synthetic sites, 3 findings, {label}"
        yield (
            f"{setting}, one multi-label model",
            "test AUROC, mean of findings",
            _spread([run["multilabel_mean"] for run in runs]),
        )
        yield (
            f"{setting}, one binary model per finding",
            "test AUROC, mean of findings",
            _spread([run["binary_mean"] for run in runs]),
        )
        met = "met" if r["summary"][mode]["goal_met"] else "not met"
        yield setting, "gap (binary - multi-label), goal <= 0.03", f"{_spread([run['gap'] for run in runs])}: {met}"


def _partial_labels(r: dict[str, Any]) -> Iterator[Row]:
    partial = r["partial_site"]
    for run in r["runs"]:
        hidden = run["dice_site3_hidden_labels"]
        others = [v["structure 2"] for site, v in sorted(run["dice_per_site"].items()) if site != partial]
        yield (f"3 synthetic sites, {partial} labels structure 1 of 2, {r['rounds']} rounds: {run['label']}",
               f"test Dice, structure 1 / 2 at {partial} (its hidden full labels); structure 2 at the others",
               f"{_f(hidden['structure 1'])} / {_f(hidden['structure 2'])}; {' / '.join(_f(v) for v in others)}")  # fmt: skip


def _personalization(r: dict[str, Any]) -> Iterator[Row]:
    for name, d in r["datasets"].items():
        for label, runs in d["runs"].items():
            yield (
                f"{name}, {label}: {' / '.join(runs)}",
                f"worst site's test {d['metric']}",
                " / ".join(_f(run["worst"]) for run in runs.values()),
            )


def _instance_segmentation(r: dict[str, Any]) -> Iterator[Row]:
    for mode, label in (("dp", "DP ε=8 per site"), ("nodp", "no DP")):
        if mode not in r["modes"]:
            continue
        runs, spread = r["modes"][mode]["runs"], r["modes"][mode]["spread"]
        setting = f"touching nuclei, 3 synthetic sites, {label}, {len(runs)} seed(s)"
        means = " / ".join(_f(spread[m]["mean"]) for m in ("aji", "pq", "f1_50", "dice"))
        yield setting, "test AJI / PQ / F1@0.5 / Dice, mean of sites and seeds", means
        yield (
            setting,
            "test AJI, worst-best site over seeds",
            f"{_f(spread['aji']['worst_site'])}-{_f(spread['aji']['best_site'])}",
        )


def _detection3d(r: dict[str, Any]) -> Iterator[Row]:
    for mode, label in (("nodp", "no DP"), ("dp", "DP ε=8 per site")):
        spread = r.get("modes", {}).get(mode)
        if not spread:
            continue
        setting = f"3D lung nodules, FedAvg 3 synthetic CT sites, {label}, {spread['runs']} seed(s)"
        yield setting, "test CPM (LUNA16), mean of sites and seeds", _f(spread["cpm_mean"])
        yield setting, "test CPM, worst-best site", f"{_f(spread['cpm_worst_site'])}-{_f(spread['cpm_best_site'])}"


def _generative_masks(r: dict[str, Any]) -> Iterator[Row]:
    mode = "DP ε=8 per site" if r["dp"] else "no DP"
    setting = (f"lesions, FedAvg 3 synthetic sites x {r['samples_per_site']} images ({r['image_size']} px), {mode}, "
               f"seed {r['seed']}: real only / + {r['ratio']:g} generated pair(s) per image "
               f"(mask-conditioned generator, {r['generator_steps']} steps)")  # fmt: skip
    arms = r["arms"]
    value = " / ".join(_f(arms[arm]["mean"]) for arm in ("none", "generated") if arm in arms)
    yield setting, "test Dice, mean of sites", value


FORMATS: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "spine": _spine,
    "detection-bccd": _pooled_vs_fedavg("BCCD detection", "mAP@0.5"),
    "segmentation-chasedb1": _pooled_vs_fedavg("CHASE_DB1 vessels", "Dice"),
    "data-loading": _data_loading,
    "scale": _scale,
    "deployment-overhead": _overhead,
    "utility": _utility,
    "privacy": _privacy,
    "overhead": _sim_overhead,
    "generalization": _generalization,
    "dp-small-sites": _dp_small_sites,
    "natural-sites": _natural_sites,
    "heart": _heart,
    "repeatability": _repeatability,
    "site-level-dp": _site_level_dp,
    "privacy-audit": _privacy_audit,
    "multilabel": _multilabel,
    "partial-labels": _partial_labels,
    "personalization": _personalization,
    "instance-segmentation": _instance_segmentation,
    "detection3d": _detection3d,
    "generative-masks": _generative_masks,
    "generative-masks-dp": _generative_masks,
}


def table() -> str:
    """The markdown table of every known result file, in file-name order."""
    lines = ["| benchmark | setting | measure | value |", "| --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        name = str(result.get("benchmark", path.stem)).replace("_", "-")
        if name not in FORMATS or result.get("quick"):
            continue
        for setting, measure, value in FORMATS[name](result):
            lines.append(f"| [{path.stem}](benchmarks/results/{path.name}) | {setting} | {measure} | {value} |")
    return "\n".join(lines)


def updated(readme: str) -> str:
    """``readme`` with the table between the markers replaced by :func:`table`."""
    if START not in readme or END not in readme:
        raise ValueError(f"README.md needs the lines {START} and {END} around the results table")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = parser.parse_args()
    readme = REPO / "README.md"
    current = readme.read_text()
    new = updated(current)
    if args.check:
        if new != current:
            print("README.md results table is out of date: run .venv/bin/python benchmarks/readme_table.py")
            sys.exit(1)
        return
    readme.write_text(new)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
