"""What every command shares: the console, logging, and errors that name the option or key."""

from __future__ import annotations

import logging
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from medfed.config import Config, ConfigError
from medfed.display import plain

__all__ = ["WholeLineConsole", "console", "fail", "literal", "setup_logging", "with_options"]


class WholeLineConsole(Console):
    """A Rich console that wraps text at its width on a terminal only: to a pipe or a file every
    line prints whole (soft wrap), so an error or a path is never cut at ``COLUMNS`` or 80."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **options: Any) -> None:
        """:meth:`rich.console.Console.print`, soft-wrapped by default when the output is not a terminal."""
        super().print(*objects, soft_wrap=not self.is_terminal if soft_wrap is None else soft_wrap, **options)


console = WholeLineConsole(emoji=False)  # user text (file names, DICOM fields) prints as itself: see medfed.display


def setup_logging(verbose: bool) -> None:
    """Log ``medfed``'s messages to the console, debug ones too when ``verbose``."""
    handler = RichHandler(console=console, show_path=False, show_time=True)
    logger = logging.getLogger("medfed")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error; the exit to raise: code 2 for usage and config errors, 1 for
    data and state errors."""
    console.print(f"[bold red]error:[/] {plain(message)}")
    return typer.Exit(code=code)


def literal(text: str) -> str:
    """User text (file names, folder names, DICOM values) for Rich, shown as written: markup escaped,
    undecodable characters as backslash escapes (print with ``emoji=False``: no ``:name:`` codes)."""
    return plain(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def with_options(config: Config, options: dict[str, tuple[str, Any]]) -> Config:
    """``config`` with the command-line options that were given (not None; 0 is a value) applied
    as overrides ``{"--option": ("section.key", value)}`` and validated as a config file is: a
    value out of range exits with code 2 naming the option and what was expected."""
    try:
        return config.with_overrides({key: value for key, value in options.values() if value is not None})
    except ConfigError as err:
        option = next((name for name, (key, _) in options.items() if key == err.key), "")
        raise fail(f"{option}: {err}" if option else str(err)) from err
