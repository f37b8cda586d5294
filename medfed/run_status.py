"""Where a run stands, read from its run folder alone: ``medfed status`` and the report rewritten
after every round.

The server writes ``checkpoints/progress.json`` atomically after every round and ``report.json`` at
the end (:mod:`medfed.run_folder`); :func:`read_status` reads whichever tells the latest, from any
process, on the coordinator's machine or a copy of the folder. Both files are input like any
other: one that is missing, cut short or not what medfed writes gives a :class:`RunFolderError`
naming the file and what was expected. :func:`write_running_report` is the server's side: after
each round, report.html from the rounds so far, marked running (round k of n).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medfed.config import Config, ConfigError, finite_number
from medfed.run_folder import RunFolder

__all__ = [
    "FINISHED",
    "RUNNING",
    "STARTING",
    "RunFolderError",
    "RunStatus",
    "SiteStatus",
    "read_status",
    "running_report",
    "write_running_report",
]

log = logging.getLogger("medfed.server")

STARTING = "starting"  # the server has made the folder; no round is done yet
RUNNING = "running"  # rounds are being done (or the run stopped without its report: see ``idle_seconds``)
FINISHED = "finished"  # report.json is there and newer than the last round's progress


class RunFolderError(ValueError):
    """A run folder, or one of its files, is not what medfed writes."""


@dataclass(frozen=True)
class SiteStatus:
    """One site in the last round done: how its training reply went (``answered``, ``refused``,
    ``error``, ``rejected`` by the server, ``not sampled``; "" when the run does not say),
    whether its update was aggregated, its privacy spent and budget, the global model's primary
    metric on its validation split, its local training seconds; the final test metric when finished."""

    site: str
    outcome: str
    aggregated: bool
    epsilon: float | None
    budget: float | None
    metric: float | None
    local_seconds: float | None
    test_metric: float | None = None


@dataclass(frozen=True)
class RunStatus:
    """A run as its folder tells it: ``state`` (:data:`STARTING`, :data:`RUNNING`, :data:`FINISHED`),
    round ``round`` of ``rounds`` done, mean seconds per round, an estimate of the seconds left
    (rounds only: the final evaluation comes after), seconds since the folder was last written."""

    folder: str
    state: str
    name: str = ""
    task: str = ""
    primary_metric: str = ""
    round: int = 0
    rounds: int = 0
    seconds_per_round: float | None = None
    seconds_left: float | None = None
    idle_seconds: float = 0.0
    sites: tuple[SiteStatus, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``medfed status --json``)."""
        return asdict(self)


def read_status(run_dir: str | Path) -> RunStatus:
    """The status of the run whose ``--out`` folder is ``run_dir``.

    Raises:
        RunFolderError: ``run_dir`` is not a run folder, or its progress file or report is not
            readable as what medfed writes; the message names the file and what was expected.
    """
    folder = RunFolder(Path(run_dir))
    if not folder.root.is_dir():
        raise RunFolderError(f"{folder.root}: not a folder (expected the --out folder of a medfed run)")
    progress, report = _mtime(folder.progress), _mtime(folder.report_json)
    if report is not None and (progress is None or report >= progress):
        doc = _load(folder.report_json, "the report medfed writes at the end of a run")
        return _from_report(folder, doc, report)
    if progress is not None:
        doc = _load(folder.progress, "the progress file medfed writes after every round")
        return _from_progress(folder, doc, progress)
    started = _mtime(folder.checkpoints, folder=True)
    if started is not None:
        return RunStatus(str(folder.root), STARTING, idle_seconds=max(time.time() - started, 0.0))
    raise RunFolderError(
        f"{folder.root}: not a run folder: neither {folder.report_json.name} nor "
        f"{folder.progress.relative_to(folder.root)} in it (a medfed run writes them after its rounds)"
    )


def _mtime(path: Path, folder: bool = False) -> float | None:
    """When the file (``folder``: the folder) ``path`` was last written; None when there is none."""
    try:
        return path.stat().st_mtime if (path.is_dir() if folder else path.is_file()) else None
    except OSError:
        return None


def _load(path: Path, expected: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RunFolderError(f"{path}: cannot be read ({err.strerror or err}); expected {expected}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RunFolderError(f"{path}: not JSON ({type(err).__name__}); expected {expected}") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path}: a JSON {type(value).__name__}, not an object; expected {expected}")
    return value


def _field(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RunFolderError(f"{path}: {key!r} is missing or not a {_kind(kind)}; expected the file medfed writes")
    return value


def _kind(kind: type | tuple[type, ...]) -> str:
    names = {dict: "table", list: "list", str: "string", int: "whole number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _table(value: Any) -> dict[str, Any]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _rounds(doc: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The round entries of ``doc``, checked for what the status reads."""
    rounds = _field(doc, "rounds", list, path)
    if not rounds or not all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in rounds):
        raise RunFolderError(f"{path}: 'rounds' is not a list of round entries with a round number; expected the "
                             "file medfed writes")  # fmt: skip
    return rounds


def _from_progress(folder: RunFolder, doc: dict[str, Any], updated: float) -> RunStatus:
    path = folder.progress
    try:
        config = Config.from_json(_field(doc, "config", str, path))
    except ConfigError as err:
        raise RunFolderError(f"{path}: its 'config' is not a medfed config ({err}); expected the progress file "
                             "medfed writes") from None  # fmt: skip
    privacy = {site: _table(p) for site, p in _table(doc.get("privacy")).items()}
    metric = doc.get("primary_metric")
    if not isinstance(metric, str):  # written by an earlier medfed: the task module knows
        metric = _primary(config.run.task, path)
    return _status(folder, config.run.name, config.run.task, metric, config.run.rounds, RUNNING,
                   _rounds(doc, path), privacy, {}, updated)  # fmt: skip


def _from_report(folder: RunFolder, doc: dict[str, Any], updated: float) -> RunStatus:
    path = folder.report_json
    run = _table(_table(doc.get("config")).get("run"))
    rounds = run.get("rounds")
    if not isinstance(run.get("name"), str) or not isinstance(rounds, int) or isinstance(rounds, bool):
        raise RunFolderError(f"{path}: 'config' has no [run] name and rounds; expected the report medfed writes")
    task = _field(doc, "task", str, path)
    metric = _field(doc, "primary_metric", str, path)
    privacy = {site: _table(p) for site, p in _table(doc.get("privacy")).items()}
    final = {
        site: finite_number(_table(m).get(metric))
        for site, m in _table(_table(doc.get("final")).get("per_site")).items()
    }
    return _status(folder, run["name"], task, metric, rounds, FINISHED, _rounds(doc, path), privacy, final, updated)


def _primary(task: str, path: Path) -> str:
    from medfed.tasks import get_task

    try:
        return get_task(task).PRIMARY_METRIC
    except ValueError as err:
        raise RunFolderError(f"{path}: {err}") from None


def _status(
    folder: RunFolder,
    name: str,
    task: str,
    metric: str,
    total: int,
    state: str,
    rounds: list[dict[str, Any]],
    privacy: dict[str, dict[str, Any]],
    final: dict[str, float | None],
    updated: float,
) -> RunStatus:
    last = rounds[-1]
    metrics = {site: _table(m) for site, m in _table(last.get("metrics")).items()}
    outcomes = {site: str(o) for site, o in _table(last.get("outcomes")).items()}
    local = _table(last.get("local_seconds"))
    listed = last.get("sites_aggregated")
    aggregated = {site for site in listed if isinstance(site, str)} if isinstance(listed, list) else set()
    names = {site for entry in rounds for site in _table(entry.get("metrics"))}
    names |= set(privacy) | set(outcomes) | set(local) | set(final)
    sites = tuple(
        SiteStatus(
            site=site,
            outcome=outcomes.get(site, "not sampled" if "outcomes" in last and last["round"] > 0 else ""),
            aggregated=site in aggregated,
            epsilon=finite_number(privacy.get(site, {}).get("epsilon")),
            budget=finite_number(privacy.get(site, {}).get("budget")),
            metric=finite_number(metrics.get(site, {}).get(metric)),
            local_seconds=finite_number(local.get(site)),
            test_metric=final.get(site),
        )
        for site in sorted(names)
    )
    durations = [s for entry in rounds if entry["round"] > 0 and (s := finite_number(entry.get("seconds"))) is not None]
    per_round = sum(durations) / len(durations) if durations else None
    done = last["round"]
    left = per_round * max(total - done, 0) if per_round is not None and state == RUNNING else None
    return RunStatus(
        folder=str(folder.root),
        state=state,
        name=name,
        task=task,
        primary_metric=metric,
        round=done,
        rounds=total,
        seconds_per_round=per_round,
        seconds_left=left,
        idle_seconds=max(time.time() - updated, 0.0),
        sites=sites,
    )


def running_report(
    config: Config,
    rounds: list[dict[str, Any]],
    privacy: dict[str, dict[str, Any]],
    notes: dict[str, list[str]],
    done: int,
) -> dict[str, Any]:
    """The report of a run still going, from its scored rounds so far: the schema of the final report
    (design.md) with ``final`` empty and ``running: {"round": done, "rounds": n}`` (``done``: rounds
    trained; a round's model is scored on the validation splits with the next round's request, so
    its page shows the latest scored global model on each site's validation split)."""
    from medfed.tasks import get_task

    sites = {site for entry in rounds for site in entry.get("metrics", {})} | set(privacy) | set(notes)
    return {
        "task": config.run.task,
        "primary_metric": get_task(config.run.task).PRIMARY_METRIC,
        "sites": sorted(sites),
        "config": config.to_public_dict(),
        "rounds": rounds,
        "final": {"per_site": {}, "pooled": None, "cross_site": None, "operating_point": None},
        "privacy": privacy,
        "site_notes": dict(sorted(notes.items())),
        "running": {"round": done, "rounds": config.run.rounds},
    }


def write_running_report(
    folder: RunFolder,
    config: Config,
    rounds: list[dict[str, Any]],
    privacy: dict[str, dict[str, Any]],
    notes: dict[str, list[str]],
    done: int,
) -> None:
    """Rewrite ``folder``'s report.html (and its plots) from the scored rounds so far, marked running
    with ``done`` rounds trained; the final report replaces it. A page that cannot be written is
    logged, never the end of the run."""
    from medfed.evaluation.report import write_report_page

    try:
        write_report_page(running_report(config, rounds, privacy, notes, done), folder.root)
    except OSError as err:
        log.warning("report.html not updated after round %d: %s", done, err.strerror or err)
