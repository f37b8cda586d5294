"""``medfed evaluate`` and ``medfed predict``: a model scored on, or applied to, a site's own data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.cli.common import console, fail
from medfed.cli.render import metrics_table, predictions_table
from medfed.config import ConfigError
from medfed.display import plain
from medfed.progress import steps

__all__ = ["evaluate", "predict"]


SITE_MODEL_HELP = (
    "Instead of --model: this site's personal model (run.personalization), its state folder (the newest "
    "personal model kept there) or the checkpoint file"
)


def _chosen_model(model: Path | None, site_model: Path | None) -> Path:
    """The checkpoint ``--model`` or ``--site-model`` names (exactly one of them)."""
    from medfed.personalization import latest_personal_model

    if (model is None) == (site_model is None):
        raise fail("give one of --model (a checkpoint, e.g. the global model) or --site-model (a personal model)")
    if site_model is None:
        assert model is not None
        return model
    try:
        chosen = latest_personal_model(site_model)
    except OSError as err:
        raise fail(str(err)) from err
    console.print(f"personal model: {plain(chosen)}")
    return chosen


def evaluate(
    data: Annotated[Path, typer.Option(help="This site's data folder (manifest.csv + images)")],
    model: Annotated[
        Path | None, typer.Option(help="Global model checkpoint (.safetensors with its .json beside it)")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate: train, val, test or all")] = "test",
    out: Annotated[
        Path | None,
        typer.Option(help="Write metrics.json, per-case quantification and example images here (stays at the site)"),
    ] = None,
    site: Annotated[
        str, typer.Option(help="This site's name in the run: score at the threshold chosen on its own validation split")
    ] = "",
    site_model: Annotated[Path | None, typer.Option(help=SITE_MODEL_HELP)] = None,
) -> None:
    """Evaluate a global or personal model on this site's own data (nothing leaves the machine)."""
    import json

    from medfed.data import ArrayDataset, DataError, read_site
    from medfed.data.manifest import SiteReading
    from medfed.evaluation.explain import example_images
    from medfed.evaluation.report import json_safe
    from medfed.predict import read_checkpoint_model
    from medfed.tasks import get_task
    from medfed.training import evaluate as evaluate_model
    from medfed.training import resolve_device

    model = _chosen_model(model, site_model)
    try:
        config, net, meta = read_checkpoint_model(model, site)
        task = get_task(config.run.task)
        site_data = read_site(data, SiteReading.from_config(config.data, task.TARGET))
    except (FileNotFoundError, DataError, ConfigError, KeyError, ValueError) as err:
        raise fail(str(err)) from err
    if split == "all":
        dataset = ArrayDataset(site_data.images, site_data.targets, site_data.target_key, site_data.spacing)
    elif split in ("train", "val", "test"):
        dataset = site_data.split(split)
    else:
        raise fail(f"--split {split!r}: expected train, val, test or all")
    if len(dataset) == 0:
        raise fail(f"{data}: no samples in the {split} split")
    device = resolve_device("auto")
    cases: list[dict[str, float]] = []
    with steps(console, f"evaluating on {len(dataset)} cases"):
        results = evaluate_model(task, net.to(device), dataset, config, device, cases)
    title = f"{model.name} (round {meta.get('round')}) on {data.name} [{split}], n={len(dataset)}"
    console.print(metrics_table(title, results))
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


def predict(
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
    site_data: Annotated[
        Path | None,
        typer.Option(help="Tabular (--input: a CSV of patients): the site folder whose train split fits the imputer"),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="A medfed checkpoint (.safetensors with its .json beside it), e.g. the global model"),
    ] = None,
    site_model: Annotated[Path | None, typer.Option(help=SITE_MODEL_HELP)] = None,
) -> None:
    """Apply a model to new scans at this site: masks aligned with the input, structure count and size;
    boxes in the input's pixels (detection); or class probabilities and the call at the model's
    operating threshold (classification; tabular: per row of a CSV of patients)."""
    from medfed.predict import predict_cases

    model = _chosen_model(model, site_model)
    try:
        with steps(console, "loading the model") as progress:
            predictions = predict_cases(model, input, out, min_score, site, progress, site_data)
    except (OSError, ValueError, KeyError) as err:  # OSError: an unwritable --out, a missing file
        raise fail(str(err)) from err
    console.print(predictions_table(f"{plain(model.name)} on {plain(input)}", predictions))
    console.print(f"table: {plain(predictions.table)}")
