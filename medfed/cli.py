"""``medfed``: simulate a federation, evaluate or apply a model at a site, check or make site data."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from medfed.config import Config, ConfigError, load_config, parse_override
from medfed.display import plain
from medfed.run_folder import ProtocolFolder, RunFolder

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False)
data_app = typer.Typer(
    no_args_is_help=True, help="Site data: check a site folder, import image/mask folders, write synthetic sites."
)
app.add_typer(data_app, name="data")
site_app = typer.Typer(no_args_is_help=True, help="A deployed site, as its operator sees it.")
app.add_typer(site_app, name="site")
privacy_app = typer.Typer(no_args_is_help=True, help="Differential privacy: plan the noise before a run.")
app.add_typer(privacy_app, name="privacy")
console = Console(emoji=False)  # user text (file names, DICOM fields) prints as itself: see medfed.display


def main() -> None:
    app()


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=True)
    logger = logging.getLogger("medfed")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error; the exit to raise: code 2 for usage and config errors, 1 for
    data and state errors."""
    console.print(f"[bold red]error:[/] {plain(message)}")
    return typer.Exit(code=code)


def _with_options(config: Config, options: dict[str, tuple[str, Any]]) -> Config:
    """``config`` with the command-line options that were given (not None; 0 is a value) applied
    as overrides ``{"--option": ("section.key", value)}`` and validated as a config file is: a
    value out of range exits with code 2 naming the option and what was expected."""
    try:
        return config.with_overrides({key: value for key, value in options.values() if value is not None})
    except ConfigError as err:
        option = next((name for name, (key, _) in options.items() if key == err.key), "")
        raise _fail(f"{option}: {err}" if option else str(err)) from err


def _data_overrides(data: Path, source: str) -> dict[str, Any]:
    """``--data``: a MedMNIST .npz (split by the config's partitioner), a folder of site folders, or,
    for a config whose ``data.source`` is a layout (``pairs``, ``voc``), a folder in that layout: the
    config's own source moved there."""
    if data.is_file() and data.suffix == ".npz":
        return {"data.source": "medmnist", "data.path": str(data.resolve())}
    if data.is_dir():
        if (data / "manifest.csv").is_file():
            raise _fail(f"--data {data} is a single site folder; a simulation needs a folder of site folders")
        site_folders = any((child / "manifest.csv").is_file() for child in data.iterdir() if child.is_dir())
        if source in ("pairs", "voc") and not site_folders:
            return {"data.path": str(data.resolve())}
        return {"data.source": "sites", "data.path": str(data.resolve()), "data.partitioner": "natural"}
    raise _fail(f"--data {data}: expected a MedMNIST .npz file or a folder holding one folder per site")


@app.command()
def simulate(
    config_file: Annotated[Path, typer.Argument(help="Run config (TOML), e.g. configs/classification-synthetic.toml")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="MedMNIST .npz, a folder with one site folder per hospital, or the config's own layout "
            "(data.source pairs / voc) elsewhere"
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

    _setup_logging(verbose)
    if protocol not in PROTOCOLS:
        raise _fail(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    cross_site = protocol == "cross-site"
    if cross_site and (resume or state_dir is not None):
        option = "--resume" if resume else "--state-dir"
        raise _fail(f"{option} applies to one federation run, not to --protocol cross-site (it runs several)")
    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
        if data is not None:
            overrides.update(_data_overrides(data, load_config(config_file, overrides).data.source))
        if sites is not None:
            overrides["data.sites"] = sites
        if rounds is not None:
            overrides["run.rounds"] = rounds
        config = load_config(config_file, overrides)
    except ConfigError as err:
        raise _fail(str(err)) from err
    if config.run.initial_model:
        from medfed.federation import initial_model

        try:
            initial_model(config)
        except ValueError as err:
            raise _fail(str(err)) from err
    from medfed.data import DataError, load_simulated_site, simulated_site_names
    from medfed.evaluation.report import write_report
    from medfed.federation import untrained_reason
    from medfed.privacy import LedgerError, PrivacyLedger
    from medfed.simulation import simulate as run_simulation

    try:  # check the data here, before any site starts, so a mistake gets one clear message
        names = simulated_site_names(config)
        if len(names) < config.run.min_sites:
            raise ValueError(f"the data has {len(names)} site(s) but run.min-sites = {config.run.min_sites}")
        if cross_site and len(names) < MIN_SITES:
            raise ValueError(
                f"--protocol cross-site needs at least {MIN_SITES} sites (leave-one-site-out trains on the "
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
        raise _fail(str(err)) from err
    if cross_site:
        _run_protocol(config, out, replicates, verbose)
        return
    try:  # and the sites' privacy ledgers: one that cannot be read is never taken for "nothing spent"
        for name in names if state_dir is not None else []:
            PrivacyLedger.open(state_dir / name, 0.0)
    except LedgerError as err:
        raise _fail(str(err), code=1) from err
    console.print(f"[bold]medfed[/] simulating [cyan]{plain(config.run.name)}[/] -> {plain(out)}")
    try:
        report = run_simulation(config, out, state_dir, verbose, resume)
    except (FileNotFoundError, ValueError) as err:  # --resume without a checkpoint, or another config
        raise _fail(str(err)) from err
    failure = untrained_reason(report)
    if failure:
        raise _fail(f"{failure} (report: {RunFolder(out).report_json})", code=1)
    if cards:
        report["data_cards"] = cards
    html = write_report(report, out, _simulated_examples(config, out))
    _print_summary(report)
    console.print(f"report: {plain(RunFolder(out).report_json)}  {plain(html)}")


def _run_protocol(config: Config, out: Path, replicates: int, verbose: bool) -> None:
    """``simulate --protocol cross-site``: run it, print its matrix, name its report."""
    from medfed import simulation
    from medfed.protocol import run_cross_site_protocol

    console.print(f"[bold]medfed[/] cross-site protocol [cyan]{plain(config.run.name)}[/] -> {plain(out)}")
    try:
        report = run_cross_site_protocol(
            config, out, replicates, federate=lambda c, run_dir: simulation.simulate(c, run_dir, verbose=verbose)
        )
    except (FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from err
    except RuntimeError as err:  # a federation that trained nothing
        raise _fail(str(err), code=1) from err
    _print_protocol(report)
    folder = ProtocolFolder(out)
    console.print(f"report: {plain(folder.protocol_json)}  {plain(folder.protocol_html)}")


def _print_protocol(report: dict[str, Any]) -> None:
    """The protocol's matrix (value and 95% interval per cell), its LOSO row and each model's gap."""

    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "n/a"
        low, high = ("n/a" if entry[k] is None else f"{entry[k]:.2f}" for k in ("low", "high"))
        return f"{_num(entry['value'])} [{low}, {high}]"

    table = Table(title=f"Cross-site protocol, test {report['metric']} [95% interval]", box=None, pad_edge=False)
    table.add_column("model", no_wrap=True)
    for site in report["sites"]:
        table.add_column(plain(site), justify="right")
    table.add_column("gap", justify="right", no_wrap=True)
    for model, row in zip(report["models"], report["matrix"], strict=True):
        gap = report["gap"][model]["gap"]
        table.add_row(plain(model), *map(cell, row), "n/a" if gap is None or math.isnan(gap) else f"{gap:+.3f}")
    loso = report["leave_one_site_out"]
    table.add_row("LOSO", *[cell(loso.get(s)) for s in report["sites"]], "")
    console.print(table)
    console.print("LOSO: the federation without the site it is scored at (leave-one-site-out)")
    console.print("gap: own site minus other sites (local models); mean over sites minus LOSO (federated, pooled)")
    if report["privacy"]:
        spent = ", ".join(f"{plain(s)} {t['epsilon']:.2f}" for s, t in report["privacy"]["total"].items())
        console.print(f"ε spent at each site over all the protocol's models: {spent}")


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


def _print_summary(report: dict[str, Any]) -> None:
    metric = report["primary_metric"]
    table = Table(title=f"Final global model, test split ({metric})")
    table.add_column("site")
    table.add_column(f"{metric} round 0 (val)", justify="right")
    table.add_column(f"{metric} final (test)", justify="right")
    finals = report["final"]["per_site"].values()
    point = report["final"].get("operating_point")
    if point:  # a binary classifier: what a clinician reads at the operating threshold
        others = ["sensitivity", "specificity"]
    else:
        others = [next((m for m in ("accuracy", "iou", "map") if any(m in v for v in finals)), "loss")]
    for other in others:
        table.add_column(f"{other} (test)", justify="right")
    table.add_column("ε spent / budget", justify="right")
    private = report["config"]["privacy"]["enabled"]
    for site in report["sites"]:
        start = report["rounds"][0]["metrics"].get(site, {}).get(metric)
        final = report["final"]["per_site"].get(site, {})
        privacy = report["privacy"].get(site)
        if privacy:
            spent = f"{privacy['epsilon']:.2f} / {privacy['budget']:.2f}"
        else:  # a site that never reported its spending under DP did not train
            spent = "not trained" if private else "DP off"
        table.add_row(plain(site), _num(start), _num(final.get(metric)), *[_num(final.get(o)) for o in others], spent)
    console.print(table)
    if point:
        console.print(f"operating threshold {point['threshold']:.3f} ({point['method']})")
        if point.get("per_site"):
            own = ", ".join(f"{plain(site)} {p['threshold']:.3f}" for site, p in point["per_site"].items())
            console.print(f"each site's own, chosen on its validation split and used above: {own}")
    pooled = report["final"].get("pooled")
    if pooled:
        shown = ", ".join(f"{k} {_num(v)}" for k, v in pooled.items() if k in (metric, "sensitivity", "specificity"))
        console.print(f"all sites' test cases together: {shown}")
    cross = report["final"].get("cross_site")
    if cross:
        matrix = Table(title=f"Cross-site {cross['metric']} (rows: model, columns: test site)")
        matrix.add_column("model")
        for site in cross["sites"]:
            matrix.add_column(plain(site), justify="right")
        for model, row in zip(cross["models"], cross["matrix"], strict=True):
            matrix.add_row(plain(model), *[_num(v) for v in row])
        console.print(matrix)


def _num(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Global model checkpoint (.safetensors with its .json beside it)")],
    data: Annotated[Path, typer.Option(help="This site's data folder (manifest.csv + images)")],
    split: Annotated[str, typer.Option(help="Split to evaluate: train, val, test or all")] = "test",
    out: Annotated[
        Path | None,
        typer.Option(help="Write metrics.json, per-case quantification and example images here (stays at the site)"),
    ] = None,
    site: Annotated[
        str, typer.Option(help="This site's name in the run: score at the threshold chosen on its own validation split")
    ] = "",
) -> None:
    """Evaluate a global model on this site's own data (nothing leaves the machine)."""
    import json

    from medfed.data import ArrayDataset, DataError, read_site
    from medfed.data.manifest import SiteReading
    from medfed.evaluation.explain import example_images
    from medfed.evaluation.report import json_safe
    from medfed.predict import read_checkpoint_model
    from medfed.tasks import get_task
    from medfed.training import evaluate as evaluate_model
    from medfed.training import resolve_device

    try:
        config, net, meta = read_checkpoint_model(model, site)
        task = get_task(config.run.task)
        site = read_site(data, SiteReading.from_config(config.data, task.TARGET))
    except (FileNotFoundError, DataError, ConfigError, KeyError, ValueError) as err:
        raise _fail(str(err)) from err
    if split == "all":
        dataset = ArrayDataset(site.images, site.targets, site.target_key, site.spacing)
    elif split in ("train", "val", "test"):
        dataset = site.split(split)
    else:
        raise _fail(f"--split {split!r}: expected train, val, test or all")
    if len(dataset) == 0:
        raise _fail(f"{data}: no samples in the {split} split")
    device = resolve_device("auto")
    cases: list[dict[str, float]] = []
    results = evaluate_model(task, net.to(device), dataset, config, device, cases)
    title = f"{model.name} (round {meta.get('round')}) on {data.name} [{split}], n={len(dataset)}"
    table = Table(title=plain(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results.items():
        table.add_row(plain(name), _num(value))
    console.print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(json_safe(results), indent=1))
        if cases:
            _write_cases(out / "cases.csv", cases, config.data.spatial_dims)
        example_images(task, net.cpu(), dataset, config, out, "example")
        console.print(f"written: {plain(out / 'metrics.json')}{', cases.csv' if cases else ''} and example images")


def _write_cases(path: Path, cases: list[dict[str, Any]], spatial_dims: int) -> None:
    """Per-case quantification as CSV, sizes in mm² (2D) or mL (3D)."""
    import csv

    from medfed.evaluation.quantify import size_unit

    unit = size_unit(spatial_dims)
    columns = list(dict.fromkeys(k for case in cases for k in case))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = [f"{c}_{unit}" if c.endswith("size") else c for c in columns]
        writer.writerow(["case", *header])
        for index, case in enumerate(cases):
            writer.writerow([index, *(case.get(c, "") for c in columns)])


@app.command()
def predict(
    model: Annotated[
        Path, typer.Option(help="A medfed checkpoint (.safetensors with its .json beside it), e.g. the global model")
    ],
    input: Annotated[
        Path, typer.Option(help="An image, NIfTI volume, DICOM file or DICOM series folder, or a folder of them")
    ],
    out: Annotated[
        Path,
        typer.Option(help="Folder for masks (NIfTI, DICOM-SEG) and quantification.csv, or detections.csv; overlays"),
    ],
    min_score: Annotated[float, typer.Option(help="Detection: keep boxes scoring at least this")] = 0.3,
    site: Annotated[
        str, typer.Option(help="Classification: this site's name in the run, to call at its own threshold")
    ] = "",
) -> None:
    """Apply a model to new scans at this site: masks aligned with the input, structure count and size;
    boxes in the input's pixels (detection); or class probabilities and the call at the model's
    operating threshold (classification)."""
    from medfed.predict import predict_cases

    try:
        predictions = predict_cases(model, input, out, min_score, site)
    except (OSError, ValueError, KeyError) as err:  # OSError: an unwritable --out, a missing file
        raise _fail(str(err)) from err
    table = Table(title=f"{plain(model.name)} on {plain(input)}")
    kind = predictions.task
    columns = {
        "detection": ("case", "detections", "written"),
        "classification": ("case", "call", "probability"),
        "segmentation": ("case", "structures", "size", "written"),
    }[kind]
    for column in columns:
        table.add_column(column, justify="left" if column in ("case", "written", "call") else "right")
    for r in predictions.cases:
        written = plain(", ".join(p.name for p in r.outputs))
        if kind == "detection":
            table.add_row(plain(r.case), str(r.count), written)
        elif kind == "classification":
            table.add_row(plain(r.case), plain(r.call), f"{r.probability:.3f}")
        else:
            table.add_row(plain(r.case), str(r.count), f"{r.size:.3f} {r.unit}", written)
    console.print(table)
    console.print(f"table: {plain(predictions.table)}")


@data_app.command("check")
def data_check(
    site_dir: Annotated[Path, typer.Argument(help="A site folder (manifest.csv + images)")],
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Run config (TOML) to check against: task, sizes, classes, channels, CT window, spacing"
        ),
    ] = None,
    task: Annotated[str, typer.Option(help="Task the data is for")] = "classification",
    num_classes: Annotated[int, typer.Option(help="Number of classes")] = 2,
    image_size: Annotated[int, typer.Option(help="Model input size")] = 28,
    spatial_dims: Annotated[int, typer.Option(help="2: images, 3: volumes")] = 2,
    channels: Annotated[int, typer.Option(help="Image channels: 1 grey, 3 colour (RGB), N scans per case")] = 1,
    class_names: Annotated[
        str, typer.Option(help="Detection: comma-separated class names, in class-index order (e.g. RBC,WBC,Platelets)")
    ] = "",
) -> None:
    """Pre-flight check of a site folder: a data card, every error with its file and reason (exit
    code 1), and warnings that do not block. The site client runs the same check before it trains."""
    names = tuple(n.strip() for n in class_names.split(",") if n.strip())
    settings = _CheckSettings(task, num_classes, image_size, spatial_dims, channels, names)
    if not _preflight_report(site_dir, _with_config(settings, config_file)):
        raise typer.Exit(code=1)


class _CheckSettings(NamedTuple):
    """What a site folder is checked against: the task's settings (``[run]``/``[data]`` of a config)."""

    task: str
    num_classes: int
    image_size: int
    spatial_dims: int
    channels: int
    class_names: tuple[str, ...] = ()
    preprocess: Any = None  # medfed.data.decode.Preprocess; None: the default

    def command(self, site_dir: Path, config_file: Path | None) -> str:
        """The ``medfed data check`` command line that checks ``site_dir`` with these settings."""
        if config_file is not None:
            return f"medfed data check {site_dir} --config {config_file}"
        names = f" --class-names {','.join(self.class_names)}" if self.class_names else ""
        return (
            f"medfed data check {site_dir} --task {self.task} --num-classes {self.num_classes} "
            f"--image-size {self.image_size} --spatial-dims {self.spatial_dims} --channels {self.channels}{names}"
        )


def _with_config(settings: _CheckSettings, config_file: Path | None) -> _CheckSettings:
    """``settings``, or those of the run config ``config_file`` when one is given. Options are checked
    as the config keys they stand for (exit code 2 naming the option and the range)."""
    if config_file is None:
        _with_options(
            Config(),
            {
                "--task": ("run.task", settings.task or None),
                "--num-classes": ("data.num-classes", len(settings.class_names) or settings.num_classes),
                "--image-size": ("data.image-size", settings.image_size),
                "--spatial-dims": ("data.spatial-dims", settings.spatial_dims or None),
                "--channels": ("data.channels", settings.channels),
                "--class-names": ("data.class-names", list(settings.class_names)),
            },
        )
        return settings
    from medfed.data.decode import Preprocess

    try:
        config = load_config(config_file)
    except ConfigError as err:
        raise _fail(str(err)) from err
    d = config.data
    return _CheckSettings(
        config.run.task,
        d.num_classes,
        d.image_size,
        d.spatial_dims,
        d.channels,
        d.class_names,
        Preprocess.from_config(d),
    )


def _preflight_report(site_dir: Path, settings: _CheckSettings) -> bool:
    """Run the pre-flight check on ``site_dir`` and print it: warnings, then every error (False) or
    the data card and the samples per split and class (True)."""
    import numpy as np

    from medfed.data import SPLITS
    from medfed.data.card import data_card
    from medfed.data.decode import DEFAULT_PREPROCESS
    from medfed.data.manifest import SiteReading
    from medfed.data.preflight import run_preflight
    from medfed.tasks import TASKS, get_task

    if settings.task not in TASKS:
        raise _fail(f"--task {settings.task!r}: expected one of {sorted(TASKS)}")
    names = settings.class_names
    num_classes = len(names) if names else settings.num_classes
    preprocess = settings.preprocess or DEFAULT_PREPROCESS
    reading = SiteReading(
        settings.image_size,
        num_classes,
        get_task(settings.task).TARGET,
        settings.spatial_dims,
        names,
        preprocess,
        settings.channels,
    )
    result = run_preflight(site_dir, reading)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {plain(warning)}")
    if result.site is None:
        for error in result.errors[:200]:
            console.print(f"[bold red]error:[/] {plain(error)}")
        more = " (first 200 shown)" if len(result.errors) > 200 else ""
        console.print(f"[bold red]{plain(site_dir)}: {len(result.errors)} error(s){more}: {plain(result.summary())}[/]")
        return False
    site = result.site
    unit, units = site.privacy_units("train")
    console.print(
        f"{plain(site_dir)}: {len(site.targets)} samples, all readable; privacy unit: {unit} ({len(units)} in train); "
        f"{len(result.warnings)} warning(s)"
    )
    for line in data_card(site_dir, site, preprocess.max_pixels).lines():
        console.print(f"  {plain(line)}")
    if site.target_key == "boxes":
        table = Table(title="images and boxes per split and class")
        table.add_column("split")
        table.add_column("images", justify="right")
        table.add_column("without boxes", justify="right")
        for k in range(num_classes):
            table.add_column(plain(names[k]) if k < len(names) else f"class {k}", justify="right")
        for split in SPLITS:
            boxes = site.targets[site.splits == split]
            classes = boxes[..., 4]
            empty = int(np.sum((classes < 0).all(axis=1))) if len(boxes) else 0
            counts = [str(int(np.sum(classes == k))) for k in range(num_classes)]
            table.add_row(split, str(len(boxes)), str(empty), *counts)
        console.print(table)
        return True
    table = Table(
        title="samples per split and class" + (" (largest class in the mask)" if site.target_key == "mask" else "")
    )
    table.add_column("split")
    for k in range(num_classes):
        table.add_column(f"class {k}", justify="right")
    for split in SPLITS:
        labels = site.class_labels()[site.splits == split]
        table.add_row(split, *[str(int(np.sum(labels == k))) for k in range(num_classes)])
    console.print(table)
    return True


@data_app.command("import")
def data_import(
    src: Annotated[
        Path,
        typer.Argument(
            help="What to import: a MedMNIST .npz, a VOC folder, a COCO .json, an images+masks folder, a DICOM export"
        ),
    ],
    from_: Annotated[str, typer.Option("--from", help="Layout of SRC: medmnist, voc, coco, image-mask, nifti, dicom")],
    out: Annotated[Path, typer.Option(help="Site folder to create (new or empty): files + manifest.csv")],
    task: Annotated[
        str, typer.Option(help="classification, segmentation or detection (default: what the layout holds)")
    ] = "",
    images: Annotated[
        Path | None, typer.Option(help="Image folder, when not where the layout puts it (SRC/images, JPEGImages)")
    ] = None,
    masks: Annotated[
        Path | None, typer.Option(help="Mask folder, when not SRC/masks or SRC/labelsTr (masks named after images)")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Classification: CSV with image,label (folders) or a DICOM key column "
            "(SeriesInstanceUID, StudyInstanceUID, AccessionNumber, PatientID) and label (dicom)"
        ),
    ] = None,
    patient_pattern: Annotated[
        str, typer.Option(help="Regular expression finding the patient id in a file name (first group)")
    ] = "",
    val: Annotated[float, typer.Option(help="Fraction of patients (images, for boxes) for validation")] = 0.2,
    test: Annotated[float, typer.Option(help="Fraction of patients (images, for boxes) for testing")] = 0.2,
    seed: int = 0,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Run config (TOML) whose task and [data] settings the new folder is checked with"
        ),
    ] = None,
    num_classes: Annotated[int, typer.Option(help="Number of classes, for the check")] = 2,
    image_size: Annotated[int, typer.Option(help="Model input size, for the check")] = 28,
    spatial_dims: Annotated[
        int, typer.Option(help="2: images, 3: volumes, for the check (default: as the first image is)")
    ] = 0,
    channels: Annotated[
        int, typer.Option(help="Image channels: 1 grey (colour photos turned grey), 3 colour (RGB), N scans per case")
    ] = 1,
    class_names: Annotated[
        str, typer.Option(help="Detection: class names in class-index order (default: those found, sorted)")
    ] = "",
    key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="MEDFED_KEY_FILE",
            help="DICOM: the site's secret key for patient pseudonyms, created on first use (mode 600); "
            "default ~/.config/medfed/pseudonym.key ($XDG_CONFIG_HOME/medfed). Keep it, outside any site folder",
        ),
    ] = None,
) -> None:
    """Make a site folder from a known layout, with patient-level train/val/test splits, then run
    the pre-flight check of `medfed data check` on it (exit code 1 when it fails; the folder stays).

    DICOM exports are grouped by SeriesInstanceUID and written as NIfTI with DICOM-SEG masks from
    the export (segmentation) or labels from --labels (classification). No free-text header (names,
    dates, descriptions) is kept: patients become pseudonyms keyed with the site key (--key-file),
    and import-sources.csv keeps only each series' UIDs and number, for the site's own staff.

    Every file read must lie inside SRC (or --images / --masks), every file written inside --out.
    Exit code 2: a setting is wrong; 1: the input data is.
    """
    from medfed.data import DataError
    from medfed.data.boxes import BOXES
    from medfed.data.import_guard import UnsafePath
    from medfed.data.importers import import_site
    from medfed.data.manifest import read_table

    names = tuple(n.strip() for n in class_names.split(",") if n.strip())
    settings = _with_config(_CheckSettings(task, num_classes, image_size, spatial_dims, channels, names), config_file)
    try:
        imported = import_site(
            from_,
            src,
            out,
            task or (settings.task if config_file is not None else ""),
            images=images,
            masks=masks,
            labels=labels,
            patient_pattern=patient_pattern,
            seed=seed,
            fractions=(val, test),
            channels=settings.channels,
            key_file=key_file,
        )
    except (DataError, UnsafePath) as err:
        raise _import_error(str(err), 1) from err
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise _import_error(str(err), 2) from err
    except OSError as err:
        raise _import_error(f"{err.filename or src}: {err.strerror or err}", 1) from err
    for note in imported.notes:
        console.print(f"[yellow]note:[/] {_literal(note)}", emoji=False)
    folder = imported.folder
    settings = settings._replace(task=imported.task, spatial_dims=settings.spatial_dims or _spatial_dims(folder))
    if imported.task == "detection" and not settings.class_names:
        _, rows = read_table(folder / BOXES)
        settings = settings._replace(class_names=tuple(sorted({row["label"] for row in rows})))
        found = _literal(str(list(settings.class_names)))
        console.print(f"class names found (checked in this order; set data.class-names): {found}", emoji=False)
    console.print(f"wrote {_literal(str(folder / 'manifest.csv'))}; its pre-flight check:", emoji=False)
    check = settings.command(folder, config_file)
    if not _preflight_report(folder, settings):
        console.print(
            f"[bold red]{plain(folder)} was written but fails the pre-flight check[/]: a run would refuse it. "
            f"Fix the files or the settings above (--config, --num-classes, --channels, ...), then: {plain(check)}"
        )
        raise typer.Exit(code=1)
    console.print(f"check it again after any change with: {plain(check)}")


def _literal(text: str) -> str:
    """User text (file names, folder names, DICOM values) for Rich, shown as written: markup escaped,
    undecodable characters as backslash escapes (print with ``emoji=False``: no ``:name:`` codes)."""
    return plain(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _import_error(message: str, code: int) -> typer.Exit:
    """Print an import error literally; exit ``code`` (2: a setting is wrong, 1: the input data is)."""
    console.print(f"[bold red]error:[/] {_literal(message)}", emoji=False)
    return typer.Exit(code=code)


def _spatial_dims(site_dir: Path) -> int:
    """3 when the first image of a site folder is a volume, else 2 (also when it cannot be read: the check says why)."""
    from medfed.data.manifest import image_paths, read_table
    from medfed.data.medical_io import read_scan
    from medfed.data.vocabulary import MANIFEST

    _, rows = read_table(site_dir / MANIFEST)
    try:
        shape = read_scan(site_dir / image_paths(rows[0]["image"])[0]).array.shape
    except (ValueError, IndexError, KeyError):
        return 2
    return 3 if sum(n > 1 for n in shape) == 3 else 2


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to create one site folder per synthetic hospital in")],
    task: Annotated[
        str, typer.Option(help="classification (labels), segmentation (masks) or detection (boxes)")
    ] = "classification",
    sites: int = 3,
    samples: int = 200,
    image_size: int = 28,
    num_classes: int = 2,
    spatial_dims: Annotated[int, typer.Option(help="2: images (PNG), 3: volumes (NIfTI)")] = 2,
    channels: Annotated[int, typer.Option(help="Image channels: contrasts of one phantom, as scans of a case")] = 1,
    seed: int = 0,
) -> None:
    """Write synthetic hospitals (scanner shift, prevalence, voxel size) as site folders."""
    from medfed.data import write_site
    from medfed.data.synthetic import with_channels
    from medfed.tasks import TASKS, get_task

    if task not in TASKS:
        raise _fail(f"--task {task!r}: expected classification, segmentation or detection")
    plugin = get_task(task)
    if spatial_dims not in plugin.SPATIAL_DIMS:
        dims, options = " or ".join(f"{n}D" for n in plugin.SPATIAL_DIMS), " or ".join(map(str, plugin.SPATIAL_DIMS))
        raise _fail(f"--task {task} makes {dims} images only (--spatial-dims {options})")
    for index in range(sites):
        site = plugin.synthetic_site(index, samples, image_size, num_classes, seed, spatial_dims=spatial_dims)
        console.print(f"wrote {plain(write_site(out / f'hospital-{index + 1}', with_channels(site, channels)))}")


@site_app.command("status")
def site_status(
    node_config: Annotated[
        Path | None,
        typer.Option(help="The site's node config (deploy/site.sh writes STATE_DIR/node-config.toml)"),
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="The site's state folder, if no node config is given")] = None,
    budget: Annotated[float | None, typer.Option(help="Lifetime ε budget, if the node config does not set one")] = None,
) -> None:
    """Privacy spent at this site over all runs, the budget and what remains (read from its ledger)."""
    import tomllib

    from medfed.privacy import LEDGER_FILE, LedgerError, PrivacyLedger

    settings: dict[str, Any] = {}
    if node_config is not None:
        try:
            settings = tomllib.loads(node_config.read_bytes().decode("utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as err:
            raise _fail(
                f"--node-config {node_config}: not a readable TOML file ({type(err).__name__})", code=1
            ) from err
    folder = state_dir or (Path(str(settings["state-dir"])) if "state-dir" in settings else None)
    if folder is None:
        raise _fail("give --node-config (with state-dir) or --state-dir")
    lifetime = budget if budget is not None else settings.get("privacy-budget")
    if lifetime is not None and (
        isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime < math.inf
    ):
        raise _fail(f"--budget / privacy-budget = {str(lifetime)[:40]!r}: expected a finite number > 0")
    ledger_path = folder / LEDGER_FILE
    try:
        ledger = PrivacyLedger.open(folder, 0.0)
    except LedgerError as err:
        raise _fail(str(err), code=1) from err
    if not ledger_path.is_file():
        console.print(f"no ledger at {plain(ledger_path)}: this site has not trained with differential privacy yet")
        raise typer.Exit(code=0)
    table = Table(title=plain(f"site {settings.get('site-name', folder.name)}: privacy ledger {ledger_path}"))
    table.add_column("")
    table.add_column("value", justify="right")
    spent = ledger.epsilon()
    table.add_row("ε spent (all runs)", f"{spent:.3f}")
    table.add_row("δ", f"{ledger.delta:.2e}")
    table.add_row("accountant", plain(ledger.accountant))
    table.add_row("runs", str(len(ledger.calibrations)))
    table.add_row("rounds trained", str(len(ledger.history)))
    table.add_row("optimizer steps", str(sum(int(steps) for _, _, steps in ledger.history)))
    if lifetime is not None:
        table.add_row("budget", f"{float(lifetime):.3f}")
        table.add_row("remaining", f"{max(float(lifetime) - spent, 0.0):.3f}")
    else:
        table.add_row("budget", "not set here: each run's privacy.budget applies")
    console.print(table)


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors; a .json with provenance beside it)")],
    task: Annotated[
        str | None, typer.Option(help="classification, segmentation or detection (default: the config's)")
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="The run config the model is for ([model], [data], [train] settings)"),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Public site folder(s) holding no patient (default: synthetic hospitals)")
    ] = None,
    phantom: Annotated[
        str,
        typer.Option(
            help="Synthetic segmentation data: lesions, vessels (2D fundus-like), nuclei (microscopy-like) or organs"
        ),
    ] = "lesions",
    sites: Annotated[int, typer.Option(help="Synthetic hospitals (each its own scanner)")] = 3,
    samples: Annotated[int, typer.Option(help="Synthetic images per hospital")] = 200,
    epochs: Annotated[int, typer.Option(help="Passes over the pre-training data")] = 5,
    steps: Annotated[int, typer.Option(help="Train exactly this many steps instead of --epochs (0: use epochs)")] = 0,
    lr: Annotated[
        float, typer.Option(help="Learning rate for all weights (0: the config's train.lr for SGD, 2e-3 for Adam)")
    ] = 0.0,
    momentum: Annotated[float, typer.Option(help="SGD momentum")] = 0.9,
    optimizer: Annotated[str, typer.Option(help="sgd (phantoms) or adam (real public data)")] = "sgd",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value")] = None,
    verbose: bool = False,
) -> None:
    """Build a starting model from data that holds no patient; start a federation from it with
    --set run.initial-model=OUT (the report records where it came from)."""
    _setup_logging(verbose)
    from medfed.pretrain import pretrain as run_pretrain

    try:
        overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
        if task is not None:
            overrides["run.task"] = task
        config = load_config(config_file, overrides) if config_file else Config().with_overrides(overrides)
    except ConfigError as err:
        raise _fail(str(err)) from err
    from medfed.pretrain import PHANTOMS

    if phantom not in PHANTOMS:
        raise _fail(f"--phantom {phantom!r}: expected one of {', '.join(PHANTOMS)}")
    if optimizer not in ("sgd", "adam"):
        raise _fail(f"--optimizer {optimizer!r}: expected sgd or adam")
    if lr < 0 or not 0 <= momentum < 1:
        raise _fail(f"--lr {lr} / --momentum {momentum}: expected a learning rate >= 0 and a momentum in [0, 1)")
    if data is not None and not data.is_dir():
        raise _fail(f"--data {data}: not a folder (a public site folder, or a folder of them, expected)")
    try:
        path = run_pretrain(config, out, data, epochs=epochs, steps=steps, sites=sites, samples_per_site=samples,
                            phantom=phantom, lr=lr, momentum=momentum, optimizer=optimizer)  # type: ignore[arg-type]  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err
    meta = json.loads(path.with_suffix(".json").read_text())["provenance"]
    console.print(f"wrote {plain(path)}: {plain(meta['data'])}; {meta['images']} images, {meta['steps']} steps, "
                  f"final loss {meta['final_train_loss']:.3f}")  # fmt: skip
    console.print(f"start a run from it: --set run.initial-model={plain(path)}")


@privacy_app.command("plan")
def privacy_plan(
    site_size: Annotated[int, typer.Option(help="Privacy units in the site's training split (images, or patients)")],
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (default: the config's run.rounds)")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size (default: the config's train.batch-size)")] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="ε the run may spend at the site (default: the config's)")
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round (default: the config's)")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Local steps per round; 0 uses local epochs")] = None,
    delta: Annotated[float | None, typer.Option(help="δ (default: the config's; 0 means 1/(10 units))")] = None,
    cross_site: Annotated[
        bool | None, typer.Option(help="Local-only models are trained too (doubles the steps; default: the config's)")
    ] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="Take unset values from this run config")] = None,
) -> None:
    """The noise multiplier, ε after each round and a warning when the noise is too large to learn,
    computed exactly as a site computes them before it trains (it logs the same lines)."""
    from medfed.privacy import MAX_COUNT, check_delta, plan_privacy

    try:
        config = load_config(config_file) if config_file else Config()
    except ConfigError as err:
        raise _fail(str(err)) from err
    if not 1 <= site_size <= MAX_COUNT:
        raise _fail(
            f"--site-size {site_size}: expected the number of training units at the site, in [1, {MAX_COUNT:g}]"
        )
    config = _with_options(
        config,
        {
            "--rounds": ("run.rounds", rounds),
            "--batch": ("train.batch-size", batch),
            "--epsilon": ("privacy.target-epsilon", epsilon),
            "--local-epochs": ("train.local-epochs", local_epochs),
            "--local-steps": ("train.local-steps", local_steps),
            "--delta": ("privacy.delta", delta),
            "--cross-site": ("evaluation.cross-site", cross_site),
        },
    )
    settings = {
        "rounds": config.run.rounds,
        "target_epsilon": config.privacy.target_epsilon,
        "local_epochs": config.train.local_epochs,
        "local_steps": config.train.local_steps,
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        "runs_per_round": 2 if config.evaluation.cross_site else 1,
    }
    try:
        check_delta(config.privacy.delta, site_size)
    except ValueError as err:
        raise _fail(f"--delta {delta}: {err}" if delta is not None else str(err)) from err
    try:
        plan = plan_privacy(site_size, config.train.batch_size, **settings)
        lines = plan.lines()  # calibrates σ: an ε that cannot be met is a ValueError
    except ValueError as err:
        raise _fail(str(err)) from err
    for line in lines:
        console.print(plain(line), style="bold red" if line.startswith("WARNING") else None, highlight=False)
    if plan.warnings() and plan.batch_size < site_size:
        table = Table(title="the same run with larger batches")
        for column in ("batch", "σ", "σ/batch", "steps"):
            table.add_column(column)
        for size in sorted({min(plan.batch_size * k, site_size) for k in (2, 4, 8)}):
            other = plan_privacy(site_size, size, **settings)
            table.add_row(
                str(size), f"{other.noise_multiplier:.2f}", f"{other.noise_per_batch:.4f}", str(other.run_steps)
            )
        console.print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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
        raise _fail(f"no benchmark {name!r} in {BENCHMARKS}: expected one of {available}")
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
