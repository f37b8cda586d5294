"""The pre-flight check: errors block (exit 1), warnings do not; the site tells the server only kinds and counts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from PIL import Image
from typer.testing import CliRunner

from medfed.cli import app
from medfed.data import write_site
from medfed.data.manifest import SiteReading
from medfed.data.preflight import run_preflight
from medfed.data.synthetic import synthetic_segmentation_site, synthetic_site
from medfed.site import handle_train
from tests.conftest import REPO
from tests.test_site import _request, tiny_config

pytestmark = pytest.mark.usefixtures("task_identity")


def _rows(site: Path) -> list[list[str]]:
    with (site / "manifest.csv").open(newline="") as handle:
        return list(csv.reader(handle))


def _rewrite(site: Path, rows: list[list[str]]) -> None:
    with (site / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _check(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["data", "check", *args])
    return result.exit_code, " ".join(result.output.split())


def test_every_error_is_listed_with_its_file_and_the_summary_counts_kinds(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site", synthetic_site(0, 30, 16, 2, seed=0))
    rows = _rows(site)
    (site / rows[1][0]).unlink()  # missing file
    np.save(site / "images" / "nan.npy", np.full((16, 16), np.nan, np.float32))
    rows[2][0] = "images/nan.npy"  # NaN pixels
    rows[3][1] = "7"  # unknown label
    rows[4][3], rows[5][3], rows[5][2] = "patient-x", "patient-x", "test" if rows[4][2] != "test" else "train"
    _rewrite(site, rows)
    code, output = _check(str(site), "--image-size", "16")
    assert code == 1
    assert "000000.png: file not found" in output and "nan.npy unreadable: image contains NaN or Inf pixels" in output
    assert "label '7' is not a class index in [0, 1]" in output and "a patient appears in several splits" in output
    summary = run_preflight(site, SiteReading(16, 2)).summary()
    assert sorted(summary.split("; ")) == [
        "1 NaN/Inf pixels",
        "1 missing file",
        "1 patient in several splits",
        "1 unknown label",
    ]
    assert "000000" not in summary and "patient-x" not in summary


def test_warnings_do_not_block_and_name_what_to_look_at(tmp_path: Path) -> None:
    site_arrays = synthetic_site(0, 24, 16, 3, seed=0)
    site_arrays.splits[site_arrays.splits == "val"] = "train"  # no val split
    train = site_arrays.splits == "train"
    site_arrays.targets[train] = np.where(site_arrays.targets[train] == 2, 0, site_arrays.targets[train])  # no class 2
    site = write_site(tmp_path / "site", site_arrays)
    rows = _rows(site)
    test_row = next(r for r in rows[1:] if r[2] == "test")
    train_row = next(r for r in rows[1:] if r[2] == "train")
    (site / test_row[0]).write_bytes((site / train_row[0]).read_bytes())  # the same image in train and test
    code, output = _check(str(site), "--image-size", "16", "--num-classes", "3")
    assert code == 0, output
    assert "warning: val: empty val split: the server gets no val metrics from this site" in output
    assert "warning: train: class(es) [2] never occur in the training split" in output
    assert "warning: splits: 1 image(s) appear identically in both test and train" in output
    assert "3 warning(s)" in output


def test_segmentation_with_no_foreground_to_learn_is_an_error(tmp_path: Path) -> None:
    arrays = synthetic_segmentation_site(0, 12, 16, 2, seed=0)
    arrays.targets[arrays.splits == "train"] = 0
    site = write_site(tmp_path / "site", arrays)
    code, output = _check(str(site), "--task", "segmentation", "--image-size", "16")
    assert code == 1 and "every training mask is empty: nothing to learn" in output


def test_check_takes_its_settings_from_a_run_config(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site", synthetic_segmentation_site(0, 12, 16, 2, seed=0))
    config = tmp_path / "run.toml"
    config.write_text((REPO / "configs" / "segmentation-synthetic.toml").read_text())
    code, output = _check(str(site), "--config", str(config))
    assert code == 0, output and "samples per split and class (largest class in the mask)" in output
    Image.fromarray(np.full((16, 16), 3, np.uint8)).save(site / "masks" / "000000.png")  # class 3 of 2
    code, output = _check(str(site), "--config", str(config))
    assert code == 1 and "mask values must be class indices in [0, 1]" in output


def test_a_deployed_site_runs_the_check_and_tells_the_server_kinds_only(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site", synthetic_site(0, 30, 16, 2, seed=0))
    node = {"data-path": str(site), "site-name": "north", "state-dir": str(tmp_path / "state")}
    config = tiny_config(**{"data.image-size": 16})
    ok = handle_train(_request(config, MessageType.TRAIN), node, run_id=1)
    assert ok.content["site"]["status"] == "ok" and "notes" not in ok.content["site"]
    rows = _rows(site)
    for row in rows[1:]:
        row[2] = "train" if row[2] == "val" else row[2]
    _rewrite(site, rows)
    warned = handle_train(_request(config, MessageType.TRAIN), node, run_id=2)
    assert warned.content["site"]["status"] == "ok"
    assert warned.content["site"]["notes"] == "1 empty val split"
    (site / rows[3][0]).unlink()
    failed = handle_train(_request(config, MessageType.TRAIN), node, run_id=3)
    assert failed.content["site"]["status"] == "error"
    assert failed.content["site"]["reason"] == (
        "site data failed the pre-flight check: 1 missing file; details are in the site's log"
    )
