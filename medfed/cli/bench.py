"""``medfed bench``: run one of the benchmarks in ``benchmarks/``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.common import fail

__all__ = ["bench"]

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A benchmark in benchmarks/ (e.g. scale, spine, detection_bccd)")],
    quick: Annotated[bool, typer.Option(help="The short version (minutes), where the benchmark has one")] = False,
) -> None:
    """Run a benchmark: it writes benchmarks/results/NAME.json (and plots) and prints a table.
    Extra arguments go to the benchmark (see its --help)."""
    import runpy
    import sys

    available = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("harness", "readme_table"))
    script = BENCHMARKS / f"{name.replace('-', '_')}.py"
    if name not in available and script.stem not in available:
        raise fail(f"no benchmark {name!r} in {BENCHMARKS}: expected one of {available}")
    argv = sys.argv
    sys.argv = [str(script), *(["--quick"] if quick else []), *ctx.args]
    paths = [str(BENCHMARKS), str(BENCHMARKS.parent)]  # the benchmarks' harness, and medfed's tests
    sys.path[:0] = paths
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        for path in paths:
            sys.path.remove(path)
