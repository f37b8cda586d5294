"""Segmentation: masks on disk, metrics against hand counts, a federated round with DP."""

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.data import read_site, write_site
from medfed.data.manifest import SiteReading
from medfed.data.synthetic import synthetic_segmentation_site
from medfed.tasks.segmentation import SegmentationMetrics


def test_mask_site_round_trip_and_mask_validation(tmp_path: Path) -> None:
    site = synthetic_segmentation_site(0, 20, image_size=32)
    assert site.targets.shape == (20, 1, 32, 32) and site.targets.max() == 1
    folder = write_site(tmp_path / "s", site)
    back = read_site(folder, SiteReading(32, 2, target="mask"))
    np.testing.assert_array_equal(back.targets, site.targets)
    assert back.target_key == "mask"
    np.save(folder / "masks" / "bad.npy", np.full((32, 32), 5))
    manifest = folder / "manifest.csv"
    lines = manifest.read_text().splitlines()
    lines[1] = lines[1].replace("masks/000000.png", "masks/bad.npy")
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"masks/bad.npy unreadable: mask values must be class indices in \[0, 1\]"):
        read_site(folder, SiteReading(32, 2, target="mask"))


def test_dice_iou_and_pooled_dice_match_hand_counts() -> None:
    truth = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    truth[0, 0, 2:6, 2:6] = 1  # 16 pixels
    pred = torch.zeros_like(truth)
    pred[0, 0, 2:6, 2:4] = 1  # 8 of them, no false positives
    # second image: empty truth and empty prediction -> ignored by per-image Dice
    acc = SegmentationMetrics(2)
    acc.update(pred, {"mask": truth})
    m = acc.compute()
    assert m["dice"] == pytest.approx(2 * 8 / (8 + 16))
    assert m["iou"] == pytest.approx(8 / 16)
    assert m["dice_pooled"] == pytest.approx(2 * 8 / (2 * 8 + 0 + 8))
    assert m["hd95"] > 0


def test_segmentation_simulation_writes_the_full_report(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from medfed.cli import app
    from tests.conftest import REPO

    args = [
        "simulate", str(REPO / "configs" / "segmentation-synthetic.toml"), "--sites", "2", "--rounds", "1",
        "--out", str(tmp_path), "--set", "data.samples-per-site=40", "--set", "data.image-size=32", "--set", "data.patch-size=16",
        "--set", "train.local-epochs=1", "--set", "evaluation.example-images=1",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["primary_metric"] == "dice" and report["sites"] == ["site-1", "site-2"]
    assert list((tmp_path / "plots").glob("examples-site-1-*.png"))
    assert "Predicted and reference masks" in (tmp_path / "report.html").read_text()
