"""``medfed``: simulate a federation and follow it, evaluate or apply a model at a site, check or make site data."""

from __future__ import annotations

import typer

from medfed.cli import bench, data, evaluate, generate, pretrain, privacy, simulate, site, status

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False)
app.add_typer(data.app, name="data")
app.add_typer(site.app, name="site")
app.add_typer(privacy.app, name="privacy")
app.command()(simulate.simulate)
app.command()(status.status)
app.command()(evaluate.evaluate)
app.command()(evaluate.predict)
app.command()(pretrain.pretrain)
app.command()(generate.generate)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench.bench)


def main() -> None:
    """The ``medfed`` command."""
    app()
