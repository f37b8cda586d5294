"""``medfed data``: check a site folder, import a known layout as one, write synthetic sites."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

from medfed.cli.common import console, fail, literal, with_options
from medfed.cli.render import split_class_table
from medfed.config import Config, ConfigError, load_config
from medfed.display import plain
from medfed.progress import steps

if TYPE_CHECKING:
    from medfed.data.decode import Preprocess

__all__ = ["app", "check", "import_layout", "synth"]

app = typer.Typer(
    no_args_is_help=True, help="Site data: check a site folder, import image/mask folders, write synthetic sites."
)


@app.command("check")
def check(
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
    preprocess: Preprocess | None = None  # None: the default
    multi_label: bool = False  # several findings per image (data.multi-label, from --config only)
    features: tuple[str, ...] = ()  # tabular: the feature columns (none: all but label, split, patient_id)

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
        with_options(
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
        raise fail(str(err)) from err
    d = config.data
    return _CheckSettings(
        config.run.task,
        d.num_classes,
        d.image_size,
        d.spatial_dims,
        d.channels,
        d.class_names,
        Preprocess.from_config(d),
        d.multi_label,
        d.features,
    )


def _preflight_report(site_dir: Path, settings: _CheckSettings) -> bool:
    """Run the pre-flight check on ``site_dir`` and print it: warnings, then every error (False) or
    the data card and the samples per split and class (True)."""
    from medfed.data import SPLITS
    from medfed.data.card import data_card
    from medfed.data.decode import DEFAULT_PREPROCESS
    from medfed.data.label_map import LABEL_MAP
    from medfed.data.manifest import SiteReading
    from medfed.data.preflight import run_preflight
    from medfed.tasks import TASKS, get_task

    if settings.task not in TASKS:
        raise fail(f"--task {settings.task!r}: expected one of {sorted(TASKS)}")
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
        settings.multi_label,
        settings.features or (_manifest_features(site_dir) if settings.task == "tabular" else ()),
    )
    with steps(console, "pre-flight check: reading every file"):
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
    if result.label_map is None:
        console.print("label map: none (the site labels every class, as class indices)")
    else:
        console.print(f"label map ({LABEL_MAP}), site value -> class:")
        for line in result.label_map.lines(names):
            console.print(f"  {plain(line)}")
    console.print(split_class_table(site, num_classes, names, SPLITS))
    return True


@app.command("import")
def import_layout(
    src: Annotated[
        Path,
        typer.Argument(
            help="What to import: a MedMNIST .npz, a VOC folder, a COCO .json, an images+masks folder, a DICOM "
            "export, the UCI heart files' folder"
        ),
    ],
    from_: Annotated[
        str, typer.Option("--from", help="Layout of SRC: medmnist, voc, coco, image-mask, nifti, dicom, heart-uci")
    ],
    out: Annotated[
        Path,
        typer.Option(help="Site folder to create (new or empty): files + manifest.csv (heart-uci: one per hospital)"),
    ],
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
        with steps(console, f"importing {src.name or src} ({from_})"):
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
        console.print(f"[yellow]note:[/] {literal(note)}", emoji=False)
    folder = imported.folder
    if imported.task == "tabular":  # a folder of site folders, one per hospital
        settings = settings._replace(task="tabular", spatial_dims=2, channels=1)
        failed = [site for site in sorted(folder.iterdir()) if not _preflight_report(site, settings)]
        if failed:
            console.print(
                f"[bold red]{len(failed)} site folder(s) fail the pre-flight check[/]: a run would refuse them"
            )
            raise typer.Exit(code=1)
        console.print(f"wrote {len(list(folder.iterdir()))} site folders in {plain(folder)} (data.source = 'sites')")
        return
    settings = settings._replace(task=imported.task, spatial_dims=settings.spatial_dims or _spatial_dims(folder))
    if imported.task == "detection" and not settings.class_names:
        _, rows = read_table(folder / BOXES)
        settings = settings._replace(class_names=tuple(sorted({row["label"] for row in rows})))
        found = literal(str(list(settings.class_names)))
        console.print(f"class names found (checked in this order; set data.class-names): {found}", emoji=False)
    console.print(f"wrote {literal(str(folder / 'manifest.csv'))}; its pre-flight check:", emoji=False)
    check = settings.command(folder, config_file)
    if not _preflight_report(folder, settings):
        console.print(
            f"[bold red]{plain(folder)} was written but fails the pre-flight check[/]: a run would refuse it. "
            f"Fix the files or the settings above (--config, --num-classes, --channels, ...), then: {plain(check)}"
        )
        raise typer.Exit(code=1)
    console.print(f"check it again after any change with: {plain(check)}")


def _manifest_features(site_dir: Path) -> tuple[str, ...]:
    """A features manifest's feature columns: all but ``label``, ``split`` and ``patient_id``."""
    from medfed.data.manifest import read_table
    from medfed.data.vocabulary import MANIFEST

    if not (site_dir / MANIFEST).is_file():
        return ()
    columns, _ = read_table(site_dir / MANIFEST)
    return tuple(c for c in columns if c not in ("label", "split", "patient_id", "image"))


def _import_error(message: str, code: int) -> typer.Exit:
    """Print an import error literally; exit ``code`` (2: a setting is wrong, 1: the input data is)."""
    console.print(f"[bold red]error:[/] {literal(message)}", emoji=False)
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


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="Folder to create one site folder per synthetic hospital in")],
    task: Annotated[
        str,
        typer.Option(
            help="classification (labels), segmentation (masks), instance-segmentation (instance label images) "
            "or detection (boxes)"
        ),
    ] = "classification",
    sites: int = 3,
    samples: int = 200,
    image_size: int = 28,
    num_classes: int = 2,
    spatial_dims: Annotated[int, typer.Option(help="2: images (PNG), 3: volumes (NIfTI)")] = 2,
    channels: Annotated[int, typer.Option(help="Image channels: contrasts of one phantom, as scans of a case")] = 1,
    seed: int = 0,
    unlabelled: Annotated[
        list[str] | None,
        typer.Option(
            help="SITE:CLASS: hospital SITE (1, 2, ...) does not label class CLASS (repeatable); it gets a "
            "label-map.toml naming the classes it labels"
        ),
    ] = None,
) -> None:
    """Write synthetic hospitals (scanner shift, prevalence, voxel size) as site folders."""
    from medfed.data import write_site
    from medfed.data.synthetic import drop_classes, with_channels
    from medfed.tasks import TASKS, get_task

    if task not in TASKS:
        raise fail(f"--task {task!r}: expected one of {sorted(TASKS)}")
    dropped = _unlabelled_classes(unlabelled or [], sites, num_classes, task)
    plugin = get_task(task)
    if spatial_dims not in plugin.SPATIAL_DIMS:
        dims, options = " or ".join(f"{n}D" for n in plugin.SPATIAL_DIMS), " or ".join(map(str, plugin.SPATIAL_DIMS))
        raise fail(f"--task {task} makes {dims} images only (--spatial-dims {options})")
    for index in range(sites):
        site = plugin.synthetic_site(index, samples, image_size, num_classes, seed, spatial_dims=spatial_dims)
        if dropped.get(index + 1):
            site = drop_classes(site, dropped[index + 1], num_classes)
        console.print(f"wrote {plain(write_site(out / f'hospital-{index + 1}', with_channels(site, channels)))}")


def _unlabelled_classes(entries: list[str], sites: int, num_classes: int, task: str) -> dict[int, set[int]]:
    """``--unlabelled SITE:CLASS`` entries as the classes each hospital leaves unlabelled; exit code 2
    naming the entry unless SITE is a hospital, CLASS a class it can leave (not background), and
    each hospital keeps two classes."""
    first = 1 if task == "segmentation" else 0
    dropped: dict[int, set[int]] = {}
    for entry in entries:
        site, _, cls = entry.partition(":")
        if task == "detection" or not (site.isdigit() and cls.isdigit()):
            raise fail(f"--unlabelled {entry!r}: expected SITE:CLASS for classification or segmentation, e.g. 3:1")
        if not (1 <= int(site) <= sites and first <= int(cls) < num_classes):
            raise fail(
                f"--unlabelled {entry!r}: expected a hospital in 1..{sites} and a class in {first}..{num_classes - 1}"
            )
        dropped.setdefault(int(site), set()).add(int(cls))
    for hospital, classes in dropped.items():
        if num_classes - len(classes) < 2:
            raise fail(f"--unlabelled: hospital {hospital} would label fewer than 2 classes")
    return dropped
