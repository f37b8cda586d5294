"""The cross-site protocol: how well each way of training carries to each hospital, in one command.

``medfed simulate CONFIG --protocol cross-site`` trains, on the simulated sites of ``CONFIG``:

- **local models**: each site alone (``local:SITE``; :func:`medfed.central.train_central`, DP
  when ``privacy.enabled``, the budget a site spends in the federation);
- **the federation** over all sites (named after ``run.strategy``: ``fedavg`` by default), run
  into ``OUT/fedavg``;
- **leave-one-site-out (LOSO)**: for each site, the same federation without it
  (``data.leave-out``), run into ``OUT/without-SITE``, scored only at the site it never saw;
- **pooled**: one model on all sites' training data together (what centralising would give).

Every model is scored on every site's TEST split with the task's primary metric (AUROC, Dice,
mAP@0.5) and a 95% percentile bootstrap interval. At one site every model sees the same
resamples of its test cases (:func:`medfed.evaluation.bootstrap.site_draws`), so differences
between models are paired. The per-case values stay where they are computed: the report holds
aggregate numbers only.

``OUT/protocol.json``::

    {
      "protocol": "cross-site", "task": str, "metric": str, "sites": [SITE],
      "models": ["local:SITE", ..., "fedavg", "pooled"],       # the federation: run.strategy
      "federated": "fedavg",                                    # which model is the federation
      "matrix": [[{"value", "low", "high", "n"}]],              # rows: models, columns: sites
      "leave_one_site_out": {SITE: {"value", "low", "high", "n"}},
      "gap": {MODEL: {"own", "other", "gap", "low", "high"}},   # gap = own - other, its interval
      "runs": {"fedavg": "fedavg/report.json", "without:SITE": "without-SITE/report.json"},
      "privacy": {"models": {MODEL: {SITE: {"epsilon", "delta"}}},   # {} without DP
                  "total": {SITE: {"epsilon", "delta"}}},
      "replicates": int, "data_cards": {SITE: [str]},         # how files became inputs (e.g. scale)
      "config": {...}, "seconds": float
    }

``n`` is the number of test cases at the site; ``low``/``high`` are ``null`` where no resample
defines the metric. The generalization gap of a local model is its score at its own site minus
the mean of its scores at the other sites; of the federated and the pooled model, the mean over
the sites (all seen in training) minus the mean LOSO score (each site unseen). Under DP a site's
data trains several released models here (its local model, the federation, every LOSO run it
takes part in, the pooled model): ``privacy.total`` adds their ε and δ (basic composition), the
cost of running the whole protocol on real data. Plus ``OUT/protocol.html`` (tables) and
``OUT/plots/cross_site_protocol.png`` (the matrix and the LOSO row as a heatmap).
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medfed.central import train_central
from medfed.config import Config
from medfed.data import SiteArrays, load_simulated_site, simulated_site_names
from medfed.evaluation.bootstrap import bootstrap_scores, interval
from medfed.evaluation.report import json_safe
from medfed.run_folder import ProtocolFolder, RunFolder
from medfed.tasks import get_task
from medfed.weights import load_checkpoint

__all__ = ["MIN_SITES", "PROTOCOLS", "global_model", "run_cross_site_protocol"]

log = logging.getLogger("medfed.protocol")

PROTOCOLS = ("federation", "cross-site")  # what ``medfed simulate --protocol`` runs
MIN_SITES = 3  # leave-one-site-out must leave a federation of at least 2 sites

Federate = Callable[[Config, Path], dict[str, Any]]


def global_model(config: Config, run_dir: Path) -> nn.Module:
    """The final global model of the run written into ``run_dir`` (:attr:`RunFolder.global_model`)."""
    model = get_task(config.run.task).build_model(config)
    state, _ = load_checkpoint(RunFolder(Path(run_dir)).global_model)
    model.load_state_dict(state)
    return model


def run_cross_site_protocol(
    config: Config, out_dir: str | Path, replicates: int = 200, federate: Federate | None = None
) -> dict[str, Any]:
    """Run the cross-site protocol on ``config``'s simulated sites; write and return its report.

    Args:
        config: the run; its simulated sites (``data``) are the sites of the protocol (at least
            :data:`MIN_SITES`), its ``run.strategy`` the federation.
        out_dir: where ``protocol.json``, ``protocol.html``, ``plots/`` and one folder per
            federation run go.
        replicates: bootstrap resamples per site (the intervals' precision).
        federate: how one federation is run, ``(config, run_dir) -> report`` writing the global
            model into ``run_dir``; default :func:`medfed.simulation.simulate`.

    Raises:
        ValueError: fewer than :data:`MIN_SITES` sites, or ``replicates`` out of [10, 100000].
        RuntimeError: a federation run trained nothing (the reason, and where its report is).
    """
    from medfed.federation import untrained_reason

    if federate is None:
        from medfed.simulation import simulate

        federate = simulate
    if not 10 <= replicates <= 100_000:
        raise ValueError(f"replicates = {replicates}: expected an integer in [10, 100000]")
    started = time.perf_counter()
    out = ProtocolFolder(Path(out_dir))
    names = simulated_site_names(config)
    if len(names) < MIN_SITES:
        raise ValueError(
            f"the cross-site protocol needs at least {MIN_SITES} sites (leave-one-site-out trains on the others); "
            f"the data has {len(names)}"
        )
    sites: dict[str, SiteArrays] = dict(load_simulated_site(config, i) for i in range(len(names)))
    private = config.privacy.sample_level  # DP-SGD for the local and pooled models
    federated = config.run.strategy
    # the protocol trains the local models itself: no local baselines inside the federations
    base = config.with_overrides({"evaluation.cross-site": False})
    score: dict[str, dict[str, dict[str, Any]]] = {}  # model -> site -> bootstrap entry (with draws)
    privacy: dict[str, dict[str, dict[str, float]]] = {}
    runs: dict[str, str] = {}

    def scored(model_name: str, model: nn.Module, at: dict[str, SiteArrays]) -> dict[str, dict[str, Any]]:
        result = bootstrap_scores(config, model, at, replicates, seed=config.run.seed)["per_site"]
        log.info("%s: %s", model_name, ", ".join(f"{s} {e['value']:.3f}" for s, e in result.items()))
        return result

    def federation(run: str, folder: str, run_config: Config) -> nn.Module:
        run_folder = out.run(folder)
        report = federate(run_config, run_folder.root)
        failure = untrained_reason(report)
        if failure:
            raise RuntimeError(f"{run}: {failure} (report: {run_folder.report_json})")
        runs[run] = run_folder.report_json.relative_to(out.root).as_posix()
        if private:
            privacy[run] = {s: {"epsilon": p["epsilon"], "delta": p["delta"]} for s, p in report["privacy"].items()}
        return global_model(run_config, run_folder.root)

    for name, site in sites.items():
        model, info = train_central(config, [site], private)
        score[f"local:{name}"] = scored(f"local:{name}", model, sites)
        if private:
            privacy[f"local:{name}"] = {name: {"epsilon": info["epsilon"], "delta": info["delta"]}}
    score[federated] = scored(federated, federation(federated, federated, base), sites)
    unseen: dict[str, dict[str, Any]] = {}
    for name in names:
        without = base.with_overrides(
            {
                "data.leave-out": [*config.data.leave_out, name],
                "run.min-sites": min(config.run.min_sites, len(names) - 1),
            }
        )
        model = federation(f"without:{name}", f"without-{name}", without)
        unseen |= scored(f"without:{name}", model, {name: sites[name]})
    model, info = train_central(config, list(sites.values()), private)
    score["pooled"] = scored("pooled", model, sites)
    if private:
        privacy["pooled"] = {name: {"epsilon": info["epsilon"], "delta": info["delta"]} for name in names}

    models = list(score)
    report = {
        "protocol": "cross-site",
        "task": config.run.task,
        "metric": get_task(config.run.task).PRIMARY_METRIC,
        "sites": names,
        "models": models,
        "federated": federated,
        "matrix": [[_entry(score[m][s]) for s in names] for m in models],
        "leave_one_site_out": {s: _entry(unseen[s]) for s in names},
        "gap": {m: _gap(m, score, unseen, names) for m in models},
        "runs": runs,
        "privacy": {"models": privacy, "total": _total(privacy, names)} if private else {},
        "replicates": replicates,
        "data_cards": {name: list(site.card) for name, site in sites.items() if site.card},
        "config": config.to_public_dict(),
        "seconds": time.perf_counter() - started,
    }
    write_protocol_report(report, out.root)
    return report


def _entry(scores: dict[str, Any]) -> dict[str, Any]:
    """One cell: value, interval and number of test cases, without the draws."""
    return {key: scores[key] for key in ("value", "low", "high", "n")}


def _gap(
    model: str, score: dict[str, dict[str, dict[str, Any]]], unseen: dict[str, dict[str, Any]], names: list[str]
) -> dict[str, float]:
    """Own-site score, other-site score and their difference with its 95% interval (the draws
    differ pairwise at a site and independently across sites)."""
    row = score[model]
    if model.startswith("local:"):
        home = model.removeprefix("local:")
        own_value, own_draws = row[home]["value"], np.asarray(row[home]["draws"])
        others = [row[s] for s in names if s != home]
    else:  # the federation and pooled: every site seen in training, against each site unseen (LOSO)
        own_value = float(np.mean([row[s]["value"] for s in names]))
        own_draws = np.mean([row[s]["draws"] for s in names], axis=0)
        others = [unseen[s] for s in names]
    other_value = float(np.mean([e["value"] for e in others]))
    other_draws = np.mean([e["draws"] for e in others], axis=0)
    return {"own": own_value, "other": other_value, "gap": own_value - other_value, **interval(own_draws - other_draws)}


def _total(privacy: dict[str, dict[str, dict[str, float]]], names: list[str]) -> dict[str, dict[str, float]]:
    """Per site, ε and δ added over every model its data trained (basic composition)."""
    return {
        s: {key: float(sum(p[s][key] for p in privacy.values() if s in p)) for key in ("epsilon", "delta")}
        for s in names
    }


def write_protocol_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``protocol.json``, ``plots/cross_site_protocol.png`` and ``protocol.html`` into
    ``out_dir``; return the HTML path."""
    out = ProtocolFolder(Path(out_dir))
    out.plots.mkdir(parents=True, exist_ok=True)
    out.protocol_json.write_text(json.dumps(json_safe(report), indent=1))
    figure = _plot(report, out.plots / "cross_site_protocol.png")
    out.protocol_html.write_text(_html(report, figure.relative_to(out.root)))
    return out.protocol_html


def _rows(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any] | None]]]:
    """The matrix's rows and, last, the LOSO row (one cell per site)."""
    rows: list[tuple[str, list[dict[str, Any] | None]]] = list(zip(report["models"], report["matrix"], strict=True))
    rows.append(("without the site (LOSO)", [report["leave_one_site_out"].get(s) for s in report["sites"]]))
    return rows


def _plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(report)
    values = np.array([[_value(cell) for cell in cells] for _, cells in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.4 * len(report["sites"]) + 3.2, 0.5 * len(rows) + 1.8))
    low = 0.5 if report["metric"] == "auroc" else 0.0
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=low, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        text = "n/a" if math.isnan(value) else f"{value:.3f}"
        dark = math.isnan(value) or value < low + 0.6 * (1 - low)
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    for i, (name, _) in enumerate(rows):  # a local model at its own site
        if name.startswith("local:") and name.removeprefix("local:") in report["sites"]:
            j = report["sites"].index(name.removeprefix("local:"))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="orange", linewidth=2))
    ax.axhline(len(rows) - 1.5, color="white", linewidth=3)  # the LOSO row is no model of the matrix
    ax.set_xticks(range(len(report["sites"])), [f"test @ {s}" for s in report["sites"]], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    fig.colorbar(image, ax=ax, label=report["metric"])
    ax.set_title(
        f"Cross-site protocol, test {report['metric']}: rows are models, columns test sites (framed: own site)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value(cell: dict[str, Any] | None) -> float:
    value = None if cell is None else cell.get("value")
    return math.nan if value is None else float(value)


def _number(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _cell(cell: dict[str, Any] | None) -> str:
    """``0.812 [0.751, 0.866]``, or n/a."""
    if cell is None:
        return "n/a"
    return f"{_number(cell.get('value'))} [{_number(cell.get('low'))}, {_number(cell.get('high'))}]"


def _html(report: dict[str, Any], figure: Path) -> str:
    def table(headers: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    metric, sites = report["metric"], report["sites"]
    gap_rows = [
        [m, _number(g["own"]), _number(g["other"]), _cell({**g, "value": g["gap"]})] for m, g in report["gap"].items()
    ]
    sections = [
        f"<h1>Cross-site protocol: {html.escape(str(report['config']['run']['name']))}</h1>",
        f"<p>Task <b>{html.escape(report['task'])}</b>, {len(sites)} sites, test <b>{html.escape(metric)}</b> "
        f"with 95% bootstrap intervals ({report['replicates']} resamples of each site's test cases, the same "
        f"for every model at a site). Differential privacy {'on' if report['privacy'] else '<b>off</b>'}.</p>",
        "<h2>Each model at each site</h2><p>Rows: a site's model trained on its own data alone "
        f"(local), the federation ({html.escape(report['federated'])}), one model on all sites' data "
        "pooled, and the federation without the site it is scored at (leave-one-site-out).</p>",
        table(
            ["model", *[f"test @ {s}" for s in sites]], [[name, *map(_cell, cells)] for name, cells in _rows(report)]
        ),
        "<h2>Generalization gap</h2><p>Local models: own site minus the mean of the other sites. "
        "Federation and pooled: mean over the sites, all seen in training, minus the mean "
        "leave-one-site-out score (each site unseen). Positive: the model does worse where it has not been.</p>",
        table(["model", "own", "other", "gap [95% interval]"], gap_rows),
        f"<img src='{html.escape(str(figure))}' alt='cross-site matrix'>",
    ]
    if report["privacy"]:
        total = report["privacy"]["total"]
        rows = [[s, f"{t['epsilon']:.2f}", f"{t['delta']:.1e}"] for s, t in total.items()]
        sections += [
            "<h2>Privacy</h2><p>Each site's data trained several released models here; their (ε, δ) add up "
            "(basic composition) to what running this protocol on real data would spend at the site.</p>",
            table(["site", "ε, all models", "δ, all models"], rows),
        ]
    for site, lines in (report.get("data_cards") or {}).items():
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        sections.append(f"<p>Data at <b>{html.escape(site)}</b>:</p><ul>{items}</ul>")
    runs = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in report["runs"].items())
    sections.append(f"<h2>Federation runs</h2><ul>{runs}</ul>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "th{background:#eef}td:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>medfed cross-site protocol</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"
    )
