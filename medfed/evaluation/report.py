"""The run report: ``report.json`` (schema in design.md), ``report.html`` and ``plots/*.png``."""

from __future__ import annotations

import html
import json
import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from medfed.evaluation.explain import EXAMPLE_CAPTIONS
from medfed.run_folder import RunFolder
from medfed.tasks import get_task

__all__ = ["class_name", "json_safe", "write_report", "write_report_page"]

HEADLINE_METRICS = (
    *("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "ece"),
    *("dice", "iou", "hd95", "dice_pooled", "rel_size_error_median", "count_error_mean"),
    *("map50", "map", "froc"),
    *("aji", "pq", "sq", "f1_50"),
)
PR_KEY = re.compile(r"^pr50_class_(\d+)@([0-9.]+)$")
FROC_KEY = re.compile(r"^froc@([0-9.]+)fp$")


def json_safe(value: Any) -> Any:
    """NaN/Inf become ``null`` so the JSON is valid everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], out_dir: str | Path, examples: dict[str, list[str]] | None = None) -> Path:
    """Write report.json, the plots and report.html into ``out_dir``; return the HTML path.

    ``examples`` maps a site to example figures (PNG paths relative to ``out_dir``) made at that
    site: Grad-CAM for classification, predicted vs reference masks for segmentation.
    """
    folder = RunFolder(Path(out_dir))
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.report_json.write_text(json.dumps(json_safe(report), indent=1))
    return write_report_page(report, folder.root, examples)


def write_report_page(
    report: dict[str, Any], out_dir: str | Path, examples: dict[str, list[str]] | None = None
) -> Path:
    """Write the plots and report.html of ``report`` into ``out_dir`` (not report.json); return the
    HTML path. A report with ``running: {"round": k, "rounds": n}`` (a run still going,
    :func:`medfed.run_status.running_report`) gives a page marked running, which reloads itself."""
    matplotlib.use("Agg")  # figures go to files: no display needed (a server has none)
    folder = RunFolder(Path(out_dir))
    plots = folder.plots
    plots.mkdir(parents=True, exist_ok=True)
    figures = {
        "metric per round": _plot_rounds(report, plots / "metric_per_round.png"),
        "privacy spent per round": _plot_epsilon(report, plots / "epsilon_per_round.png"),
        "cross-site matrix": _plot_cross_site(report, plots / "cross_site.png"),
        "precision-recall curves at IoU 0.5": _plot_pr(report, plots / "precision_recall.png"),
        "FROC curve": _plot_froc(report, plots / "froc.png"),
        "reliability of the predicted probabilities": _plot_reliability(report, plots / "reliability.png"),
    }
    page = _render_html(report, {k: v.relative_to(folder.root) for k, v in figures.items() if v}, examples or {})
    hidden = folder.report_html.with_name(f".{folder.report_html.name}")
    hidden.write_text(page)
    os.replace(hidden, folder.report_html)  # a browser reloading it mid-run reads a whole page
    return folder.report_html


def _plot_rounds(report: dict[str, Any], path: Path) -> Path:
    metric = report["primary_metric"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for site in report["sites"]:
        xs = [r["round"] for r in report["rounds"] if site in r["metrics"]]
        ys = [r["metrics"][site].get(metric, math.nan) for r in report["rounds"] if site in r["metrics"]]
        ax.plot(xs, ys, marker="o", label=site)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds, not 0.25 of one
    return _save_round_plot(fig, ax, path, f"validation {metric}", f"Global model, validation {metric} at each site")


def _plot_epsilon(report: dict[str, Any], path: Path) -> Path | None:
    if not report["privacy"]:
        return None
    rounds = [r["round"] for r in report["rounds"]]
    baseline_x = rounds[-1] + 1
    with_baseline = bool(report["final"].get("cross_site"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for site in report["sites"]:
        xs = [r["round"] for r in report["rounds"] if site in r.get("epsilon", {})]
        ys = [r["epsilon"][site] for r in report["rounds"] if site in r.get("epsilon", {})]
        if with_baseline and site in report["privacy"]:
            xs, ys = [*xs, baseline_x], [*ys, report["privacy"][site]["epsilon"]]
        ax.plot(xs, ys, marker="o", label=site)
    budgets = {p["budget"] for p in report["privacy"].values() if "budget" in p}
    for budget in budgets:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget ε={budget:g}")
    ticks = [*rounds[1:], baseline_x] if with_baseline else rounds[1:]
    ax.set_xticks(ticks, [*map(str, rounds[1:]), "+ local\nbaseline"] if with_baseline else list(map(str, ticks)))
    return _save_round_plot(fig, ax, path, "ε spent (cumulative)", "Differential privacy spent at each site")


def _save_round_plot(fig: Any, ax: Any, path: Path, ylabel: str, title: str, xlabel: str = "round") -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_cross_site(report: dict[str, Any], path: Path) -> Path | None:
    cross = report["final"].get("cross_site")
    if not cross or not cross["matrix"]:
        return None
    matrix = [[math.nan if v is None else v for v in row] for row in cross["matrix"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(cross["sites"]) + 2.5, 0.6 * len(cross["models"]) + 1.8))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0 if cross["metric"] != "auroc" else 0.5, vmax=1.0)
    ax.set_xticks(range(len(cross["sites"])), [f"test @ {s}" for s in cross["sites"]], rotation=30, ha="right")
    ax.set_yticks(range(len(cross["models"])), [m if m == "global" else f"trained @ {m}" for m in cross["models"]])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            text = "n/a" if math.isnan(value) else f"{value:.3f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if value < 0.8 else "black", fontsize=9)
    fig.colorbar(image, ax=ax, label=cross["metric"])
    ax.set_title(f"Cross-site {cross['metric']}: rows are models, columns test sites")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_reliability(report: dict[str, Any], path: Path) -> Path | None:
    """Per site: accuracy against mean confidence in each confidence bin of the test split (a
    calibrated model lies on the diagonal), marker area by the bin's share of cases."""
    per_site = report["final"]["per_site"]
    if not any("ece" in v for v in per_site.values()):
        return None
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for site in report["sites"]:
        values = per_site.get(site, {})
        bins = sorted(int(k.split("@")[1]) for k in values if k.startswith("calibration_acc@"))
        if not bins:
            continue
        total = sum(values.get(f"calibration_n@{b}", 0.0) for b in bins) or 1.0
        xs = [values[f"calibration_conf@{b}"] for b in bins]
        ys = [values[f"calibration_acc@{b}"] for b in bins]
        sizes = [400 * values.get(f"calibration_n@{b}", 0.0) / total for b in bins]
        line = ax.plot(xs, ys, marker="", label=f"{site} (ECE {_fmt(values.get('ece'))})")[0]
        ax.scatter(xs, ys, s=sizes, color=line.get_color(), alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    return _save_round_plot(
        fig, ax, path, "fraction correct", "Reliability on each site's test split", "confidence of the call"
    )


def class_name(report: dict[str, Any], index: int) -> str:
    """The configured name of class ``index`` (``data.class-names``), else ``class <index>``."""
    names = report["config"]["data"].get("class-names") or []
    return str(names[index]) if index < len(names) else f"class {index}"


def _plot_pr(report: dict[str, Any], path: Path) -> Path | None:
    """Per class, precision against recall of the final global model on each site's test split."""
    curves: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for site, values in report["final"]["per_site"].items():
        for key, value in values.items():
            match = PR_KEY.match(key)
            if match and value is not None:
                curves.setdefault(int(match[1]), {}).setdefault(site, []).append((float(match[2]), value))
    if not curves:
        return None
    classes = sorted(curves)
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.2), squeeze=False)
    for ax, c in zip(axes[0], classes, strict=True):
        for site, points in sorted(curves[c].items()):
            recall, precision = zip(*sorted(points), strict=True)
            ax.plot(recall, precision, marker=".", label=site)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=class_name(report, c))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Final global model, test split: precision vs recall (IoU >= 0.5)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_froc(report: dict[str, Any], path: Path) -> Path | None:
    """Sensitivity against false positives per image (log scale), final global model, each site."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    drawn = False
    for site, values in sorted(report["final"]["per_site"].items()):
        points = sorted((float(m[1]), v) for k, v in values.items() if (m := FROC_KEY.match(k)) and v is not None)
        if points:
            rates, sensitivity = zip(*points, strict=True)
            ax.plot(rates, sensitivity, marker="o", label=f"{site} (mean {values.get('froc') or 0:.3f})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set(ylim=(0, 1.02))
    return _save_round_plot(
        fig, ax, path, "sensitivity", "FROC, final global model, test split", "false positives per image"
    )


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:.3f}"
    return html.escape(str(value))


def _pair(values: dict[str, Any], c: int) -> str:
    return f"{_fmt(values.get(f'ap50_class_{c}'))} / {_fmt(values.get(f'ap_class_{c}'))}"


def _synthetic_sections(report: dict[str, Any]) -> list[str]:
    """``train.synthetic-augmentation``: the ratio, what each site's generator added and how it was
    trained, and what training it without DP means."""
    synthetic = report.get("synthetic")
    if not synthetic:
        return []
    names = list(report["config"]["data"].get("class-names") or [])
    sites = synthetic["sites"]
    classes = max((len(e["per_class"]) for e in sites.values()), default=0)
    names = [names[c] if c < len(names) else f"class {c}" for c in range(classes)]
    rows = [
        [site, e["images"], *e["per_class"], "DP-SGD" if e["private"] else "no DP", e["epsilon"], e["steps"],
         e["seconds"]]
        for site, e in sites.items()
    ]  # fmt: skip
    segmentation = report.get("task") == "segmentation"
    model = "segmentation model" if segmentation else "classifier"
    private = [e["private"] for e in sites.values()]
    if private and all(private):
        meaning = (
            "Each generator was trained with DP-SGD and its steps charged to the site's privacy ledger "
            f"before the {model}'s: the ε in the privacy table covers both, and the {model}'s noise was "
            "calibrated for what the generator left of the run's target."
        )
    else:
        meaning = (
            "<b>The generators were trained without DP.</b> A generator sees the site's images as the "
            f"{model} does, and its images may reproduce them: they stayed at the site, as sensitive as its "
            f"data, and no per-patient privacy guarantee covers the {model} trained on them."
        )
    if segmentation:
        what = (
            "a mask-conditioned image generator ({steps} steps) on its own training images and masks, and added "
            "{ratio:g} generated pairs per training image: one of its own training masks, flipped or turned, with "
            "an image drawn for it, the masks of its scarcer classes first (counted below by the largest class in "
            "the mask)."
        )
        names = [f"largest {n}" for n in names]
    else:
        what = (
            "a class-conditional image generator ({steps} steps) on its own training images and added {ratio:g} "
            "generated images per training image, each to the class that then had the fewest."
        )
    return [
        "<h2>Generated training images</h2><p>Before its first round each site trained "
        f"{what.format(steps=synthetic['steps'], ratio=synthetic['ratio'])} {meaning} "
        "FedAvg weighs each site by its real images only.</p>",
        _table(
            ["site", "generated", *[f"of {n}" for n in names], "generator", "generator ε", "steps", "seconds"], rows
        ),  # fmt: skip
    ]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _src(path: str | Path) -> str:
    """A file's path relative to the report as an ``src`` value: percent-encoded, since a site's
    name (a folder name, in a natural partition) is part of an example figure's file name and may
    hold a space, ``#`` or ``%``."""
    return html.escape(urllib.parse.quote(Path(path).as_posix()))


LABEL_COLUMNS = ["finding", "threshold", "val sensitivity", "val specificity", "test AUROC", "test sensitivity",
                 "test specificity"]  # fmt: skip


def _label_sections(report: dict[str, Any], point: dict[str, Any]) -> list[str]:
    """Multi-label: each finding's threshold (chosen on the validation splits) and its metrics over
    all sites' test cases together."""
    names = report["config"]["data"].get("class-names") or []
    pooled = report["final"].get("pooled") or {}
    rows = []
    for k, threshold in enumerate(point["label_thresholds"]):
        rows.append([names[k] if k < len(names) else f"class {k}", threshold, point.get(f"val_sensitivity_class_{k}"),
                     point.get(f"val_specificity_class_{k}"), pooled.get(f"auroc_class_{k}"),
                     pooled.get(f"sensitivity_class_{k}"), pooled.get(f"specificity_class_{k}")])  # fmt: skip
    return [
        "<h2>Findings (multi-label)</h2>",
        "<p>Each finding is called present when its probability reaches its own threshold, chosen on the "
        f"validation splits ({html.escape(point['method'])}) and stored in the global model's checkpoint for "
        "<code>medfed evaluate</code> and <code>medfed predict</code>. AUROC, sensitivity and specificity: all "
        "sites' test cases together (from counts per score bin that the sites sent); the headline AUROC is "
        "their mean over findings.</p>",
        _table(LABEL_COLUMNS, rows),
    ]


def _render_html(report: dict[str, Any], figures: dict[str, Path], examples: dict[str, list[str]]) -> str:
    metric = report["primary_metric"]
    running = report.get("running")
    per_site = report["rounds"][-1]["metrics"] if running else report["final"]["per_site"]
    metric_names = [m for m in HEADLINE_METRICS if any(m in v for v in per_site.values())] or [metric]
    site_rows = []
    for site in report["sites"]:
        values = per_site.get(site, {})
        privacy = report["privacy"].get(site, {})
        unprotected = "no DP-SGD here (site-level DP: below)" if report.get("site_privacy") else "DP off"
        spent = f"{privacy['epsilon']:.2f} of {privacy['budget']:.2f}" if privacy else unprotected
        site_rows.append([site, *[values.get(m) for m in metric_names], spent])
    sections = [
        f"<h1>medfed report: {html.escape(report['config']['run']['name'])}</h1>",
        *([_running_banner(running)] if running else []),
        f"<p>Task <b>{html.escape(report['task'])}</b>, {len(report['sites'])} sites, "
        f"{len(report['rounds']) - 1} rounds, strategy {html.escape(report['config']['run']['strategy'])}, "
        f"differential privacy {'on' if report['config']['privacy']['enabled'] else '<b>off</b>'}. "
        f"Ranked by <b>{html.escape(metric)}</b>.</p>",
        f"<h2>Global model after round {report['rounds'][-1]['round']} on each site's validation split</h2>"
        if running
        else "<h2>Final global model on each site's test split</h2>",
        _table(["site", *metric_names, "privacy ε spent"], site_rows),
    ]
    sections += _label_coverage(report, per_site, metric)
    point = report["final"].get("operating_point")
    if point and "label_thresholds" in point:
        sections.extend(_label_sections(report, point))
    elif point:
        pooled = report["final"].get("pooled") or {}
        own = point.get("per_site") or {}
        listed = ", ".join(f"{html.escape(site)} {values['threshold']:.3f}" for site, values in own.items())
        where = (
            "each site's own threshold on the probability of class 1, chosen the same way on its own validation "
            f"split ({listed}; "
            "<code>--site NAME</code> of <code>medfed evaluate</code> and <code>medfed predict</code>), or where a "
            "site's validation split holds one class, "
            if own
            else ""
        )
        sections.append(
            f"<p>Sensitivity, specificity, precision and accuracy are at {where}the operating threshold "
            f"<b>{point['threshold']:.3f}</b> on the probability of class 1 ({html.escape(point['method'])}; "
            f"validation sensitivity {_fmt(point.get('val_sensitivity'))}, specificity "
            f"{_fmt(point.get('val_specificity'))}), which is stored in the global model's checkpoint and used by "
            "<code>medfed evaluate</code> and <code>medfed predict</code>. ECE: expected calibration "
            "error over 10 confidence bins.</p>"
        )
        if pooled:
            sections.append(
                f"<p>All sites' test cases together ({_fmt(pooled.get('positives'))} positive, "
                f"{_fmt(pooled.get('negatives'))} negative): AUROC {_fmt(pooled.get('auroc'))}, sensitivity "
                f"{_fmt(pooled.get('sensitivity'))}, specificity {_fmt(pooled.get('specificity'))} (from "
                "counts per score bin that the sites sent).</p>"
            )
    classes = sorted({int(m[1]) for v in per_site.values() for k in v if (m := re.match(r"^ap50_class_(\d+)$", k))})
    if classes:
        sections += [
            "<h2>Average precision per class (test split)</h2><p>AP at IoU 0.5 / COCO AP over IoU 0.50:0.95, "
            "up to 100 detections per image; n/a where the site's test split has no object of the class.</p>",
            _table(
                ["site", *[class_name(report, c) for c in classes]],
                [[site, *[_pair(per_site.get(site, {}), c) for c in classes]] for site in report["sites"]],
            ),
        ]
    cards = report.get("data_cards") or {}
    if cards:
        sections.append("<h2>How each site's files became model inputs</h2>")
        for site, lines in cards.items():
            items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
            sections.append(f"<p><b>{html.escape(site)}</b></p><ul>{items}</ul>")
    sections += _personal_section(report["final"].get("personalization"))
    cross = report["final"].get("cross_site")
    if cross:
        sections += [
            "<h2>Cross-site generalisation</h2>",
            "<p>Each row is a model: a site's model trained only on its own data, or the federated "
            "global model. Each column is a site's test split. Off-diagonal cells show how a model "
            "travels to other hospitals. The row <i>personal</i>, when there is one, is each site's own "
            "personal model on its own test split (personal models never leave their site).</p>",
            _table(
                ["model", *[f"test @ {site}" for site in cross["sites"]]],
                [
                    [m if m in ("global", "personal") else f"trained @ {m}", *row]
                    for m, row in zip(cross["models"], cross["matrix"], strict=True)
                ],
            ),
        ]
    for title, rel in figures.items():
        sections.append(f"<h2>{html.escape(title.capitalize())}</h2><img src='{_src(rel)}' alt='{html.escape(title)}'>")
    if report.get("round_figures"):
        sections.append(
            "<h2>Generated samples per round</h2><p>The global generator's samples after each round, one row "
            "per class, from the same noise every round. Drawn from the released weights only (no site data): "
            "under DP at the sites they are as private as the weights.</p>"
        )
        tiles = "".join(f"<img src='{_src(p)}' alt='{html.escape(r)}'>" for r, p in report["round_figures"].items())
        sections.append(f"<div>{tiles}</div>")
    if examples:
        title, caption = EXAMPLE_CAPTIONS[get_task(report["task"]).TARGET]
        sections.append(
            f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)} Made at each site on its own test "
            "images with the final global model; shown here because this was a simulation on data the "
            "researcher holds.</p>"
        )
        for site, images in examples.items():
            tiles = "".join(f"<img class='cam' src='{_src(p)}' alt='{html.escape(site)}'>" for p in images)
            sections.append(f"<h3>{html.escape(site)}</h3><div>{tiles}</div>")
    if report["privacy"]:
        rows = [
            [s, p.get("unit", "image"), p.get("epsilon"), p.get("delta"), p.get("budget"), p.get("noise_multiplier"),
             p.get("max_grad_norm")]
            for s, p in report["privacy"].items()
        ]  # fmt: skip
        sections += [
            "<h2>Privacy</h2><p>(ε, δ)-DP with respect to one privacy unit: a patient where the site gives "
            "patient ids (each training step sees at most one image of a patient, and one patch of it), "
            "otherwise an image.</p>",
            _table(["site", "unit", "ε", "δ", "budget", "noise σ", "clip norm"], rows),
        ]
    sections += _synthetic_sections(report)
    site_level = report.get("site_privacy")
    if site_level:
        row = [site_level[k] for k in ("epsilon", "delta", "noise_multiplier", "rounds", "sample_rate", "sites")]
        sections += [
            "<h3>Site-level privacy</h3><p>(ε, δ)-DP of the released models with respect to a whole site's data "
            "(DP-FedAvg with adaptive clipping at the server); the table above gives each site's own guarantee for "
            "one privacy unit, where the sites also ran DP-SGD.</p>"
            if report["privacy"]
            else "<h2>Privacy</h2><p>(ε, δ)-DP of the released models with respect to a whole site's data "
            "(DP-FedAvg with adaptive clipping at the server; the sites ran no DP-SGD of their own).</p>",
            _table(["site-level ε", "δ", "noise σ", "rounds", "site sampling rate", "sites"], [row]),
        ]
    if report.get("site_notes"):
        items = "".join(
            f"<li><b>{html.escape(site)}</b>: {html.escape(note)}</li>"
            for site, notes in report["site_notes"].items()
            for note in notes
        )
        sections += [
            "<h2>What the sites reported</h2><p>Pre-flight data warnings, refusals and failures, as kinds and "
            f"counts; each site's own log has the files and reasons.</p><ul>{items}</ul>"
        ]
    if report.get("initial_model"):
        start = report["initial_model"]
        origin = start["provenance"]
        origin = origin.get("data", "not recorded") if isinstance(origin, dict) else origin
        sections += [
            "<h2>Starting model</h2>"
            f"<p>{html.escape(start['file'])} (sha256 {html.escape(start['sha256'][:16])}…), trained on "
            f"{html.escape(str(origin))}.</p>"
        ]
    round_rows = [[r["round"], r["seconds"], r["bytes_up"], r["bytes_down"]] for r in report["rounds"]]
    sections += ["<h2>Rounds</h2>", _table(["round", "seconds", "bytes up", "bytes down"], round_rows)]
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        ".running{background:#fff4d6;border:1px solid #e0b040;padding:8px 12px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "th{background:#eef}td:first-child{text-align:left}img{max-width:100%}img.cam{margin:4px}"
    )
    refresh = "<meta http-equiv='refresh' content='30'>" if running else ""  # a running report reloads itself
    head = f"{refresh}<title>medfed report{' (running)' if running else ''}</title>"
    return f"<!doctype html><html><head><meta charset='utf-8'>{head}<style>{style}</style></head><body>{''.join(sections)}</body></html>"


def _label_coverage(report: dict[str, Any], per_site: dict[str, dict[str, Any]], metric: str) -> list[str]:
    """The classes each site labels (its label map) and the per-class metric; nothing when every
    site labels every class. A class a site does not label is n/a there, never a score."""
    labelled = re.compile(r"^labelled_class_(\d+)$")
    classes = sorted({int(m[1]) for v in per_site.values() for k in v if (m := labelled.match(k))})
    if not classes:
        return []
    if get_task(report["task"]).TARGET == "mask":
        classes = [c for c in classes if c > 0]  # background: labelled everywhere, not scored
    rows = []
    for site in report["sites"]:
        values = per_site.get(site, {})
        cells = [
            "n/a: not labelled" if values.get(f"labelled_class_{c}", 1) == 0 else values.get(f"{metric}_class_{c}")
            for c in classes
        ]
        rows.append([site, *cells])
    return [
        "<h2>Classes each site labels</h2><p>Each site labels the classes its label map names; it is scored "
        f"only on those. Cells: {html.escape(metric)} per class, n/a where the site does not label the class "
        "(its own averages, above, and the cross-site matrix leave such classes out).</p>",
        _table(["site", *[class_name(report, c) for c in classes]], rows),
    ]


PERSONAL_METHODS = {
    "fedbn": "FedBN: the global model with the site's own normalisation layers",
    "finetune": "the final global model fine-tuned at the site",
    "ditto": "Ditto: a personal model trained at the site, regularised toward the global one",
}


def _personal_section(personal: dict[str, Any] | None) -> list[str]:
    """The report's comparison of each site's personal model with the global model."""
    if not personal:
        return []

    def cell(entry: dict[str, float]) -> str:
        return f"{_fmt(entry['value'])} [{_fmt(entry['low'])}, {_fmt(entry['high'])}]"

    rows = [
        [site, cell(entry["global"]), cell(entry["personal"]), cell(entry["gain"])]
        for site, entry in personal["per_site"].items()
    ]
    metric = html.escape(personal["metric"])
    return [
        "<h2>Personal models</h2>",
        f"<p>Each site's personal model ({html.escape(PERSONAL_METHODS.get(personal['method'], personal['method']))}"
        f"), kept at the site, against the final global model on the site's test split: {metric} with "
        "95 % bootstrap intervals (the site's test cases resampled, the same resamples for both models, so "
        "the difference has its own interval).</p>",
        _table(
            ["site", *(f"{model} {personal['metric']}" for model in ("global", "personal")), "personal − global"], rows
        ),  # fmt: skip
    ]


def _running_banner(running: dict[str, int]) -> str:
    """The mark of a report whose run is still going."""
    return (
        f"<p class='running' id='running'><b>Running: round {running['round']} of {running['rounds']} done.</b> "
        "This page is rewritten after every round and reloads itself every 30 s; a round's model is scored on "
        "the validation splits with the next round's request, so its row appears one round later; the final "
        "report (test splits, "
        "cross-site matrix) replaces it when the run ends. <code>medfed status RUN_DIR --follow</code> follows "
        "the run in a terminal.</p>"
    )
