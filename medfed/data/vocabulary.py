"""The words every part of :mod:`medfed.data` shares: the manifest's file name and the problems
that make a site folder unusable (:class:`DataProblem`, :class:`DataError`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CT_WINDOW = (-1000.0, 1000.0)  # Hounsfield units the CT window maps to [0, 1]: air to dense bone

__all__ = ["MANIFEST", "DataError", "DataProblem"]

MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a site folder: which file (or row) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class DataError(ValueError):
    """A site folder cannot be used; lists every problem found, not only the first."""

    def __init__(self, site_dir: Path, problems: list[DataProblem]) -> None:
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"site folder {site_dir} has {len(problems)} problem(s):\n  {shown}{more}")
