"""Detection end to end, as a researcher runs it: synthetic hospitals with boxes on disk, a DP
federation with `medfed simulate`, the report (mAP table, PR and FROC curves, box figures), then
`medfed evaluate` and `medfed data check` at one hospital."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.run_folder import RunFolder
from tests.conftest import REPO

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("detection")
    sites = root / "sites"
    synth = ["data", "synth", "--task", "detection", "--out", str(sites), "--sites", "2", "--samples", "300",
             "--image-size", "64"]  # fmt: skip
    result = runner.invoke(app, synth)
    assert result.exit_code == 0, result.output
    out = root / "run"
    args = [
        "simulate", str(REPO / "configs" / "detection-synthetic.toml"),
        "--data", str(sites), "--rounds", "3", "--out", str(out),
        "--set", "train.local-epochs=2", "--set", "train.batch-size=32", "--set", "evaluation.example-images=1",
        # a generous ε keeps this short run's learning signal above the DP noise (the assertion
        # below is about training working end to end; ε = 8 is measured in benchmarks/)
        "--set", "privacy.target-epsilon=30",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "sites": sites, "report": json.loads((out / "report.json").read_text())}


def test_dp_federation_learns_to_detect(run: dict) -> None:
    report = run["report"]
    assert report["task"] == "detection" and report["primary_metric"] == "map50"
    assert report["sites"] == ["hospital-1", "hospital-2"]
    for site in report["sites"]:
        assert report["rounds"][0]["metrics"][site]["map50"] < 0.05  # an untrained detector finds nothing
        final = report["final"]["per_site"][site]
        assert final["map50"] > 0.1, final  # well above the untrained detector after 3 rounds under DP (~0.25)
        assert 0 <= final["map"] <= final["map50"]
        assert {"froc", "froc@0.125fp", "froc@8fp", "ap50_class_0", "ap50_class_1", "pr50_class_0@0.5"} <= set(final)
        assert report["privacy"][site]["epsilon"] <= 30.0 + 1e-6
    cross = report["final"]["cross_site"]
    assert cross["metric"] == "map50" and cross["models"] == ["hospital-1", "hospital-2", "global"]


def test_report_shows_per_class_ap_curves_and_boxes(run: dict) -> None:
    out: Path = run["out"]
    page = (out / "report.html").read_text()
    assert "Average precision per class" in page and "disc" in page and "ring" in page
    assert "Predicted and reference boxes" in page
    for name in ("precision_recall.png", "froc.png", "examples-hospital-1-0.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name


def test_site_evaluates_and_checks_its_box_data(run: dict, tmp_path: Path) -> None:
    hospital = run["sites"] / "hospital-1"
    result = runner.invoke(app, ["data", "check", str(hospital), "--task", "detection", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    assert "images and boxes per split" in result.output
    model = RunFolder(run["out"]).global_model
    result = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(hospital), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["map50"] == pytest.approx(run["report"]["final"]["per_site"]["hospital-1"]["map50"], abs=1e-6)
    assert (tmp_path / "example-0.png").is_file()


def test_predict_writes_boxes_in_the_input_pixels(run: dict, tmp_path: Path) -> None:
    import csv

    import numpy as np
    from PIL import Image

    source = sorted((run["sites"] / "hospital-1" / "images").glob("*.png"))[:3]
    scans = tmp_path / "scans"
    scans.mkdir()
    for path in source:
        small = Image.open(path)
        small.save(scans / path.name)
        small.resize((128, 256), Image.Resampling.NEAREST).save(scans / f"big_{path.name}")  # 2x wide, 4x tall
    model = RunFolder(run["out"]).global_model
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "--model", str(model), "--input", str(scans), "--out", str(out),
                                 "--min-score", "0.05"])  # fmt: skip
    assert result.exit_code == 0, result.output
    with (out / "detections.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and set(rows[0]) == {"case", "class", "score", "xmin", "ymin", "xmax", "ymax"}
    assert {r["class"] for r in rows} <= {"disc", "ring"}
    best = {}
    for r in rows:  # the best detection of each case
        if r["case"] not in best or float(r["score"]) > float(best[r["case"]]["score"]):
            best[r["case"]] = r
    compared = 0
    for path in source:
        case = path.stem
        if case in best and f"big_{case}" in best:
            compared += 1
            small = np.array([float(best[case][k]) for k in ("xmin", "ymin", "xmax", "ymax")])
            big = np.array([float(best[f"big_{case}"][k]) for k in ("xmin", "ymin", "xmax", "ymax")])
            np.testing.assert_allclose(big, small * [2, 4, 2, 4], atol=6)
    assert compared > 0
    assert len(list(out.glob("*_overlay.png"))) == 6
