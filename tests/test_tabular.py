"""The tabular task: the UCI heart importer, per-site imputation fitted on train rows only, features
manifests read and refused, and a federation on synthetic tabular sites with DP."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import ConfigError, load_config
from medfed.data import DataError, load_simulated_site, simulated_site_names
from medfed.data.heart_uci import FEATURES, HOSPITALS, heart_sites, import_heart_uci
from medfed.data.manifest import SiteReading, read_site
from medfed.data.tabular import fit_preprocessor
from medfed.federation import run_federation
from tests.conftest import REPO, tiny_config
from tests.test_federation import InProcessGrid

HEADER = ",".join(FEATURES) + ",target"
ROWS = [  # UCI rows: Cleveland-style floats, Hungarian "?", Switzerland's empty cells and zero cholesterol
    "63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0",
    "67.0,1.0,4.0,160.0,286.0,0.0,2.0,108.0,1.0,1.5,2.0,3.0,3.0,2",
    "28,1,2,130,132,0,2,185,0,0,?,?,?,0",
    "32,1,1,95,0,,0,127,0,.7,1,,,1",
    "54,0,3,135,304,1,0,170,0,0,1,0,3,0",
    "41,0,2,130,204,0,2,172,0,1.4,1,0,3,0",
    "57,1,4,140,192,0,0,148,0,0.4,2,0,6,1",
    "56,1,2,120,236,0,0,178,0,0.8,1,0,3,3",
    "62,0,4,140,268,0,2,160,0,3.6,3,2,3,4",
    "48,1,4,130,256,1,2,150,1,0,1,2,7,1",
]
FEATURES_10 = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]


def _uci(folder: Path, rows: list[str] = ROWS, name: str = "processed.cleveland.data", header: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join([HEADER] * header + rows) + "\n")
    return folder


def test_importer_writes_a_site_per_hospital_with_missing_values_empty(tmp_path: Path) -> None:
    src = _uci(tmp_path / "uci")
    _uci(src, ROWS[2:], "processed.hungarian.data", header=False)  # the UCI originals have no header
    notes = import_heart_uci(src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cleveland", "hungary"] and len(notes) == 2
    with (tmp_path / "out" / "cleveland" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["label"]) for r in rows] == [int(line.rsplit(",", 1)[1]) > 0 for line in ROWS]
    assert rows[2]["slope"] == rows[2]["ca"] == "" and rows[3]["chol"] == "" and rows[3]["fbs"] == ""
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    site = read_site(tmp_path / "out" / "cleveland", SiteReading(28, 2, features=tuple(FEATURES)))
    assert site.images.shape == (10, 1, 1, 2 * len(FEATURES)) and np.isfinite(site.images).all()


def test_importer_split_is_seeded_and_stratified(tmp_path: Path) -> None:
    src = _uci(tmp_path / "uci", [f"{40 + i}{row[2:]}" for i, row in enumerate(ROWS * 3)])  # 30 distinct patients
    first, _ = heart_sites(src, seed=3)
    again, _ = heart_sites(src, seed=3)
    assert first == again
    rows = first["cleveland"]
    for label in ("0", "1"):
        splits = [r["split"] for r in rows if r["label"] == label]
        assert splits.count("test") >= 1 and splits.count("val") >= 1


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6", "13 values: expected 14"),
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0,9", "15 values: expected 14"),
        ("63,1,1,145,high,1,2,150,0,2.3,3,0,6,0", "feature chol = 'high' is not a number"),
        ("63,1,1,145,233,1,2,150,0,inf,3,0,6,0", "feature oldpeak = 'inf' is not a number"),
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6,7", "num = '7': expected the diagnosis 0-4"),
    ],
)
def test_hostile_uci_rows_are_named_by_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    src = _uci(tmp_path / "uci", [ROWS[0], line])
    with pytest.raises(DataError) as caught:
        import_heart_uci(src, tmp_path / "out")
    assert f"processed.cleveland.data line 3: {reason}" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_cli_import_refuses_a_bad_file_and_names_it(tmp_path: Path) -> None:
    src = _uci(tmp_path / "uci", [ROWS[0], "not,a,row"])
    result = CliRunner().invoke(app, ["data", "import", str(src), "--from", "heart-uci", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "processed.cleveland.data" in " ".join(result.output.split())
    empty = CliRunner().invoke(app, ["data", "import", str(tmp_path), "--from", "heart-uci", "--out", "o2"])
    assert empty.exit_code == 2


def test_imputer_and_scaler_are_fitted_on_the_sites_train_rows_only(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    rows = [("train", "1", "1"), ("train", "3", "0"), ("train", "", "1"), ("val", "100", "0"), ("test", "", "1")]
    with (site_dir / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "split", "x", "unused"])
        writer.writerows([(label, split, x, "?") for split, x, label in rows])
    site = read_site(site_dir, SiteReading(28, 2, features=("x",)))
    x = site.images[:, 0, 0, 0]
    # train median 2 imputes the missing cells; mean 2 and SD sqrt(2/3) of the train rows [1, 3, 2]
    scale = np.sqrt(2 / 3)
    assert np.allclose(x, [-1 / scale, 1 / scale, 0, 98 / scale, 0], atol=1e-5)
    pipeline = fit_preprocessor(np.array([[1.0], [3.0], [np.nan]]))
    assert pipeline.transform(np.array([[np.nan]]))[0, 0] == pytest.approx(0.0)
    assert any("missing values: 40.0% of cells" in line for line in site.card)


def test_bad_features_manifest_names_every_bad_cell(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "manifest.csv").write_text("label,split,x,y\n1,train,1,2\n2,train,abc,1\n0,later,1,1e999\n")
    with pytest.raises(DataError) as caught:
        read_site(site_dir, SiteReading(28, 2, features=("x", "y", "z")))
    assert "missing column(s) ['z']" in str(caught.value)
    with pytest.raises(DataError) as caught:
        read_site(site_dir, SiteReading(28, 2, features=("x", "y")))
    message = str(caught.value)
    for expected in ("line 3: feature x = 'abc' is not a number", "line 3: label '2' is not a class index",
                     "line 4: feature y = '1e999' is not a number", "line 4: split 'later'"):  # fmt: skip
        assert expected in message


def test_config_names_the_feature_settings_it_refuses() -> None:
    with pytest.raises(ConfigError, match="data.features"):
        tiny_config(**{"data.features": ["age"]})  # classification takes images
    with pytest.raises(ConfigError, match="data.features"):
        tiny_config(**{"run.task": "tabular", "data.source": "sites", "data.path": "x"})
    with pytest.raises(ConfigError, match="data.features"):
        tiny_config(**{"run.task": "tabular", "data.source": "heart-uci", "data.path": "x", "data.features": ["bmi"]})
    with pytest.raises(ConfigError, match="data.source"):
        tiny_config(**{"run.task": "tabular", "data.source": "medmnist", "data.path": "x.npz"})
    for name in ("tabular-heart.toml", "tabular-heart-dp.toml"):
        assert load_config(REPO / "configs" / name).run.task == "tabular"


@pytest.mark.usefixtures("task_identity")
def test_one_round_federation_on_synthetic_tabular_sites_with_dp(tmp_path: Path) -> None:
    config = tiny_config(**{"run.task": "tabular", "run.rounds": 1, "data.sites": 2, "data.samples-per-site": 40,
                            "privacy.enabled": True, "evaluation.cross-site": False})  # fmt: skip
    nodes = {i: {"partition-id": i} for i in range(len(simulated_site_names(config)))}
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert report["task"] == "tabular" and len(report["final"]["per_site"]) == 2
    for site, privacy in report["privacy"].items():
        assert 0 < privacy["epsilon"] <= 8.0 + 1e-6, site
    assert all("auroc" in metrics for metrics in report["final"]["per_site"].values())


def test_predict_gives_a_probability_per_patient_row(tmp_path: Path) -> None:
    from medfed.predict import predict_rows
    from medfed.tasks import get_task

    config = tiny_config(**{"run.task": "tabular", "data.features": list(FEATURES_10[:3]), "data.source": "sites",
                            "data.path": str(tmp_path)})  # fmt: skip
    import_heart_uci(_uci(tmp_path / "uci"), tmp_path / "sites")
    patients = tmp_path / "patients.csv"
    patients.write_text("age,sex,cp,other\n63,1,4,x\n44,?,2,y\n,,,\n")
    model = get_task("tabular").build_model(config)
    result = predict_rows(config, model, patients, tmp_path / "sites" / "cleveland", tmp_path / "out")
    with result.table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(abs(float(r["p_class_0"]) + float(r["p_class_1"]) - 1) < 1e-3 for r in rows)
    with pytest.raises(ValueError, match="--site-data"):
        predict_rows(config, model, patients, None, tmp_path / "out")
    patients.write_text("age,sex\n63,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cp'\]"):
        predict_rows(config, model, patients, tmp_path / "sites" / "cleveland", tmp_path / "out")


@pytest.mark.realdata
def test_real_heart_data_imports_and_loads_as_four_hospitals(shared_data: Path, tmp_path: Path) -> None:
    import_heart_uci(shared_data / "heart_uci", tmp_path / "sites")
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == sorted(HOSPITALS.values())
    config = load_config(REPO / "configs" / "tabular-heart.toml", {"data.path": str(shared_data / "heart_uci")})
    counts = {}
    for index, name in enumerate(simulated_site_names(config)):
        loaded, site = load_simulated_site(config, index)
        counts[loaded] = len(site.targets)
        assert site.images.shape[1:] == (1, 1, 2 * len(FEATURES_10)) and np.isfinite(site.images).all()
        same = read_site(tmp_path / "sites" / name, SiteReading(28, 2, features=tuple(FEATURES_10)))
        assert np.allclose(same.images, site.images)  # the importer and the data source agree
    assert counts == {"cleveland": 303, "hungary": 294, "switzerland": 123, "va-long-beach": 200}
