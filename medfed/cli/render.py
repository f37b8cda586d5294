"""The tables the commands print: built here from reports and results, printed by the commands."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from medfed.display import plain

if TYPE_CHECKING:
    from medfed.data import SiteArrays
    from medfed.predict import Predictions
    from medfed.privacy import PrivacyLedger, PrivacyPlan

__all__ = [
    "ledger_table",
    "larger_batches_table",
    "metrics_table",
    "num",
    "predictions_table",
    "print_protocol",
    "print_summary",
    "split_class_table",
]


def num(value: float | None) -> str:
    """A metric with three decimals; ``n/a`` for None or NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def print_summary(console: Console, report: dict[str, Any]) -> None:
    """A simulation's final global model at each site (test split), its operating threshold, the
    pooled test figures and the cross-site matrix, as far as ``report`` holds them."""
    metric = report["primary_metric"]
    table = Table(title=f"Final global model, test split ({metric})")
    table.add_column("site")
    table.add_column(f"{metric} round 0 (val)", justify="right")
    table.add_column(f"{metric} final (test)", justify="right")
    finals = report["final"]["per_site"].values()
    point = report["final"].get("operating_point")
    if point:  # a binary classifier: what a clinician reads at the operating threshold
        others = ["sensitivity", "specificity"]
    else:
        others = [next((m for m in ("accuracy", "iou", "map") if any(m in v for v in finals)), "loss")]
    for other in others:
        table.add_column(f"{other} (test)", justify="right")
    table.add_column("ε spent / budget", justify="right")
    settings = report["config"]["privacy"]
    private = settings["enabled"] and settings.get("level", "sample") != "site"  # DP-SGD at the sites
    for site in report["sites"]:
        start = report["rounds"][0]["metrics"].get(site, {}).get(metric)
        final = report["final"]["per_site"].get(site, {})
        privacy = report["privacy"].get(site)
        if privacy:
            spent = f"{privacy['epsilon']:.2f} / {privacy['budget']:.2f}"
        else:  # a site that never reported its spending under DP did not train
            spent = "not trained" if private else "DP off"
        table.add_row(plain(site), num(start), num(final.get(metric)), *[num(final.get(o)) for o in others], spent)
    console.print(table)
    site_level = report.get("site_privacy")
    if site_level:
        console.print(
            f"site-level DP (each whole site): ε {site_level['epsilon']:.2f} at δ {site_level['delta']:.1e} over "
            f"{site_level['rounds']} rounds, {site_level['sites']} sites sampled at rate {site_level['sample_rate']:g}, "
            f"noise multiplier {site_level['noise_multiplier']:.3f}"
        )
    if point:
        console.print(f"operating threshold {point['threshold']:.3f} ({point['method']})")
        if point.get("per_site"):
            own = ", ".join(f"{plain(site)} {p['threshold']:.3f}" for site, p in point["per_site"].items())
            console.print(f"each site's own, chosen on its validation split and used above: {own}")
    pooled = report["final"].get("pooled")
    if pooled:
        shown = ", ".join(f"{k} {num(v)}" for k, v in pooled.items() if k in (metric, "sensitivity", "specificity"))
        console.print(f"all sites' test cases together: {shown}")
    personal = report["final"].get("personalization")
    if personal:
        mine = Table(title=f"Personal models ({personal['method']}), test {personal['metric']} [95% interval]")
        for column in ("site", "global", "personal", "personal - global"):
            mine.add_column(column, justify="left" if column == "site" else "right")
        for site, entry in personal["per_site"].items():
            cells = [f"{num(e['value'])} [{num(e['low'])}, {num(e['high'])}]" for e in entry.values()]
            mine.add_row(plain(site), *cells)
        console.print(mine)
    cross = report["final"].get("cross_site")
    if cross:
        matrix = Table(title=f"Cross-site {cross['metric']} (rows: model, columns: test site)")
        matrix.add_column("model")
        for site in cross["sites"]:
            matrix.add_column(plain(site), justify="right")
        for model, row in zip(cross["models"], cross["matrix"], strict=True):
            matrix.add_row(plain(model), *[num(v) for v in row])
        console.print(matrix)


def print_protocol(console: Console, report: dict[str, Any]) -> None:
    """The protocol's matrix (value and 95% interval per cell), its LOSO row and each model's gap."""

    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "n/a"
        low, high = ("n/a" if entry[k] is None else f"{entry[k]:.2f}" for k in ("low", "high"))
        return f"{num(entry['value'])} [{low}, {high}]"

    table = Table(title=f"Cross-site protocol, test {report['metric']} [95% interval]", box=None, pad_edge=False)
    table.add_column("model", no_wrap=True)
    for site in report["sites"]:
        table.add_column(plain(site), justify="right")
    table.add_column("gap", justify="right", no_wrap=True)
    for model, row in zip(report["models"], report["matrix"], strict=True):
        gap = report["gap"][model]["gap"]
        table.add_row(plain(model), *map(cell, row), "n/a" if gap is None or math.isnan(gap) else f"{gap:+.3f}")
    loso = report["leave_one_site_out"]
    table.add_row("LOSO", *[cell(loso.get(s)) for s in report["sites"]], "")
    console.print(table)
    console.print("LOSO: the federation without the site it is scored at (leave-one-site-out)")
    console.print("gap: own site minus other sites (local models); mean over sites minus LOSO (federated, pooled)")
    if report["privacy"]:
        spent = ", ".join(f"{plain(s)} {t['epsilon']:.2f}" for s, t in report["privacy"]["total"].items())
        console.print(f"ε spent at each site over all the protocol's models: {spent}")


def metrics_table(title: str, results: dict[str, float]) -> Table:
    """One row per metric: its name and value."""
    table = Table(title=plain(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results.items():
        table.add_row(plain(name), num(value))
    return table


def predictions_table(title: str, predictions: Predictions) -> Table:
    """One row per case a model was applied to, with the columns of its task."""
    table = Table(title=title)
    kind = predictions.task
    columns = {
        "detection": ("case", "detections", "written"),
        "classification": ("case", "call", "probability"),
        "tabular": ("case", "call", "probability"),
        "segmentation": ("case", "structures", "size", "written"),
        "instance-segmentation": ("case", "objects", "area", "written"),
    }[kind]
    for column in columns:
        table.add_column(column, justify="left" if column in ("case", "written", "call") else "right")
    for r in predictions.cases:
        written = plain(", ".join(p.name for p in r.outputs))
        if kind == "detection":
            table.add_row(plain(r.case), str(r.count), written)
        elif kind in ("classification", "tabular"):
            table.add_row(plain(r.case), plain(r.call), f"{r.probability:.3f}")
        else:
            table.add_row(plain(r.case), str(r.count), f"{r.size:.3f} {r.unit}", written)
    return table


def split_class_table(site: SiteArrays, num_classes: int, names: tuple[str, ...], splits: tuple[str, ...]) -> Table:
    """A checked site's samples per split and class; for boxes, images, images without boxes and
    boxes per class."""
    import numpy as np

    if site.target_key == "boxes":
        table = Table(title="images and boxes per split and class")
        table.add_column("split")
        table.add_column("images", justify="right")
        table.add_column("without boxes", justify="right")
        for k in range(num_classes):
            table.add_column(plain(names[k]) if k < len(names) else f"class {k}", justify="right")
        for split in splits:
            boxes = site.targets[site.splits == split]
            classes = boxes[..., -1]
            empty = int(np.sum((classes < 0).all(axis=1))) if len(boxes) else 0
            counts = [str(int(np.sum(classes == k))) for k in range(num_classes)]
            table.add_row(split, str(len(boxes)), str(empty), *counts)
        return table
    if site.target_key == "label" and site.targets.ndim == 2:  # multi-label: images holding each finding
        table = Table(title="images per split, and images holding each finding")
        table.add_column("split")
        table.add_column("images", justify="right")
        for k in range(num_classes):
            table.add_column(plain(names[k]) if k < len(names) else f"class {k}", justify="right")
        for split in splits:
            rows = site.targets[site.splits == split]
            table.add_row(split, str(len(rows)), *[str(int(rows[:, k].sum())) for k in range(num_classes)])
        return table
    table = Table(
        title="samples per split and class" + (" (largest class in the mask)" if site.target_key == "mask" else "")
    )
    table.add_column("split")
    for k in range(num_classes):
        table.add_column(f"class {k}", justify="right")
    for split in splits:
        labels = site.class_labels()[site.splits == split]
        table.add_row(split, *[str(int(np.sum(labels == k))) for k in range(num_classes)])
    return table


def ledger_table(title: str, ledger: PrivacyLedger, lifetime: float | None) -> Table:
    """A site's privacy ledger: ε spent over all runs, δ, runs, rounds and steps; the budget and
    what remains when a lifetime budget is known."""
    table = Table(title=plain(title))
    table.add_column("")
    table.add_column("value", justify="right")
    spent = ledger.epsilon()
    table.add_row("ε spent (all runs)", f"{spent:.3f}")
    table.add_row("δ", f"{ledger.delta:.2e}")
    table.add_row("accountant", plain(ledger.accountant))
    table.add_row("runs", str(len(ledger.calibrations)))
    table.add_row("rounds trained", str(len(ledger.history)))
    table.add_row("optimizer steps", str(sum(int(steps) for _, _, steps in ledger.history)))
    if lifetime is not None:
        table.add_row("budget", f"{float(lifetime):.3f}")
        table.add_row("remaining", f"{max(float(lifetime) - spent, 0.0):.3f}")
    else:
        table.add_row("budget", "not set here: each run's privacy.budget applies")
    return table


def larger_batches_table(plans: list[PrivacyPlan]) -> Table:
    """The same private run planned with other batch sizes: σ, σ per batch and the run's steps."""
    table = Table(title="the same run with larger batches")
    for column in ("batch", "σ", "σ/batch", "steps"):
        table.add_column(column)
    for plan in plans:
        table.add_row(
            str(plan.batch_size), f"{plan.noise_multiplier:.2f}", f"{plan.noise_per_batch:.4f}", str(plan.run_steps)
        )
    return table
