"""``medfed simulate``: a federation of simulated sites on this machine, or the cross-site protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.cli.common import console, fail, setup_logging
from medfed.cli.render import print_protocol, print_summary
from medfed.config import Config, ConfigError, load_config, parse_override
from medfed.display import plain
from medfed.progress import run_rounds, steps
from medfed.run_folder import ProtocolFolder, RunFolder

__all__ = ["simulate"]


def simulate(
    config_file: Annotated[Path, typer.Argument(help="Run config (TOML), e.g. configs/classification-synthetic.toml")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Where the config's data lies here: its MedMNIST .npz (or the folder holding it), its "
            "Pascal VOC or pairs folder, or a folder with one site folder per hospital"
        ),
    ] = None,
    sites: Annotated[int | None, typer.Option(help="Number of simulated sites (partitioned data)")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for report, plots and checkpoints")] = Path("runs/latest"),
    state_dir: Annotated[
        Path | None, typer.Option(help="Keep site privacy ledgers here across runs (default: fresh in OUT/state)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run checkpointed in OUT after its last completed round")
    ] = False,
    protocol: Annotated[
        str,
        typer.Option(
            help="federation: one run (report.json). cross-site: local, federated, leave-one-site-out and pooled "
            "models, each scored at every site (protocol.json)"
        ),
    ] = "federation",
    replicates: Annotated[
        int, typer.Option(min=10, max=100_000, help="cross-site: bootstrap resamples of each site's test cases")
    ] = 200,
    verbose: bool = False,
) -> None:
    """Run a simulated multi-hospital federation on this machine and write its report."""
    from medfed.protocol import MIN_SITES, PROTOCOLS

    setup_logging(verbose)
    if protocol not in PROTOCOLS:
        raise fail(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    cross_site = protocol == "cross-site"
    if cross_site and (resume or state_dir is not None):
        option = "--resume" if resume else "--state-dir"
        raise fail(f"{option} applies to one federation run, not to --protocol cross-site (it runs several)")
    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
        if data is not None:
            overrides.update(_data_overrides(data, load_config(config_file, overrides)))
        if sites is not None:
            overrides["data.sites"] = sites
        if rounds is not None:
            overrides["run.rounds"] = rounds
        config = load_config(config_file, overrides)
    except ConfigError as err:
        raise fail(str(err)) from err
    if config.run.initial_model:
        from medfed.federation import initial_model

        try:
            initial_model(config)
        except ValueError as err:
            raise fail(str(err)) from err
    from medfed.evaluation.report import write_report
    from medfed.federation import untrained_reason
    from medfed.privacy import LedgerError, PrivacyLedger
    from medfed.simulation import simulate as run_simulation
    from medfed.tasks import get_task

    names, cards = _checked_sites(config, cross_site, MIN_SITES)
    if cross_site:
        _run_protocol(config, out, replicates, verbose)
        return
    if state_dir is not None:  # and the sites' privacy ledgers: one that cannot be read is never "nothing spent"
        try:
            for name in names:
                PrivacyLedger.open(state_dir / name, 0.0)
        except LedgerError as err:
            raise fail(str(err), code=1) from err
    console.print(f"[bold]medfed[/] simulating [cyan]{plain(config.run.name)}[/] -> {plain(out)}")
    try:
        with run_rounds(console, out, config.run.rounds, resume, _after_rounds(config)):
            report = run_simulation(config, out, state_dir, verbose, resume)
    except (FileNotFoundError, ValueError) as err:  # --resume without a checkpoint, or another config
        raise fail(str(err)) from err
    failure = untrained_reason(report)
    if failure:
        raise fail(f"{failure} (report: {RunFolder(out).report_json})", code=1)
    if cards:
        report["data_cards"] = cards
    task = get_task(config.run.task)
    if hasattr(task, "round_figures"):  # a generator's samples after each round: post-processing, no data read
        report["round_figures"] = task.round_figures(config, out)
    html = write_report(report, out, _simulated_examples(config, out))
    print_summary(console, report)
    console.print(f"report: {plain(RunFolder(out).report_json)}  {plain(html)}")


def _after_rounds(config: Config) -> str:
    """What a run does after its last round, as its progress says it."""
    if config.evaluation.cross_site:
        return "rounds done; final evaluation and each site's local-only model (cross-site matrix)"
    return "rounds done; final evaluation"


def _data_overrides(data: Path, config: Config) -> dict[str, Any]:
    """``--data``: where the config's data lies on this machine. A folder of site folders (each with
    a ``manifest.csv``) is read as those sites, whatever the config's source; otherwise the config's
    own source is kept and only its path moves: a MedMNIST ``.npz`` (or the folder holding the
    config's file of that name), a Pascal VOC folder, or a folder in the ``pairs`` layout.
    Anything else fails with what was expected for this config."""
    source, configured = config.data.source, Path(config.data.path)
    if data.is_file() and data.suffix == ".npz":
        return {"data.source": "medmnist", "data.path": str(data.resolve())}
    if not data.is_dir():
        raise fail(f"--data {data}: {_expected_data(source, configured)}")
    if (data / "manifest.csv").is_file():
        raise fail(f"--data {data} is a single site folder; a simulation needs a folder of site folders")
    children = sorted(child for child in data.iterdir() if child.is_dir())
    if any((child / "manifest.csv").is_file() for child in children):
        return {"data.source": "sites", "data.path": str(data.resolve()), "data.partitioner": "natural"}
    if source == "pairs":
        return {"data.path": str(data.resolve())}
    if source == "voc":
        if (data / "Annotations").is_dir():
            return {"data.path": str(data.resolve())}
        inside = [child for child in children if (child / "Annotations").is_dir()]
        hint = f"; {inside[0]} is one: pass --data {inside[0]}" if len(inside) == 1 else ""
        raise fail(f"--data {data} has no Annotations/ folder: {_expected_data(source, configured)}{hint}")
    if source == "medmnist" and configured.name and (data / configured.name).is_file():
        return {"data.path": str((data / configured.name).resolve())}
    raise fail(f"--data {data}: {_expected_data(source, configured)}")


def _expected_data(source: str, configured: Path) -> str:
    """What ``--data`` may be for a config whose data is ``source`` at ``configured``."""
    own = {
        "medmnist": f"a MedMNIST .npz file (or a folder holding {configured.name})",
        "voc": "a Pascal VOC folder (Annotations/, JPEGImages/)",
        "pairs": "a folder of image/mask pairs",
    }.get(source, "a MedMNIST .npz file")
    return f"expected {own} or a folder holding one folder per site (data.source = '{source}' in the config)"


def _checked_sites(config: Config, cross_site: bool, min_sites: int) -> tuple[list[str], dict[str, list[str]]]:
    """The simulated sites' names and data cards, checked here, before any site starts, so a mistake
    gets one clear message (exit code 2)."""
    from medfed.data import DataError, load_simulated_site, simulated_site_names

    try:
        names = simulated_site_names(config)
        if len(names) < config.run.min_sites:
            raise ValueError(f"the data has {len(names)} site(s) but run.min-sites = {config.run.min_sites}")
        if cross_site and len(names) < min_sites:
            raise ValueError(
                f"--protocol cross-site needs at least {min_sites} sites (leave-one-site-out trains on the "
                f"others); the data has {len(names)}"
            )
        cards = {}
        for index in range(len(names)):
            _, site_data = load_simulated_site(config, index)
            if not (site_data.splits == "train").any():
                raise ValueError(f"site {names[index]} has no training samples (no manifest row with split train)")
            if site_data.card:
                cards[names[index]] = list(site_data.card)
    except (FileNotFoundError, ValueError, DataError) as err:
        raise fail(str(err)) from err
    return names, cards


def _run_protocol(config: Config, out: Path, replicates: int, verbose: bool) -> None:
    """``simulate --protocol cross-site``: run it, print its matrix, name its report."""
    from medfed import simulation
    from medfed.data import simulated_site_names
    from medfed.protocol import run_cross_site_protocol

    console.print(f"[bold]medfed[/] cross-site protocol [cyan]{plain(config.run.name)}[/] -> {plain(out)}")
    federations = len(simulated_site_names(config)) + 1  # the federated model, and one without each site

    def federate(run_config: Config, run_dir: Path) -> dict[str, Any]:
        with run_rounds(console, run_dir, run_config.run.rounds, after=f"{run_dir.name}: final evaluation"):
            result = simulation.simulate(run_config, run_dir, verbose=verbose)
        counter.advance()
        return result

    try:
        with steps(console, "cross-site protocol: federations", federations) as counter:
            report = run_cross_site_protocol(config, out, replicates, federate=federate)
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from err
    except RuntimeError as err:  # a federation that trained nothing
        raise fail(str(err), code=1) from err
    print_protocol(console, report)
    folder = ProtocolFolder(out)
    console.print(f"report: {plain(folder.protocol_json)}  {plain(folder.protocol_html)}")


def _simulated_examples(config: Config, out: Path) -> dict[str, list[str]]:
    """Example figures of the final global model on a few test images of each simulated site."""
    from medfed.data import load_simulated_site, simulated_site_names
    from medfed.evaluation.explain import example_images
    from medfed.tasks import get_task
    from medfed.weights import load_checkpoint

    if config.evaluation.example_images <= 0:
        return {}
    task = get_task(config.run.task)
    model = task.build_model(config)
    folder = RunFolder(out)
    state, _ = load_checkpoint(folder.global_model)
    model.load_state_dict(state)
    result = {}
    for index, _ in enumerate(simulated_site_names(config)):
        name, site = load_simulated_site(config, index)
        paths = example_images(task, model, site.split("test"), config, folder.plots, f"examples-{name}")
        result[name] = [str(p.relative_to(out)) for p in paths]
    return result
