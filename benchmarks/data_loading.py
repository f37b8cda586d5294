"""How fast a site reads its data, and whether reading or training dominates a local epoch.

- **Slices/s**: a 64-slice 256 x 256 CT series read by ``read_scan`` as a DICOM series folder and
  as one NIfTI volume (``.nii.gz``), the same resized to the model's 64³ input, resampled to a
  common 1.5 mm RAS grid instead (``data.target-spacing``), and ``medfed data import --from dicom``
  of the series (header scan, grouping, NIfTI written).
- **Epoch split**: a synthetic 3D segmentation site (60 volumes, 32³) written as NIfTI and read with
  ``read_site`` (what a site does when a round starts), against one local DP training epoch on it
  (``configs/segmentation-synthetic3d.toml`` model, batch 16).

    .venv/bin/medfed bench data_loading

Writes benchmarks/results/data_loading.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import nibabel
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.harness import results_path, write_results
from medfed.config import load_config
from medfed.data import PrivacyUnitDataset, read_site, write_site
from medfed.data.decode import Preprocess, is_photo, model_input
from medfed.data.importers import import_site
from medfed.data.manifest import SiteReading
from medfed.data.medical_io import read_scan, write_dicom_series
from medfed.data.synthetic import synthetic_segmentation_site
from medfed.privacy import make_private
from medfed.tasks import get_task
from medfed.training import build_optimizer, train

REPO = Path(__file__).resolve().parent.parent


def _timed(fn, repeats: int = 3) -> float:  # noqa: ANN001 - any callable
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def slices_per_second(root: Path) -> dict[str, float]:
    rng = np.random.default_rng(0)
    volume = (rng.normal(40, 300, (64, 256, 256))).astype(np.int16)
    write_dicom_series(volume, root / "series", (1.5, 0.7, 0.7))
    nifti = root / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.transpose(2, 1, 0), np.diag([0.7, 0.7, 1.5, 1.0])), nifti)
    out = {}
    common = Preprocess(spacing=(1.5, 1.5, 1.5), orientation="RAS")
    for name, path in (("dicom_series", root / "series"), ("nifti_gz", nifti)):
        out[f"{name}_read"] = 64 / _timed(lambda p=path: read_scan(p))
        out[f"{name}_read_and_resample_64"] = 64 / _timed(lambda p=path: model_input(read_scan(p), 64, 3, is_photo(p)))
        out[f"{name}_read_and_resample_1.5mm_ras"] = 64 / _timed(
            lambda p=path: model_input(read_scan(p), 128, 3, is_photo(p), preprocess=common)
        )
    counter = iter(range(100))
    out["dicom_import"] = 64 / _timed(
        lambda: import_site("dicom", root / "series", root / f"import-{next(counter)}", labels=_labels(root))
    )
    return out


def _labels(root: Path) -> Path:
    table = root / "labels.csv"
    table.write_text("PatientID,label\nPHANTOM,1\n")
    return table


def epoch_split(root: Path) -> dict[str, float]:
    config = load_config(REPO / "configs" / "segmentation-synthetic3d.toml", {"train.batch-size": 16})
    site_dir = write_site(root / "site", synthetic_segmentation_site(0, 60, 32, 2, 0, spatial_dims=3))
    read_seconds = _timed(lambda: read_site(site_dir, SiteReading(32, 2, "mask", 3)), repeats=1)
    site = read_site(site_dir, SiteReading(32, 2, "mask", 3))
    task = get_task("segmentation")
    model = task.build_model(config)
    _, units = site.privacy_units()
    loader = DataLoader(
        PrivacyUnitDataset(site.split("train"), units, task.train_transform(config)), batch_size=16, shuffle=True
    )
    optimizer = build_optimizer(model, config.train)
    model, optimizer, loader = make_private(model, optimizer, loader, 1.0, 1.0)
    stats = train(task, model, loader, optimizer, torch.device("cpu"), epochs=1)
    return {
        "volumes": len(site.targets),
        "read_site_seconds": read_seconds,
        "dp_epoch_seconds": stats.seconds,
        "read_share_of_epoch": read_seconds / (read_seconds + stats.seconds),
    }


def main(argv: list[str] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        summary = {"slices_per_second": slices_per_second(root), "epoch": epoch_split(root)}
    print(json.dumps(summary, indent=1))
    write_results(results_path("data_loading"), summary)


if __name__ == "__main__":
    main()
