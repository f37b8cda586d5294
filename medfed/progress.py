"""Progress of the steps that take more than a few seconds: a Rich bar on a terminal, plain lines
elsewhere (a pipe, a log file, a test's runner), so a long command is never silent.

:func:`steps` counts the parts of one step (cases, batches, federations; :func:`tracked` counts a
loop's items); :func:`run_rounds` follows a federation's rounds from its run folder
(:mod:`medfed.run_status`), as ``medfed status`` does, while the command that runs it waits. On a terminal, medfed's log lines (logged through the same
console) and Flower's own print above the bar, not through it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from medfed.display import plain
from medfed.run_status import STARTING, RunFolderError, read_status

__all__ = ["Steps", "run_rounds", "steps", "tracked"]

PLAIN_EVERY = 15.0  # seconds between two plain progress lines of one step (none for a step done sooner)
POLL = 0.5  # seconds between two reads of a run folder
T = TypeVar("T")


class Steps:
    """The count of a step's parts done: a bar's task on a terminal, else plain lines: one every
    :data:`PLAIN_EVERY` seconds, then one when the description changes and one at the end (a step
    done sooner prints nothing: a quick command's output stays as it was)."""

    def __init__(
        self, console: Console, description: str, total: int | None, bar: Progress | None, task: TaskID | None
    ) -> None:
        self._console, self.total = console, total
        self.description = description  # may hold user text (file names): printed through medfed.display.plain
        self._bar, self._task = bar, task
        self.done = 0
        self.said = False
        self._started = time.monotonic()

    def advance(self, count: int = 1) -> None:
        """``count`` more parts done."""
        self.update(self.done + count)

    def update(self, done: int, description: str | None = None, total: int | None = None) -> None:
        """``done`` parts done in all (of ``total``, when it becomes known), now doing ``description``."""
        changed = description is not None and description != self.description
        self.done, self.description, self.total = done, description or self.description, total or self.total
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, description=plain(self.description), total=self.total)
        elif changed and self.said:
            self.say()

    def say(self, end: bool = False) -> None:
        """Print the plain line of where the step stands (``end``: it is over)."""
        elapsed = time.monotonic() - self._started
        count = f"{self.done}/{self.total}" if self.total else str(self.done) if self.done else ""
        timing = f"{elapsed:.0f} s"
        if end:
            timing = f"done in {timing}"
        elif self.total and 0 < self.done < self.total:
            timing += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        line = f"{self.description}: {count} ({timing})" if count else f"{self.description} ({timing})"
        self._console.print(plain(line), soft_wrap=True, highlight=False)
        self.said = True


@contextmanager
def steps(console: Console, description: str, total: int | None = None) -> Iterator[Steps]:
    """Show the progress of a step of ``total`` parts (None: not known ahead; :meth:`Steps.update`
    may tell it later) while the body runs; the body advances the :class:`Steps` it is given."""
    if not console.is_terminal:
        counter = Steps(console, description, total, None, None)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(PLAIN_EVERY):
                counter.say()

        thread = threading.Thread(target=heartbeat, name="medfed-progress", daemon=True)
        thread.start()
        try:
            yield counter
        finally:
            stop.set()
            thread.join()
        if counter.said:
            counter.say(end=True)
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with bar, _flower_above(bar):
        yield Steps(console, description, total, bar, bar.add_task(plain(description), total=total))


def tracked(items: Iterable[T], counter: Steps | None) -> Iterator[T]:
    """``items``, one by one, advancing ``counter`` (when given) as each one is done with."""
    for item in items:
        yield item
        if counter is not None:
            counter.advance()


@contextmanager
def _flower_above(bar: Progress) -> Iterator[None]:
    """Flower's console handler writes to the stream it was made with; while ``bar`` is shown it
    writes to the stream the bar redirects (printed above the bar, not across it)."""
    handlers = [
        h
        for h in logging.getLogger("flwr").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    streams = [h.setStream(sys.stderr) for h in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams, strict=True):
            if stream is not None:
                handler.setStream(stream)


@contextmanager
def run_rounds(
    console: Console,
    run_dir: str | Path,
    rounds: int,
    resume: bool = False,
    after: str = "rounds done; final evaluation",
) -> Iterator[None]:
    """Show a federation's rounds (k of ``rounds`` done, then ``after``) while the body runs it
    into ``run_dir``, read from the progress file the server writes after every round. What an
    earlier run left in ``run_dir`` is not taken for this one's progress (unless ``resume``)."""
    started = time.time()
    stop = threading.Event()
    with steps(console, "rounds", rounds) as counter:

        def poll() -> None:
            while not stop.wait(POLL):
                _show_round(counter, run_dir, rounds, started, resume, after)

        thread = threading.Thread(target=poll, name="medfed-rounds", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        _show_round(counter, run_dir, rounds, started, resume, after)


def _show_round(counter: Steps, run_dir: str | Path, rounds: int, started: float, resume: bool, after: str) -> None:
    try:
        status = read_status(run_dir)
    except RunFolderError:  # not written yet, or caught mid-write: the next read tells
        return
    if status.state == STARTING or (not resume and status.idle_seconds > time.time() - started + 1):
        return  # nothing of this run yet (an earlier run's files)
    done = min(status.round, rounds)
    if done != counter.done:
        counter.update(done, after if done >= rounds else None)
