"""The input boundary of ``medfed data import``: the checks every importer shares.

An import reads files that anyone may have written (annotation files, tables, folder listings, a
PACS export) and writes a site folder that training trusts, so every name it reads is hostile
until checked (design.md). One rule serves every layout:

- a path read is resolved (symlinks followed) and must stay inside its source folder:
  :func:`resolve_inside`, :func:`folder_files` and :func:`tree_files` turn a name that leads out
  (``../``, an absolute path, a symlink out), a symlink loop, a broken link, a NUL byte or a name
  over 255 bytes into an :class:`UnsafePath` or a :class:`DataProblem`, never a traceback;
- a path written is checked to land inside the output folder (:func:`copy_inside`);
- :func:`check_fractions` and :func:`require_training`: validation and test fractions that leave
  patients to train on;
- :class:`PatientPattern`: a user's regular expression, matched without the risk of a hang.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Protocol

from medfed.data.vocabulary import DataError, DataProblem

__all__ = [
    "MAX_NAME_BYTES",
    "PatientPattern",
    "UnsafePath",
    "check_fractions",
    "copy_inside",
    "folder_files",
    "real_folder",
    "require_training",
    "resolve_inside",
    "tree_files",
    "tree_to_copy",
]

MAX_NAME_BYTES = 255  # the longest file name Linux, macOS and Windows file systems allow


class UnsafePath(ValueError):
    """A name that cannot be read safely; the message says why (it does not repeat the name)."""


def real_folder(path: str | Path, what: str) -> Path:
    """``path`` with every symlink resolved, checked to be a folder: the root that names are confined to."""
    try:
        real = Path(os.path.realpath(path, strict=True))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{what} {path} is not a readable folder: {_reason(err)}") from None
    if not real.is_dir():
        raise FileNotFoundError(f"{what} {path} is not a folder")
    return real


def resolve_inside(root: Path, name: str | PurePath) -> Path:
    """``root / name`` with symlinks resolved, checked to exist and to lie inside ``root``.

    ``root`` must already be resolved (:func:`real_folder`). ``..`` is allowed while the result
    stays inside. Raises :class:`UnsafePath` saying why otherwise: an absolute name, one leading
    outside ``root`` (directly or through a symlink), a symlink loop, a missing file or broken
    link, a NUL byte, a name that is not UTF-8 (one the file system gave as undecodable bytes) or
    a path component over :data:`MAX_NAME_BYTES` bytes.
    """
    text = str(name)
    if "\x00" in text:
        raise UnsafePath("holds a NUL byte")
    if not text:
        raise UnsafePath("is empty")
    pure = PurePath(text)
    if pure.is_absolute():
        raise UnsafePath(f"is an absolute path: expected a name inside {root.name}/")
    try:
        longest = max((len(part.encode("utf-8")) for part in pure.parts), default=0)
    except UnicodeEncodeError:
        raise UnsafePath("is not valid UTF-8 (a manifest is UTF-8): rename the file") from None
    if longest > MAX_NAME_BYTES:
        raise UnsafePath(f"has a name of {longest} bytes: file names are at most {MAX_NAME_BYTES} bytes")
    outside = UnsafePath(f"leads outside {root.name}/ (to another folder or through a symlink)")
    try:
        real = Path(os.path.realpath(root / pure, strict=True))
    except OSError as err:
        if not Path(os.path.realpath(root / pure)).is_relative_to(root):  # outside, whether or not it exists
            raise outside from None
        raise UnsafePath(_reason(err)) from None
    if not real.is_relative_to(root):
        raise outside
    return real


def folder_files(folder: Path, suffixes: tuple[str, ...], what: str) -> tuple[list[Path], list[DataProblem]]:
    """The files of ``folder`` (resolved, not recursive) whose names end with one of ``suffixes``,
    in name order, as ``folder / name`` (a symlink keeps its own name); every one is checked with
    :func:`resolve_inside`, and each that fails is a problem named ``what/name``. Sub-folders are skipped."""
    files, problems = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.name.lower().endswith(suffixes):
            continue
        try:
            real = resolve_inside(folder, entry.name)
        except UnsafePath as err:
            problems.append(DataProblem(f"{what}/{entry.name}", str(err)))
            continue
        if real.is_file():
            files.append(folder / entry.name)
    return files, problems


def tree_files(root: Path) -> tuple[list[Path], list[DataProblem]]:
    """Every file under ``root`` (resolved) but hidden ones, in path order, with the problems of
    those that cannot be read safely (:func:`resolve_inside`). Symlinked folders are not entered."""
    files, problems = [], []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            relative = path.relative_to(root)
            try:
                real = resolve_inside(root, relative)
            except UnsafePath as err:
                problems.append(DataProblem(str(relative), str(err)))
                continue
            if real.is_file():
                files.append(path)
    return files, problems


def tree_to_copy(source: Path, source_root: Path) -> list[tuple[Path, PurePath]]:
    """The files to copy for ``source`` (a file, or a folder such as a DICOM series), each resolved
    inside ``source_root`` and paired with its path relative to ``source`` (``.`` for a file).

    Raises :class:`UnsafePath` when the source or any file in it leads out of ``source_root``, is
    not readable, or when a source folder holds a symlinked folder (it could loop).
    """
    real = resolve_inside(source_root, Path(os.path.realpath(source)).relative_to(source_root))
    if not real.is_dir():
        return [(real, PurePath("."))]
    files: list[tuple[Path, PurePath]] = []
    for folder, subfolders, names in os.walk(real):
        for name in subfolders:
            if (Path(folder) / name).is_symlink():
                raise UnsafePath(f"holds {name}, a symlink to a folder: copy that folder in instead")
        for name in sorted(names):
            file = Path(folder) / name
            try:
                files.append((resolve_inside(source_root, file.relative_to(source_root)), file.relative_to(real)))
            except UnsafePath as err:
                raise UnsafePath(f"holds {file.relative_to(real)}, which {err}") from None
    return files


def copy_inside(source: Path, source_root: Path, out_root: Path, target: str | PurePath) -> None:
    """Copy the file or folder ``source`` (inside the resolved ``source_root``) to ``out_root / target``,
    checked again at copy time: what is read by :func:`tree_to_copy`, and the target must land
    inside the resolved ``out_root``. Raises :class:`UnsafePath` otherwise."""
    destination = out_root / target
    if not Path(os.path.realpath(destination)).is_relative_to(out_root):
        raise UnsafePath(f"would be written outside the output folder, as {target}")
    for file, relative in tree_to_copy(source, source_root):
        copy = destination / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, copy)


def _reason(err: OSError | ValueError) -> str:
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "is a symlink loop"
    if isinstance(err, OSError) and err.errno == errno.ENOENT:
        return "does not exist (or is a broken symlink)"
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        return "is too long a path"
    if isinstance(err, OSError):
        return f"cannot be read: {err.strerror or err}"
    return str(err)


def check_fractions(val: float, test: float) -> None:
    """ValueError naming ``--val``/``--test`` unless both are in [0, 1) and their sum is below 1."""
    for option, value in (("--val", val), ("--test", test)):
        if not 0 <= value < 1:  # also refuses NaN
            raise ValueError(f"{option} {value}: expected a fraction of the patients in [0, 1)")
    if not val + test < 1:
        raise ValueError(
            f"--val {val} + --test {test} = {val + test:g}: expected a sum below 1, to leave training data"
        )


class _Unit(Protocol):
    @property
    def patient(self) -> str: ...


def require_training(
    units: Sequence[_Unit], splits: Sequence[str], fractions: tuple[float, float], source: Path
) -> None:
    """A :class:`DataError` (headed by ``source``) when the ``splits`` of ``units`` leave no patient
    to train on: few patients and large fractions (at least one goes to val and test from 3 on)."""
    if units and "train" not in splits:
        count = len({unit.patient for unit in units})
        val, test = fractions
        reason = f"{count} patient(s) leave none to train on with --val {val} --test {test}: lower them or add data"
        raise DataError(source, [DataProblem(str(source), reason)])


_MATCH_WORKER = r"""
import json, re, signal, sys
signal.signal(signal.SIGALRM, signal.SIG_DFL)
job = json.load(sys.stdin)
pattern = re.compile(job["pattern"])
for name in job["names"]:
    signal.setitimer(signal.ITIMER_REAL, job["seconds"])
    match = pattern.search(name)
    signal.setitimer(signal.ITIMER_REAL, 0)
    found = None if match is None else match.group(1) if match.groups() else match.group(0)
    print(json.dumps(found or None), flush=True)
"""


class PatientPattern:
    """A user's regular expression finding the patient id in file names: its first group, else the
    whole match; None where it finds nothing (or an empty id).

    Why a child process: Python's ``re`` backtracks, so a pattern such as ``(a+)+$`` takes time
    exponential in the length of the name, holding the GIL all along (no thread or Python signal
    handler can stop it), and Python 3.11 has no match timeout. Refusing "dangerous" patterns by
    inspecting them is not sound either (``(a|a)*b`` and ``\\d*\\d*\\d*x`` blow up without nested
    quantifiers). So the names are matched in a child process in which each match has a time limit
    of ``seconds`` enforced by the kernel: an ``ITIMER_REAL`` timer whose SIGALRM, left at its
    default action, ends the process even in the middle of a match. The matched text is a file
    name stem, at most :data:`MAX_NAME_BYTES` bytes (checked by :func:`resolve_inside` or the file
    system), which bounds the cost of merely polynomial patterns. A pattern that runs out of time
    is refused as a whole (ValueError naming the file name it stalled on); no partial answer.
    POSIX only, as ``signal.setitimer`` is.
    """

    def __init__(self, pattern: str, option: str = "--patient-pattern", seconds: float = 1.0) -> None:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as err:
            raise ValueError(f"{option} {pattern!r} is not a valid regular expression: {err}") from None
        self.pattern, self.option, self.seconds = pattern, option, seconds

    def patients(self, names: Sequence[str]) -> list[str | None]:
        """The patient id found in each of ``names`` (None: no match)."""
        if not names:
            return []
        job = json.dumps({"pattern": self.pattern, "names": list(names), "seconds": self.seconds})
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _MATCH_WORKER],
                input=job,
                capture_output=True,
                text=True,
                timeout=10 + self.seconds * len(names),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ValueError(f"{self.option} {self.pattern!r}: matching the file names timed out") from None
        found = [json.loads(line) for line in done.stdout.splitlines()]
        if done.returncode == -signal.SIGALRM:
            stalled = names[len(found)]
            raise ValueError(
                f"{self.option} {self.pattern!r} took over {self.seconds:g} s on the file name {stalled!r}: "
                "it backtracks catastrophically (nested quantifiers such as (a+)+); write a simpler one"
            )
        if done.returncode != 0 or len(found) != len(names):
            raise ValueError(f"{self.option} {self.pattern!r} could not be matched: {done.stderr.strip()[-300:]}")
        return found
