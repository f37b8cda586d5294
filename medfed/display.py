"""User text made safe to print through Rich markup.

File names, folder names, DICOM fields, manifest cells, config values and paths can hold ``[/]``
or ``[bold]``, which Rich would read as markup: the command would crash (``MarkupError``) or print
something else. Every such value goes through :func:`plain` before it joins a markup string, a
table cell or a table title (printed by a console with ``emoji=False``, so ``:x:`` stays text).
"""

from __future__ import annotations

import re

__all__ = ["plain"]

_TAG = re.compile(r"\[[a-z#/@][^[]*?]")  # what Rich reads as a tag (rich.markup.RE_TAGS)
_BRACKET = re.compile(r"(\\*)\[")  # a "[" and the backslashes before it
_EMPTY_TAG = "[i][/i]"  # an active tag that renders nothing: ends a run of backslashes
# C0 and C1 control characters but tab and newline: a terminal would act on them (ESC sequences
# recolour, move the cursor, retitle the window), so they print as escapes such as \x1b.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(value: object) -> str:
    """``str(value)`` as Rich markup that prints exactly that text, whatever markup follows it.

    Rich halves the backslashes before a tag and lets an odd count escape it, and drops one
    backslash before any other ``[``; :func:`rich.markup.escape` covers the first case only and
    leaves trailing backslashes to escape the next tag of the line. Terminal control characters
    (but tab and newline) print as their escapes.
    """
    text = _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(value))

    def bracket(match: re.Match[str]) -> str:
        backslashes = len(match.group(1))
        if _TAG.match(text, match.end() - 1):
            return "\\" * (2 * backslashes + 1) + "["
        return "\\" * (backslashes + 1 if backslashes else 0) + "["

    escaped = _BRACKET.sub(bracket, text)
    trailing = len(escaped) - len(escaped.rstrip("\\"))
    return escaped + "\\" * trailing + _EMPTY_TAG if trailing else escaped
