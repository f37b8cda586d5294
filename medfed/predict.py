"""Apply a trained model to new scans, at the site: masks viewers open aligned, or boxes; overlays.

For each input case (a PNG/JPEG, ``.npy``, NIfTI or DICOM file, or a DICOM series folder) a
segmentation model writes, under the output folder:

- ``<case>_seg.nii.gz``: the label map on the input's own grid with the input's affine, so it
  overlays the scan in 3D Slicer and ITK-SNAP;
- ``<case>_seg.dcm``: a DICOM Segmentation (highdicom) referencing the source images, when the
  input is DICOM;
- ``<case>_overlay.png``: the prediction over the image (the slice with most foreground in 3D);
- one row of ``quantification.csv``: structure count and area (mm²) or volume (mL) measured
  with the input's real voxel size.

A detection model writes ``<case>_overlay.png`` (the boxes over the image) and rows of
``detections.csv``: case, class, score and the box corners in the input image's own pixels, for
every detection scoring at least ``min_score``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.config import Config
from medfed.data.manifest import from_model_grid, is_photo, model_input
from medfed.data.medical_io import Scan, read_scan, write_dicom_seg, write_nifti_mask
from medfed.evaluation.quantify import quantify_case, size_unit
from medfed.tasks import get_task, predict
from medfed.training import resolve_device
from medfed.weights import load_checkpoint

__all__ = ["CaseResult", "detect_scan", "find_cases", "load_model", "predict_cases", "segment_scan"]

APPLICABLE_TASKS = ("segmentation", "detection")


@dataclass(frozen=True)
class CaseResult:
    """What was written for one case and what was measured on it: structures (segmentation) or
    detections (detection), and their total size (segmentation; NaN for detection)."""

    case: str
    outputs: list[Path]
    count: int
    size: float
    unit: str


def load_model(checkpoint: str | Path) -> tuple[Config, torch.nn.Module]:
    """The config and model stored in a medfed checkpoint; a segmentation or detection model."""
    state, meta = load_checkpoint(checkpoint)
    config = Config.from_dict(meta["config"], source=f"{checkpoint} metadata")
    if config.run.task not in APPLICABLE_TASKS:
        raise ValueError(
            f"{checkpoint} holds a {config.run.task} model; medfed predict applies {' or '.join(APPLICABLE_TASKS)} "
            "models (use medfed evaluate for classification)"
        )
    model = get_task(config.run.task).build_model(config)
    model.load_state_dict(state)
    return config, model.eval()


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


@torch.no_grad()
def segment_scan(scan: Scan, config: Config, model: torch.nn.Module, photo: bool) -> np.ndarray:
    """The label map of ``scan`` on its own grid (``scan.array.shape``), integer classes."""
    dims = config.data.spatial_dims
    preprocess = config.data.preprocess
    image, _, geometry = model_input(scan, config.data.image_size, dims, photo, preprocess=preprocess)
    device = next(model.parameters()).device
    labels = predict(get_task(config.run.task), model, torch.as_tensor(image)[None].to(device), config)[0]
    one_hot = (labels.cpu().numpy() == np.arange(config.data.num_classes).reshape(-1, *[1] * dims)).astype(np.float32)
    back = from_model_grid(one_hot, geometry, preprocess).argmax(axis=0)
    return back.astype(np.int64).reshape(scan.array.shape)


@torch.no_grad()
def detect_scan(scan: Scan, config: Config, model: torch.nn.Module, photo: bool) -> np.ndarray:
    """Detections ``(K, 6)``: ``[x1, y1, x2, y2, score, class]`` in the pixels of ``scan``, best first."""
    image, _, geometry = model_input(scan, config.data.image_size, 2, photo, preprocess=config.data.preprocess)
    device = next(model.parameters()).device
    boxes = predict(get_task("detection"), model, torch.as_tensor(image)[None].to(device), config)[0].cpu().numpy()
    boxes = boxes[boxes[:, 5] >= 0].astype(np.float64)
    height, width = geometry.shape
    boxes[:, [0, 2]] *= width / config.data.image_size
    boxes[:, [1, 3]] *= height / config.data.image_size
    return boxes


def predict_cases(
    checkpoint: str | Path, input_path: str | Path, out_dir: str | Path, min_score: float = 0.3
) -> list[CaseResult]:
    """Apply the model to every case under ``input_path``: masks, overlays and ``quantification.csv``
    (segmentation), or overlays and ``detections.csv`` with boxes scoring at least ``min_score`` (detection)."""
    config, model = load_model(checkpoint)
    model.to(resolve_device(config.train.device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = find_cases(input_path)
    scans = []
    for case in cases:
        scan = read_scan(case)
        if scan.array.squeeze().ndim != config.data.spatial_dims:
            what = "volumes" if config.data.spatial_dims == 3 else "images"
            raise ValueError(
                f"{case}: a {scan.array.squeeze().ndim}D input, but the model takes {config.data.spatial_dims}D {what}"
            )
        scans.append((case, scan))
    if config.run.task == "detection":
        return _detect_cases(scans, config, model, out_dir, min_score)
    names = {k: f"class {k}" for k in range(1, config.data.num_classes)}
    results = []
    for case, scan in scans:
        mask = segment_scan(scan, config, model, is_photo(case))
        outputs = [write_nifti_mask(mask, scan, out_dir / f"{scan.name}_seg.nii.gz")]
        if scan.dicom is not None:
            outputs.append(write_dicom_seg(mask, scan, out_dir / f"{scan.name}_seg.dcm", names, algorithm="medfed"))
        outputs.append(_overlay(scan, mask, out_dir / f"{scan.name}_overlay.png"))
        squeezed = [s for s, n in zip(scan.spacing, scan.array.shape, strict=True) if n > 1]
        measured = quantify_case(mask.squeeze(), None, squeezed)
        unit = size_unit(config.data.spatial_dims)
        results.append(CaseResult(scan.name, outputs, int(measured["count"]), measured["size"], unit))
    _write_table(out_dir / "quantification.csv", results)
    return results


def _detect_cases(
    scans: list[tuple[Path, Scan]], config: Config, model: torch.nn.Module, out_dir: Path, min_score: float
) -> list[CaseResult]:
    import matplotlib.pyplot as plt

    from medfed.evaluation.explain import boxes_figure

    names = config.data.class_names
    results, rows = [], []
    for case, scan in scans:
        boxes = detect_scan(scan, config, model, is_photo(case))
        boxes = boxes[boxes[:, 4] >= min_score]
        gray = scan.array.squeeze().astype(np.float32)
        fig = boxes_figure(_display_levels(gray), boxes, None, names, min_score)
        overlay = out_dir / f"{scan.name}_overlay.png"
        fig.savefig(overlay, dpi=120)
        plt.close(fig)
        for x1, y1, x2, y2, score, cls in boxes:
            label = names[int(cls)] if int(cls) < len(names) else str(int(cls))
            rows.append([scan.name, label, f"{score:.4f}", *(f"{v:.1f}" for v in (x1, y1, x2, y2))])
        results.append(CaseResult(scan.name, [overlay], len(boxes), float("nan"), "boxes"))
    with (out_dir / "detections.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "class", "score", "xmin", "ymin", "xmax", "ymax"])
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
    title = scan.name
    if gray.ndim == 3:
        z = busiest_slice(labels)
        gray, labels, title = gray[z], labels[z], f"{scan.name} slice {z}"
    fig = mask_overlay_figure(_display_levels(gray), labels, None, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_table(path: Path, results: list[CaseResult]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "structures", "size", "unit", "mask"])
        for r in results:
            writer.writerow([r.case, r.count, f"{r.size:.4f}", r.unit, r.outputs[0].name])
