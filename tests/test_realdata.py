"""A real-data federation: PneumoniaMNIST (paediatric chest X-rays) split into 2 hospitals, with DP."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from tests.conftest import REPO

pytestmark = pytest.mark.realdata


def test_pneumoniamnist_federation_with_dp(shared_data: Path, tmp_path: Path) -> None:
    npz = shared_data / "medmnist" / "pneumoniamnist.npz"
    args = [
        "simulate", str(REPO / "configs" / "classification-pneumoniamnist.toml"),
        "--data", str(npz), "--sites", "2", "--rounds", "3", "--out", str(tmp_path),
        "--set", "data.max-samples-per-site=1200", "--set", "train.batch-size=64", "--set", "train.local-epochs=2", "--set", "evaluation.cross-site=false",
        "--set", "evaluation.example-images=0",
        "--set", "model.width=16",  # the small CNN: a short DP run
        "--set", "data.partitioner=iid",  # DP end to end on real images, without the label skew's variance
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sites"] == ["site-1", "site-2"]
    assert report["config"]["data"]["path"] == "pneumoniamnist.npz"
    # real signal learned under DP in 3 short rounds, over all test cases (a label-skewed site's own
    # test split may hold only a few cases of one class)
    assert report["final"]["pooled"]["auroc"] > 0.7, report["final"]["pooled"]
    for site in report["final"]["per_site"]:
        assert report["privacy"][site]["epsilon"] <= report["privacy"][site]["budget"] + 1e-6


def test_chasedb1_loads_as_three_hospitals_split_by_child(shared_data: Path) -> None:
    import numpy as np

    from medfed.config import load_config
    from medfed.data.sites import load_simulated_site

    config = load_config(
        REPO / "configs" / "segmentation-chasedb1.toml",
        {"data.path": str(shared_data / "chasedb1"), "data.image-size": 128},
    )
    children: list[set[str]] = []
    for index in range(3):
        name, site = load_simulated_site(config, index)
        assert name == f"site-{index + 1}" and site.images.shape[1:] == (3, 128, 128)  # RGB fundus photos
        assert set(np.unique(site.targets)) == {0, 1}
        assert not np.allclose(site.images[:, 0], site.images[:, 1])  # the colour is kept
        assert 0.03 < site.targets.mean() < 0.12  # vessels are 5-9 % of a fundus photo
        assert site.privacy_units("train")[0] == "patient"
        for child in set(site.patient_ids):  # both eyes of a child stay in one split
            assert len(set(site.splits[site.patient_ids == child])) == 1
        assert {"train", "val", "test"} == set(site.splits)
        children.append(set(site.patient_ids))
    assert [len(c) for c in children] == [5, 5, 4] and not (children[0] & children[1] or children[1] & children[2])
