"""Each benchmark's ``--quick`` version runs end to end through ``medfed bench`` and writes a
results file and a plot the README table can format (results go to a temporary folder)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA

_spec = importlib.util.spec_from_file_location("readme_table", REPO / "benchmarks" / "readme_table.py")
readme_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_table)


def _bench(name: str, tmp_path: Path) -> dict:
    env = os.environ | {"MEDFED_BENCH_RESULTS": str(tmp_path / "results")}
    command = [str(Path(sys.executable).parent / "medfed"), "bench", name, "--quick", "--out", str(tmp_path / "runs")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = f"{name}-quick"
    assert (tmp_path / "results" / "plots" / f"{stem}.png").stat().st_size > 1000
    result = json.loads((tmp_path / "results" / f"{stem}.json").read_text())
    assert result["benchmark"] == name and result["quick"] is True
    rows = list(readme_table.FORMATS[name.replace("_", "-")](result))
    assert rows and all(len(row) == 3 and "nan" not in row[2] for row in rows)
    return result


@pytest.mark.slow
def test_generalization_quick_on_synthetic_hospitals(tmp_path: Path) -> None:
    """Needs no real data: 3 synthetic hospitals, local models' matrix and leave-one-site-out (five
    simulations: in -m slow, to keep the default suite under 15 minutes)."""
    result = _bench("generalization", tmp_path)["datasets"]["synthetic"]
    assert len(result["local_matrix"]["values"]) == 3 and set(result["loso_at_held_out_site"]) == set(result["sites"])
    for entry in result["loso_at_held_out_site"].values():
        assert entry["low"] <= entry["value"] <= entry["high"]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize(
    "name", ["utility", "privacy", "overhead", "dp_small_sites", "natural_sites", "spine", "heart", "personalization"]
)
def test_quick_benchmarks_on_real_data(name: str, tmp_path: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    _bench(name, tmp_path)


@pytest.mark.slow
def test_repeatability_quick_checks_every_site_of_every_run(tmp_path: Path) -> None:
    """Two 1-round demo runs: each run lists every site's figures and whether all reach them."""
    result = _bench("repeatability", tmp_path)["configs"]["classification-synthetic"]
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    for run in result["runs"]:
        figures = [site[m] >= low for site in run["per_site"].values() for m, low in result["figures"].items()]
        assert len(run["per_site"]) == 3 and run["reached"] == all(figures)
    assert result["reached"] == sum(run["reached"] for run in result["runs"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["privacy_audit", "site_level_dp", "scale"])
def test_quick_privacy_benchmarks_on_synthetic_sites(name: str, tmp_path: Path) -> None:
    """The privacy audit (membership inference with and without DP), site-level DP and scale (many
    synthetic sites) need no real data."""
    _bench(name, tmp_path)


@pytest.mark.slow
def test_multilabel_quick_compares_with_one_binary_model_per_finding(tmp_path: Path) -> None:
    """One seed of 1-round federations: the multi-label model and a binary model per finding (four
    simulations: in -m slow)."""
    result = _bench("multilabel", tmp_path)
    run = result["runs"][0]
    assert set(run["multilabel_auroc"]) == set(run["binary_auroc"]) == {"disc", "ring", "bar"}
    assert run["gap"] == pytest.approx(run["binary_mean"] - run["multilabel_mean"])
    assert result["summary"]["dp"]["seeds"] == 1


@pytest.mark.slow
def test_partial_labels_quick_scores_each_structure_where_it_is_labelled(tmp_path: Path) -> None:
    """Plain vs marginal loss, with and without DP, on 3 synthetic sites, site-3 labelling one
    structure of two: its structure 2 is n/a in the report, scored on its hidden full labels."""
    result = _bench("partial_labels", tmp_path)
    assert [run["label"] for run in result["runs"]] == [
        "plain, no DP",
        "marginal, no DP",
        "plain, DP ε 8",
        "marginal, DP ε 8",
    ]
    plain, marginal = (result["runs"][i]["classes_labelled"]["site-3"] for i in (0, 1))
    assert plain == [0, 1, 2] and marginal == [0, 1]  # plain: site-3 claims both structures
    assert result["runs"][1]["dice_per_site"]["site-3"]["structure 2"] is None  # n/a where not labelled


@pytest.mark.slow
def test_instance_segmentation_quick_scores_every_site(tmp_path: Path) -> None:
    """One tiny DP federation of touching nuclei: AJI, PQ, F1 and Dice at every site."""
    run = _bench("instance_segmentation", tmp_path)["modes"]["dp"]["runs"][0]
    assert len(run["per_site"]) == 3 and all(0 <= site["aji"] <= 1 for site in run["per_site"].values())


@pytest.mark.slow
def test_detection3d_quick_on_synthetic_ct(tmp_path: Path) -> None:
    """Needs no real data: 3 synthetic CT sites of 16³ volumes, 1 round without and with DP."""
    result = _bench("detection3d", tmp_path)
    assert set(result["runs"]) == {"nodp-seed0", "dp-seed0"}
    for run in result["runs"].values():
        assert len(run["cpm"]) == 3 and all(0 <= v <= 1 for v in run["cpm"].values())
