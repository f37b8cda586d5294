"""Apply a trained model to new scans, at the site: masks viewers open aligned, or boxes; overlays.

For each input case (a PNG/JPEG, ``.npy``, NIfTI or DICOM file, or a DICOM series folder) a
segmentation model writes, under the output folder:

- ``<case>_seg.nii.gz``: the label map on the input's own grid with the input's affine, so it
  overlays the scan in 3D Slicer and ITK-SNAP;
- ``<case>_seg.dcm``: a DICOM Segmentation (highdicom) referencing the source images, when the
  input is DICOM;
- ``<case>_overlay.png``: the prediction over the image (the slice with most foreground in 3D);
- one row of ``quantification.csv``: structure count and area (mm²) or volume (mL) measured
  with the input's real voxel size; for CT (DICOM Modality CT, or ``data.modality = "CT"``) also
  the density of the predicted foreground, ``hu_mean``, ``hu_std``, ``hu_min``, ``hu_max`` in
  Hounsfield units as stored (after the DICOM rescale slope and intercept, before any windowing),
  and of each class when the model tells several apart (``hu_mean_<class>``, ...); ``n/a`` for
  other modalities and for an empty prediction.

A classification model writes one row of ``predictions.csv`` per case: the probability of each
class and the call, made at the operating threshold stored with the model (binary tasks: the
threshold chosen on the sites' validation splits, ``evaluation.threshold``). A multi-label model
writes per case each finding's probability, its call (1: present) at that finding's threshold
stored with the model (``evaluation.label-thresholds``) and the threshold, the findings called
present (joined by ``|``, or ``none``), and ``<case>_gradcam.png``: the Grad-CAM saliency of each
finding called present (of the most probable one when none is).

An instance segmentation model writes ``<case>_instances.nii.gz`` (one integer per object on the
input's own grid: the three predicted maps are taken back to that grid and split into objects
there), ``<case>_overlay.png``, one row per object of ``objects.csv`` (case, object id, area in
pixels and mm², centroid and bounding box in the input's pixels) and one row per case of
``counts.csv`` (objects and their total area).

A detection model writes ``<case>_overlay.png`` (the boxes over the image; for a volume, over the
axial slice through the best detection) and rows of ``detections.csv``: case, class, score and the
box corners in the input image's own pixels, for every detection scoring at least ``min_score``.
For a volume the corners are voxels (x along its last array axis, z along the first, as in
``boxes.csv``), and each row also gives the box in mm: its centre in world coordinates
(``world_x_mm``, ``world_y_mm``, ``world_z_mm``: RAS+, through the volume's own affine, the DICOM
series' or NIfTI's; LUNA16's LPS is ``(-x, -y, z)``), its side along each volume axis
(``size_x_mm``, ``size_y_mm``, ``size_z_mm``, from the voxel size) and their mean, ``diameter_mm``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from medfed.config import Config
from medfed.data.decode import Geometry, Preprocess, from_model_grid, is_photo, load_image, model_input
from medfed.data.medical_io import Scan, read_channels, write_dicom_seg, write_nifti_mask
from medfed.evaluation.quantify import HU_STATISTICS, density, quantify_case, remove_small_structures, size_unit
from medfed.progress import Steps, tracked
from medfed.tasks import get_task, predict
from medfed.tasks.classification import calls, explain_layer, label_thresholds, operating_threshold
from medfed.training import resolve_device
from medfed.weights import CheckpointError, checkpoint_config, load_checkpoint, load_state

__all__ = [
    "CaseResult",
    "classify_scan",
    "with_site_threshold",
    "detect_scan",
    "find_cases",
    "load_model",
    "Predictions",
    "boxes_in_mm",
    "predict_cases",
    "read_checkpoint_model",
    "instance_scan",
    "segment_scan",
]


@dataclass(frozen=True)
class CaseResult:
    """What was written for one case and what was measured on it: structures (segmentation) or
    detections (detection), and their total size (segmentation; NaN otherwise); for
    classification the class called and its probability."""

    case: str
    outputs: list[Path]
    count: int
    size: float
    unit: str
    call: str = ""
    probability: float = float("nan")
    density: dict[str, float] = field(default_factory=dict)


# The table ``predict_cases`` writes in its output folder, per task.
TABLES = {
    "segmentation": "quantification.csv",
    "instance-segmentation": "objects.csv",
    "classification": "predictions.csv",
    "detection": "detections.csv",
    "tabular": "predictions.csv",
}
CASE_COUNTS = "counts.csv"  # instance segmentation: objects per case, beside objects.csv


class Predictions(NamedTuple):
    """What :func:`predict_cases` did: the model's task, one result per case, the table written."""

    task: str
    cases: list[CaseResult]
    table: Path


def load_model(checkpoint: str | Path, site: str = "") -> tuple[Config, torch.nn.Module]:
    """The config (with the model's operating threshold: ``site``'s own when given) and the model
    stored in a medfed checkpoint; :class:`CheckpointError` naming the file when it is not one."""
    config, model, _ = read_checkpoint_model(checkpoint, site)
    return config, model


def read_checkpoint_model(checkpoint: str | Path, site: str = "") -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    """:func:`load_model` with the checkpoint's metadata (round, metrics, thresholds)."""
    state, meta = load_checkpoint(checkpoint)
    config = with_site_threshold(checkpoint_config(meta, checkpoint), meta, site)
    try:
        model = get_task(config.run.task).build_model(config)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{checkpoint}: its metadata describes no buildable model: {err}") from None
    remedy = f"expected the {Path(checkpoint).with_suffix('.json').name} written with this checkpoint"
    load_state(model, state, checkpoint, "the model its metadata describes", remedy)
    return config, model.eval(), meta


def with_site_threshold(config: Config, meta: dict, site: str) -> Config:
    """``config`` at the operating threshold chosen for ``site`` on its own validation split (kept in
    the checkpoint's ``site_thresholds``); the checkpoint's own threshold when ``site`` is ""."""
    if not site:
        return config
    thresholds = meta.get("site_thresholds") or {}
    if not isinstance(thresholds, dict):
        raise CheckpointError(f"the checkpoint's site_thresholds is a {type(thresholds).__name__}: expected a table")
    if site not in thresholds:
        known = ", ".join(sorted(map(str, thresholds))) or "none (a pooled threshold only)"
        raise ValueError(f"--site {site!r}: the checkpoint has no threshold for that site; it has: {known}")
    try:
        return config.with_overrides({"evaluation.threshold": float(thresholds[site])})
    except (TypeError, ValueError) as err:  # ConfigError is a ValueError
        raise CheckpointError(f"the checkpoint's threshold for site {site!r} is unusable: {err}") from None


def find_cases(path: str | Path) -> list[Path]:
    """The cases under ``path``: the file or series itself, or each file / DICOM series folder in a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if path.is_file() or _is_dicom_folder(path):
        return [path]
    cases = sorted(p for p in path.iterdir() if (p.is_file() and not p.name.startswith(".")) or _is_dicom_folder(p))
    if not cases:
        raise FileNotFoundError(f"--input {path}: no images, volumes or DICOM series folders in it")
    return cases


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" or p.suffix == "" for p in path.iterdir() if p.is_file())


def _model_image(case: Path, scan: Scan, config: Config) -> tuple[np.ndarray, Geometry]:
    """``case`` as the model takes it, ``(data.channels, *spatial)``, and the grid it was resampled
    from: the grey ``scan`` itself, or the case's channels read as training reads them."""
    d = config.data
    try:
        if d.channels == 1:
            image, _, geometry = model_input(
                scan, d.image_size, d.spatial_dims, is_photo(case), preprocess=Preprocess.from_config(d)
            )
        else:
            image, _, geometry = load_image(
                case, d.image_size, d.spatial_dims, preprocess=Preprocess.from_config(d), channels=d.channels
            )
    except ValueError as err:  # e.g. NaN pixels: say which case
        raise ValueError(str(err) if case.name in str(err) else f"{case}: {err}") from None
    return image, geometry


@torch.no_grad()
def segment_scan(case: Path, scan: Scan, config: Config, model: torch.nn.Module) -> np.ndarray:
    """The label map of ``scan`` (read from ``case``) on its own grid (``scan.array.shape``), integer classes."""
    dims = config.data.spatial_dims
    preprocess = Preprocess.from_config(config.data)
    image, geometry = _model_image(case, scan, config)
    device = next(model.parameters()).device
    predicted = predict(get_task(config.run.task), model, torch.as_tensor(image)[None].to(device), config)[0]
    labels = remove_small_structures(predicted.cpu().numpy(), config.evaluation.min_structure_size)
    one_hot = (labels == np.arange(config.data.num_classes).reshape(-1, *[1] * dims)).astype(np.float32)
    back = from_model_grid(one_hot, geometry, preprocess).argmax(axis=0)
    return back.astype(np.int64).reshape(scan.array.shape)


@torch.no_grad()
def instance_scan(case: Path, scan: Scan, config: Config, model: torch.nn.Module) -> np.ndarray:
    """The objects of 2D ``scan`` (read from ``case``) on its own grid: an int64 label image, 0 = background.

    The maps (three class probabilities and the distance map) go back to the input's grid before
    the objects are split, so objects are told apart at the input's resolution; objects smaller than
    ``evaluation.min-structure-size`` model pixels (scaled to the input's pixels) are dropped."""
    from medfed.tasks.instance_segmentation import CLASSES, instance_labels, maps, remove_small_instances

    image, geometry = _model_image(case, scan, config)
    device = next(model.parameters()).device
    task = get_task(config.run.task)
    logits = task.infer(model, torch.as_tensor(image)[None].to(device), config)
    back = from_model_grid(maps(logits)[0].cpu().numpy(), geometry, Preprocess.from_config(config.data))
    back[:CLASSES] /= np.maximum(back[:CLASSES].sum(axis=0, keepdims=True), 1e-6)
    labels = instance_labels(back)
    scale = labels.size / config.data.image_size**2
    labels = remove_small_instances(labels, round(config.evaluation.min_structure_size * scale))
    return labels.reshape(scan.array.shape)


@torch.no_grad()
def classify_scan(case: Path, scan: Scan, config: Config, model: torch.nn.Module) -> np.ndarray:
    """The class probabilities ``(num_classes,)`` of ``scan`` (read from ``case``)."""
    image, _ = _model_image(case, scan, config)
    device = next(model.parameters()).device
    return predict(get_task(config.run.task), model, torch.as_tensor(image)[None].to(device), config)[0].cpu().numpy()


@torch.no_grad()
def detect_scan(case: Path, scan: Scan, config: Config, model: torch.nn.Module) -> np.ndarray:
    """Detections ``(K, 6)``: ``[x1, y1, x2, y2, score, class]`` in the pixels of ``scan`` (read from
    ``case``), best first; for a volume ``(K, 8)``: ``[x1, y1, z1, x2, y2, z2, score, class]`` in its voxels."""
    return _detect(case, scan, config, model)[0]


def _detect(case: Path, scan: Scan, config: Config, model: torch.nn.Module) -> tuple[np.ndarray, Geometry]:
    """:func:`detect_scan` and the grid the boxes are on."""
    image, geometry = _model_image(case, scan, config)
    device = next(model.parameters()).device
    boxes = predict(get_task("detection"), model, torch.as_tensor(image)[None].to(device), config)[0].cpu().numpy()
    boxes = boxes[boxes[:, -1] >= 0].astype(np.float64)
    sizes = list(reversed(geometry.shape))  # along x, y (z)
    dims = len(sizes)
    for j, n in enumerate(sizes):
        boxes[:, [j, dims + j]] *= n / config.data.image_size
    return boxes, geometry


def boxes_in_mm(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """3D boxes ``(K, >= 6)`` in voxels of ``geometry`` (x along its last array axis, voxel i spanning
    [i, i + 1)) in mm: ``(K, 7)`` world centre x, y, z (RAS+, through its affine), side along each
    volume axis (x, y, z) and their mean (the diameter)."""
    low, high = boxes[:, :3], boxes[:, 3:6]
    centre_index = ((low + high) / 2 - 0.5)[:, ::-1]  # voxel-centre indices in array-axis order (z, y, x)
    affine = np.asarray(geometry.affine, dtype=np.float64)
    world = centre_index @ affine[:3, :3].T + affine[:3, 3]
    sides = (high - low) * np.asarray(geometry.spacing, dtype=np.float64)[::-1]  # x, y, z
    return np.concatenate([world, sides, sides.mean(axis=1, keepdims=True)], axis=1)


def predict_cases(
    checkpoint: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    min_score: float = 0.3,
    site: str = "",
    progress: Steps | None = None,
    site_data: str | Path | None = None,
) -> Predictions:
    """Apply the model to every case under ``input_path``: masks, overlays and ``quantification.csv``
    (segmentation), overlays and ``detections.csv`` with boxes scoring at least ``min_score``
    (detection), or ``predictions.csv`` with the call at the operating threshold (classification).
    ``progress`` counts the cases read, then the cases done. A tabular model takes a CSV of patients
    instead (:func:`predict_rows`, with the site folder ``site_data``)."""
    config, model = load_model(checkpoint, site)
    if config.run.task == "tabular":
        return predict_rows(config, model, Path(input_path), site_data, Path(out_dir))
    model.to(resolve_device(config.train.device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = find_cases(input_path)
    if progress is not None:
        progress.update(0, "reading cases", total=len(cases))
    scans = []
    for case in tracked(cases, progress):
        # the first channel stands for the case (grid, overlay); the model gets all of them
        scan = read_channels(case, config.data.channels, config.data.spatial_dims)[0]
        if scan.array.squeeze().ndim != config.data.spatial_dims:
            what = "volumes" if config.data.spatial_dims == 3 else "images"
            raise ValueError(
                f"{case}: a {scan.array.squeeze().ndim}D input, but the model takes {config.data.spatial_dims}D {what}"
            )
        scans.append((case, scan))
    task, table = config.run.task, out_dir / TABLES[config.run.task]
    if progress is not None:
        progress.update(0, "predicting")
    todo = tracked(scans, progress)
    if task == "detection":
        return Predictions(task, _detect_cases(todo, config, model, table, min_score), table)
    if task == "classification":
        return Predictions(task, _classify_cases(todo, config, model, table), table)
    if task == "instance-segmentation":
        return Predictions(task, _instance_cases(todo, config, model, table), table)
    return Predictions(task, _segment_cases(todo, config, model, table), table)


def predict_rows(
    config: Config, model: torch.nn.Module, patients: Path, site_data: str | Path | None, out_dir: Path
) -> Predictions:
    """Tabular: ``predictions.csv`` in ``out_dir`` with, per row of the CSV ``patients`` (the model's
    ``data.features`` columns; empty or ``?`` cells missing), the class probabilities and the call at
    the operating threshold. The rows are imputed and standardised as the site's own data were in
    training: fitted on the train split of its site folder ``site_data``, required."""
    from medfed.data.manifest import read_table
    from medfed.data.tabular import feature_rows, fit_preprocessor
    from medfed.data.vocabulary import MANIFEST, DataError

    features = config.data.features
    if site_data is None:
        raise ValueError(
            "a tabular model takes features on the site's own scale: give --site-data, the site folder whose "
            "train split fits the imputer and standardiser (as in training)"
        )
    site_dir = Path(site_data)
    if not (site_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"--site-data {site_dir}: no {MANIFEST} in it (a tabular site folder expected)")
    tables = {}
    for what, path in (("site", site_dir / MANIFEST), ("patients", patients)):
        if not path.is_file():
            raise FileNotFoundError(f"--input {path}: not a file (a CSV of patients expected)")
        columns, rows = read_table(path)
        missing = [name for name in (*features, *(("split",) if what == "site" else ())) if name not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the model takes {list(features)}")
        tables[what] = rows
    train = [row for row in tables["site"] if row["split"] == "train"]
    if not train:
        raise ValueError(f"--site-data {site_dir}: no train rows to fit the imputer and standardiser on")
    fitted, problems = feature_rows(train, features)
    values, bad = feature_rows(tables["patients"], features, where=patients.name)
    if problems or bad:
        raise DataError(patients.parent, problems + bad)
    rows = fit_preprocessor(fitted).transform(values).astype(np.float32)
    with torch.no_grad():
        probs = predict(get_task("tabular"), model.eval(), torch.as_tensor(rows).reshape(len(rows), 1, 1, -1), config)
    names = config.data.class_names or tuple(f"class {k}" for k in range(config.data.num_classes))
    threshold = operating_threshold(config)
    called = calls(probs.numpy(), config.data.num_classes, threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / TABLES["tabular"]
    results = []
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "call", *(f"p_{name.replace(' ', '_')}" for name in names), "threshold"])
        for index, (p, call) in enumerate(zip(probs.tolist(), called, strict=True), start=1):
            writer.writerow([index, names[call], *(f"{v:.4f}" for v in p), f"{threshold:.4f}"])
            results.append(CaseResult(f"row {index}", [table], 1, float("nan"), "cases", names[call], p[call]))
    return Predictions("tabular", results, table)


def _segment_cases(
    scans: Iterable[tuple[Path, Scan]], config: Config, model: torch.nn.Module, table: Path
) -> list[CaseResult]:
    """Per case a mask (NIfTI; DICOM-SEG for DICOM input) and an overlay beside ``table``; the
    structures' count and size in ``table``."""
    out_dir = table.parent
    names = {k: f"class {k}" for k in range(1, config.data.num_classes)}
    preprocess = Preprocess.from_config(config.data)
    results = []
    for case, scan in scans:
        mask = segment_scan(case, scan, config, model)
        outputs = [write_nifti_mask(mask, scan, out_dir / f"{scan.name}_seg.nii.gz")]
        if scan.dicom is not None:
            outputs.append(write_dicom_seg(mask, scan, out_dir / f"{scan.name}_seg.dcm", names, algorithm="medfed"))
        outputs.append(_overlay(scan, mask, out_dir / f"{scan.name}_overlay.png"))
        squeezed = [s for s, n in zip(scan.spacing, scan.array.shape, strict=True) if n > 1]
        measured = quantify_case(mask.squeeze(), None, squeezed)
        unit = size_unit(config.data.spatial_dims)
        hu = foreground_density(mask, scan, config) if preprocess.is_ct(scan) and not is_photo(case) else {}
        results.append(CaseResult(scan.name, outputs, int(measured["count"]), measured["size"], unit, density=hu))
    _write_table(table, results, density_columns(config))
    return results


def density_columns(config: Config) -> list[str]:
    """The density columns of ``quantification.csv``: :data:`HU_STATISTICS` of the foreground, then
    of each class when the model tells several apart (``hu_mean_<class name>``, ...)."""
    classes = _class_labels(config)
    return [*HU_STATISTICS, *(f"{stat}_{name}" for name in classes.values() for stat in HU_STATISTICS)]


def _class_labels(config: Config) -> dict[int, str]:
    """Column suffixes of the foreground classes, when there are several: class names (spaces as
    ``_``) or ``class_k``."""
    if config.data.num_classes <= 2:
        return {}
    named = config.data.class_names
    return {k: (named[k] if named else f"class {k}").replace(" ", "_") for k in range(1, config.data.num_classes)}


def foreground_density(mask: np.ndarray, scan: Scan, config: Config) -> dict[str, float]:
    """Hounsfield-unit statistics of ``scan`` (its values as read: DICOM after rescale slope and
    intercept, NIfTI as stored) inside the predicted foreground of ``mask`` (on the scan's grid),
    and inside each class when there are several; keyed by :func:`density_columns`."""
    values = scan.array.reshape(mask.shape)
    out = density(values, mask > 0)
    for k, name in _class_labels(config).items():
        out.update({f"{stat}_{name}": v for stat, v in density(values, mask == k).items()})
    return out


def _instance_cases(
    scans: Iterable[tuple[Path, Scan]], config: Config, model: torch.nn.Module, table: Path
) -> list[CaseResult]:
    """Per case an instance label image (NIfTI) and an overlay beside ``table``; every object in
    ``table`` and the count per case in :data:`CASE_COUNTS`."""
    from scipy import ndimage

    out_dir = table.parent
    results, rows = [], []
    for case, scan in scans:
        labels = instance_scan(case, scan, config, model)
        outputs = [write_nifti_mask(labels, scan, out_dir / f"{scan.name}_instances.nii.gz")]
        outputs.append(_overlay(scan, labels, out_dir / f"{scan.name}_overlay.png"))
        flat = labels.squeeze()
        pixel_mm2 = float(np.prod([s for s, n in zip(scan.spacing, scan.array.shape, strict=True) if n > 1]))
        count = int(flat.max(initial=0))
        areas = np.bincount(flat.ravel(), minlength=count + 1)
        centroids = ndimage.center_of_mass(np.ones_like(flat), flat, range(1, count + 1)) if count else []
        for k, (box, centre) in enumerate(zip(ndimage.find_objects(flat), centroids, strict=True), start=1):
            assert box is not None  # ids are consecutive: every object has a box
            ys, xs = box
            rows.append([scan.name, k, int(areas[k]), f"{areas[k] * pixel_mm2:.4f}", f"{centre[0]:.1f}",
                         f"{centre[1]:.1f}", ys.start, xs.start, ys.stop, xs.stop])  # fmt: skip
        size = float(areas[1:].sum()) * pixel_mm2
        results.append(CaseResult(scan.name, outputs, count, size, "mm2"))
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "object", "area_px", "area_mm2", "centroid_y", "centroid_x",
                         "ymin", "xmin", "ymax", "xmax"])  # fmt: skip
        writer.writerows(rows)
    _write_table(table.parent / CASE_COUNTS, results, [], ("case", "objects", "area", "unit", "instances"))
    return results


def _classify_cases(
    scans: Iterable[tuple[Path, Scan]], config: Config, model: torch.nn.Module, table: Path
) -> list[CaseResult]:
    """``table``: per case the class probabilities and the call at the model's threshold."""
    if config.data.multi_label:
        return _classify_multilabel_cases(scans, config, model, table)
    names = config.data.class_names or tuple(f"class {k}" for k in range(config.data.num_classes))
    binary = config.data.num_classes == 2
    threshold = operating_threshold(config)
    results, rows = [], []
    for case, scan in scans:
        probs = classify_scan(case, scan, config, model)
        call = int(calls(probs[None], config.data.num_classes, threshold)[0])
        rows.append([scan.name, names[call], *(f"{p:.4f}" for p in probs), f"{threshold:.4f}" if binary else ""])
        results.append(CaseResult(scan.name, [table], 1, float("nan"), "cases", names[call], float(probs[call])))
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "call", *(f"p_{name.replace(' ', '_')}" for name in names), "threshold"])
        writer.writerows(rows)
    return results


def _classify_multilabel_cases(
    scans: Iterable[tuple[Path, Scan]], config: Config, model: torch.nn.Module, table: Path
) -> list[CaseResult]:
    """``table``: per case each finding's probability, call and threshold; a Grad-CAM figure beside it."""
    import matplotlib.pyplot as plt

    from medfed.evaluation.explain import label_saliency_figure

    names = config.data.class_names or tuple(f"class {k}" for k in range(config.data.num_classes))
    columns = [name.replace(" ", "_") for name in names]
    thresholds = label_thresholds(config)
    results, rows = [], []
    device = next(model.parameters()).device
    for case, scan in scans:
        image, _ = _model_image(case, scan, config)
        batch = torch.as_tensor(image)[None].to(device)
        probs = predict(get_task("classification"), model, batch, config)[0].cpu().numpy()
        called = probs >= thresholds
        findings = "|".join(names[k] for k in np.flatnonzero(called)) or "none"
        shown = [(int(k), names[k], float(probs[k])) for k in np.flatnonzero(called)] or [
            (int(probs.argmax()), names[int(probs.argmax())], float(probs.max()))
        ]
        with torch.enable_grad():
            fig = label_saliency_figure(model, explain_layer(config), batch, shown, f"{scan.name}: {findings}")
        figure = table.parent / f"{scan.name}_gradcam.png"
        fig.savefig(figure, dpi=120)
        plt.close(fig)
        rows.append([scan.name, findings, *(f"{p:.4f}" for p in probs), *(str(int(c)) for c in called),
                     *(f"{t:.4f}" for t in thresholds)])  # fmt: skip
        top = int(probs.argmax())
        results.append(CaseResult(scan.name, [table, figure], int(called.sum()), float("nan"), "findings",
                                  findings, float(probs[top])))  # fmt: skip
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "findings", *(f"p_{c}" for c in columns), *(f"call_{c}" for c in columns),
                         *(f"threshold_{c}" for c in columns)])  # fmt: skip
        writer.writerows(rows)
    return results


def _detect_cases(
    scans: Iterable[tuple[Path, Scan]], config: Config, model: torch.nn.Module, table: Path, min_score: float
) -> list[CaseResult]:
    """Per case an overlay beside ``table``; every box scoring at least ``min_score`` in ``table``."""
    import matplotlib.pyplot as plt

    from medfed.evaluation.explain import boxes_figure

    names = config.data.class_names
    volumes = config.data.spatial_dims == 3
    results, rows = [], []
    for case, scan in scans:
        boxes, geometry = _detect(case, scan, config, model)
        boxes = boxes[boxes[:, -2] >= min_score]
        gray = scan.array.squeeze().astype(np.float32)
        if volumes:  # the axial slice through the best detection, and the boxes that cross it
            z = int(np.clip((boxes[0, 2] + boxes[0, 5]) / 2, 0, len(gray) - 1)) if len(boxes) else len(gray) // 2
            crossing = boxes[(boxes[:, 2] <= z + 0.5) & (boxes[:, 5] >= z + 0.5)]
            fig = boxes_figure(_display_levels(gray[z]), crossing[:, [0, 1, 3, 4, 6, 7]], None, names, min_score)
        else:
            fig = boxes_figure(_display_levels(gray), boxes, None, names, min_score)
        overlay = table.parent / f"{scan.name}_overlay.png"
        fig.savefig(overlay, dpi=120)
        plt.close(fig)
        mm = boxes_in_mm(boxes, geometry) if volumes else np.zeros((len(boxes), 0))
        for box, in_mm in zip(boxes, mm, strict=True):
            cls = int(box[-1])
            label = names[cls] if cls < len(names) else str(cls)
            rows.append([scan.name, label, f"{box[-2]:.4f}", *(f"{v:.1f}" for v in (*box[:-2], *in_mm))])
        results.append(CaseResult(scan.name, [overlay], len(boxes), float("nan"), "boxes"))
    corners = ["xmin", "ymin", "zmin", "xmax", "ymax", "zmax"] if volumes else ["xmin", "ymin", "xmax", "ymax"]
    in_mm = [*(f"world_{a}_mm" for a in "xyz"), *(f"size_{a}_mm" for a in "xyz"), "diameter_mm"] if volumes else []
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "class", "score", *corners, *in_mm])
        writer.writerows(rows)
    return results


def _display_levels(gray: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] for a figure: the 0.5-99.5 percentile range of the image."""
    low, high = np.percentile(gray, [0.5, 99.5])
    return np.clip((gray - low) / max(high - low, 1e-6), 0, 1)


def _overlay(scan: Scan, mask: np.ndarray, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from medfed.evaluation.explain import busiest_slice, mask_overlay_figure

    gray, labels = scan.array.squeeze().astype(np.float32), mask.reshape(scan.array.squeeze().shape) > 0
    title = scan.name.replace("$", r"\$")  # a file name is text, not matplotlib mathtext
    if gray.ndim == 3:
        z = busiest_slice(labels)
        gray, labels, title = gray[z], labels[z], f"{title} slice {z}"
    fig = mask_overlay_figure(_display_levels(gray), labels, None, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_table(
    path: Path,
    results: list[CaseResult],
    densities: list[str],
    header: tuple[str, ...] = ("case", "structures", "size", "unit", "mask"),
) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, *densities])
        for r in results:
            hu = [_shown_density(r.density.get(column, float("nan"))) for column in densities]
            writer.writerow([r.case, r.count, f"{r.size:.4f}", r.unit, r.outputs[0].name, *hu])


def _shown_density(value: float) -> str:
    """A density cell: Hounsfield units to 0.01, or ``n/a`` (not CT, or nothing predicted)."""
    return f"{value:.2f}" if np.isfinite(value) else "n/a"
