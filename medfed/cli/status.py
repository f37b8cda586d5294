"""``medfed status``: where a run stands, read from its run folder, once or live."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from medfed.cli.common import console, fail
from medfed.cli.render import num
from medfed.display import plain
from medfed.run_status import FINISHED, STARTING, RunFolderError, RunStatus, SiteStatus, read_status

__all__ = ["status"]

STALLED = 3  # rounds' worth of seconds without a write, after which the headline asks whether the run is alive
RETRIES = 3  # --follow: reads in a row that may fail (a report being written) before the command gives up


def status(
    run_dir: Annotated[Path, typer.Argument(help="The run's --out folder (on the coordinator's machine)")],
    follow: Annotated[bool, typer.Option(help="Refresh until the run finishes (Ctrl-C stops following)")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, max=3600, help="--follow: seconds between two reads of the folder")
    ] = 2.0,
    json_: Annotated[
        bool, typer.Option("--json", help="JSON instead of a table (--follow: one line per change)")
    ] = False,
) -> None:
    """Show a running or finished run: round k of n, each site's last reply, privacy spent of its
    budget and last validation metric, seconds per round and an estimate of the time left."""
    try:
        current = _read(run_dir)
        if not follow:
            _show(current, json_)
            return
        if console.is_terminal and not json_:
            _follow_live(run_dir, current, interval)
        else:
            _follow_lines(run_dir, current, interval, json_)
    except KeyboardInterrupt:
        return


def _read(run_dir: Path) -> RunStatus:
    try:
        return read_status(run_dir)
    except RunFolderError as err:
        raise fail(str(err)) from None


def _read_again(run_dir: Path, interval: float) -> RunStatus:
    """The next read while following: a file caught mid-write is read again before it counts as an error."""
    for _ in range(RETRIES - 1):
        try:
            return read_status(run_dir)
        except RunFolderError:
            time.sleep(interval)
    return _read(run_dir)


def _follow_live(run_dir: Path, current: RunStatus, interval: float) -> None:
    """A view redrawn in place on a terminal, until the run finishes."""
    with Live(_view(current), console=console, auto_refresh=False) as live:
        while current.state != FINISHED:
            time.sleep(interval)
            current = _read_again(run_dir, interval)
            live.update(_view(current), refresh=True)


def _follow_lines(run_dir: Path, current: RunStatus, interval: float, as_json: bool) -> None:
    """To a pipe or a file: the status again whenever the run moves on (a round done, finished)."""
    _show(current, as_json)
    while current.state != FINISHED:
        time.sleep(interval)
        latest = _read_again(run_dir, interval)
        if (latest.state, latest.round) != (current.state, current.round):
            _show(latest, as_json)
        current = latest


def _show(current: RunStatus, as_json: bool) -> None:
    if as_json:
        console.out(json.dumps(current.to_dict()), highlight=False)
    elif console.is_terminal:
        console.print(_view(current))
    else:
        for line in _lines(current):
            console.print(plain(line), highlight=False)  # whole lines: not a terminal


def _headline(current: RunStatus) -> str:
    if current.state == STARTING:
        return f"{current.folder}: starting, no round done yet (last change {_duration(current.idle_seconds)} ago)"
    where = f"{current.name} ({current.task}): round {current.round} of {current.rounds}, {current.state}"
    timing = []
    if current.seconds_per_round is not None:
        timing.append(f"{_duration(current.seconds_per_round)} per round")
    if current.seconds_left is not None:
        timing.append(f"about {_duration(current.seconds_left)} left before the final evaluation")
    if current.state != FINISHED:
        timing.append(f"last update {_duration(current.idle_seconds)} ago")
        if current.seconds_per_round is not None and current.idle_seconds > STALLED * current.seconds_per_round + 60:
            timing.append("no round for a while: is the server still running? (its log says)")
    return where + (f"; {', '.join(timing)}" if timing else "")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _reply(site: SiteStatus) -> str:
    """How the site's last training reply went: aggregated, or why not."""
    if site.aggregated:
        return "aggregated"
    if site.outcome == "answered":
        return "answered, not aggregated"  # fewer usable updates than run.min-sites
    return site.outcome or "-"


def _spent(site: SiteStatus) -> str:
    if site.epsilon is None:
        return "-"
    return f"{site.epsilon:.2f} of {site.budget:.2f}" if site.budget is not None else f"{site.epsilon:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _view(current: RunStatus) -> RenderableType:
    """The terminal view: the headline and a table of the sites."""
    headline = Text.from_markup(plain(_headline(current)))
    if not current.sites:
        return headline
    metric = plain(current.primary_metric)
    table = Table(title=f"sites after round {current.round}")
    table.add_column("site")
    table.add_column("last round", justify="left")
    table.add_column("ε spent of budget", justify="right")
    table.add_column(f"{metric} (val)", justify="right")
    table.add_column("local s", justify="right")
    finished = current.state == FINISHED
    if finished:
        table.add_column(f"{metric} final (test)", justify="right")
    for site in current.sites:
        cells = [site.site, _reply(site), _spent(site), num(site.metric), _seconds(site.local_seconds)]
        table.add_row(*(plain(cell) for cell in cells), *([num(site.test_metric)] if finished else []))
    return Group(headline, table)


def _lines(current: RunStatus) -> list[str]:
    """The plain-text view: the headline and one whole line per site."""
    metric = current.primary_metric
    lines = [_headline(current)]
    for site in current.sites:
        line = (
            f"  {site.site}: last round {_reply(site)}; ε spent {_spent(site)}; {metric} (val) {num(site.metric)}; "
            f"local {_seconds(site.local_seconds)} s"
        )
        if current.state == FINISHED:
            line += f"; {metric} final (test) {num(site.test_metric)}"
        lines.append(line)
    return lines
