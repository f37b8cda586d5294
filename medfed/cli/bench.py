"""``medfed bench``: run one of the benchmarks in the source checkout's ``benchmarks`` package."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from medfed.cli.common import console, fail
from medfed.progress import steps

__all__ = ["bench"]

CHECKOUT = Path(__file__).resolve().parent.parent.parent  # the folder holding medfed/, benchmarks/, tests/
BENCHMARKS = CHECKOUT / "benchmarks"
NOT_BENCHMARKS = ("__init__", "harness", "readme_table")


def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A benchmark in benchmarks/ (e.g. scale, spine, detection_bccd)")],
    quick: Annotated[bool, typer.Option(help="The short version (minutes), where the benchmark has one")] = False,
) -> None:
    """Run a benchmark: it writes benchmarks/results/NAME.json (and plots) and prints a table.
    Extra arguments go to the benchmark (see its --help)."""
    available = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    module = name.replace("-", "_")
    if name not in available and module not in available:
        raise fail(f"no benchmark {name!r} in {BENCHMARKS}: expected one of {available}")
    for package in ("benchmarks", "tests"):  # tests: deployment_overhead starts processes as its tests do
        _checkout_package(package)
    benchmark = importlib.import_module(f"benchmarks.{module}")
    with steps(console, f"benchmark {module}"):
        benchmark.main([*(["--quick"] if quick else []), *ctx.args])


def _checkout_package(name: str) -> ModuleType:
    """The top-level package ``name`` of the source checkout, imported from its folder by location:
    another distribution's package of the same name (opacus installs a ``benchmarks``) is never
    taken for it, and ``sys.path`` stays as it is."""
    folder = CHECKOUT / name
    loaded = sys.modules.get(name)
    if loaded is not None:
        if loaded.__file__ is not None and Path(loaded.__file__).resolve().parent == folder:
            return loaded
        raise fail(f"cannot run benchmarks from {folder}: another package {name!r} is imported ({loaded.__file__})")
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise fail(f"{folder}: not a package (medfed bench runs from a source checkout)")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package
