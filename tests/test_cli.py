"""User mistakes get one clear message and exit code 2, before any site starts."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "classification-synthetic.toml")
runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "configs/nope.toml"], "config file not found"),
        (["simulate", CONFIG, "--set", "train.lr=fast"], "train.lr = 'fast' is invalid: expected a number"),
        (["simulate", CONFIG, "--set", "train.learning-rate=1"], "unknown key 'train.learning-rate'"),
        (["simulate", CONFIG, "--sites", "1"], "the data has 1 site(s) but run.min-sites = 2"),
        (["simulate", CONFIG, "--data", "/nonexistent.npz"], "expected a MedMNIST .npz file"),
        (
            ["simulate", CONFIG, "--set", "data.source=medmnist", "--set", "data.path=/no.npz"],
            "MedMNIST file not found",
        ),
    ],
)
def test_simulate_refuses_bad_input_with_a_clear_message(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_simulate_names_every_bad_file_of_a_site(tmp_path: Path) -> None:
    for site in ("a", "b"):
        (tmp_path / site).mkdir()
        (tmp_path / site / "manifest.csv").write_text("image,label,split\nscan.png,0,train\n")
    result = runner.invoke(app, ["simulate", CONFIG, "--data", str(tmp_path)])
    assert result.exit_code == 2 and "scan.png: file not found" in result.output


def test_data_check_prints_a_data_card_of_formats_modalities_sizes_and_labels(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfed.cli import app
    from tests.test_phi_guard import _dicom_site

    site = _dicom_site(tmp_path / "ct-site", 0, samples=12)
    result = CliRunner().invoke(app, ["data", "check", str(site)])
    assert result.exit_code == 0, result.output
    assert "formats: DCM 12" in result.output and "modalities: CT 12" in result.output
    assert "image sizes: 28 x 28" in result.output and "voxel sizes: 0.8 x 0.8 mm" in result.output
    assert "labels: class 0" in result.output


def test_data_option_moves_the_configs_own_source(tmp_path: Path) -> None:
    """``--data`` keeps a config's MedMNIST / VOC / pairs source and moves only its path; a folder
    of site folders is read as sites; anything else names what this config expected."""
    import typer

    from medfed.cli.simulate import _data_overrides
    from medfed.config import load_config

    mnist = load_config(REPO / "configs" / "classification-pneumoniamnist.toml")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "pneumoniamnist.npz").write_bytes(b"")
    assert _data_overrides(tmp_path / "copy", mnist) == {
        "data.path": str((tmp_path / "copy" / "pneumoniamnist.npz").resolve())
    }
    voc = load_config(REPO / "configs" / "detection-bccd.toml")
    (tmp_path / "bccd" / "BCCD" / "Annotations").mkdir(parents=True)
    assert _data_overrides(tmp_path / "bccd" / "BCCD", voc) == {
        "data.path": str((tmp_path / "bccd" / "BCCD").resolve())
    }
    pairs = load_config(REPO / "configs" / "segmentation-chasedb1.toml")
    assert _data_overrides(tmp_path / "bccd", pairs) == {"data.path": str((tmp_path / "bccd").resolve())}
    (tmp_path / "sites" / "a").mkdir(parents=True)
    (tmp_path / "sites" / "a" / "manifest.csv").write_text("image,label\n")
    assert _data_overrides(tmp_path / "sites", pairs)["data.source"] == "sites"
    for data, config in ((tmp_path / "bccd", voc), (tmp_path / "bccd", mnist), (tmp_path / "none", pairs)):
        with pytest.raises(typer.Exit):
            _data_overrides(data, config)


@pytest.mark.parametrize(
    ("config", "layout", "message"),
    [
        ("detection-bccd.toml", "bccd/BCCD/Annotations", "pass --data"),
        ("classification-pneumoniamnist.toml", "medmnist/other.npz", "a folder holding pneumoniamnist.npz"),
    ],
)
def test_data_option_says_what_this_config_expected(tmp_path: Path, config: str, layout: str, message: str) -> None:
    target = tmp_path / layout
    target.parent.mkdir(parents=True)
    target.mkdir() if not target.suffix else target.write_bytes(b"")
    result = runner.invoke(
        app, ["simulate", str(REPO / "configs" / config), "--data", str(tmp_path / layout.split("/")[0])]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in " ".join(result.output.split())
