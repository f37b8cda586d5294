"""Multi-label classification (``data.multi-label``): manifest cells, loss, per-label metrics and
thresholds, the thresholds travelling with the checkpoint, a tiny DP federation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfed.config import ConfigError
from medfed.data import DataError, read_site, write_site
from medfed.data.card import data_card
from medfed.data.manifest import SiteReading
from medfed.data.synthetic import synthetic_multilabel_site
from medfed.evaluation.report import write_report
from medfed.federation import run_federation
from medfed.predict import load_model, predict_cases
from medfed.run_folder import RunFolder
from medfed.tasks import classification
from medfed.weights import model_to_arrays, save_checkpoint
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid

NAMES = ("disc", "ring", "bar")
READING = SiteReading(16, 3, class_names=NAMES, multi_label=True)


def _config(**overrides: object):
    return tiny_config(**{"data.multi-label": True, "data.num-classes": 3, "data.image-size": 16, **overrides})


def _site(folder: Path, labels: list[str]) -> Path:
    (folder / "images").mkdir(parents=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "split"])
        for i, label in enumerate(labels):
            Image.fromarray(np.full((16, 16), 10 * i, np.uint8)).save(folder / f"images/{i}.png")
            writer.writerow([f"images/{i}.png", label, "train"])
    return folder


def test_manifest_cells_list_findings_by_name_or_index(tmp_path: Path) -> None:
    site = read_site(_site(tmp_path / "s", ["disc|bar", "none", "1", " ring | 0 ", "NONE"]), READING)
    assert site.targets.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]]
    written = read_site(write_site(tmp_path / "w", site), READING)  # written as indices joined by |
    np.testing.assert_array_equal(written.targets, site.targets)
    notes = " ".join(data_card(tmp_path / "w", written).lines())
    assert "findings (images holding each): class 0 2, class 1 2, class 2 1; images without any 2" in notes


@pytest.mark.parametrize(
    ("cell", "says"),
    [("", "an empty finding"), ("disc||bar", "an empty finding"), ("3", "'3' is no known finding"),
     ("tumour", "'tumour' is no known finding"), ("ring|1", "names finding '1' twice"), ("²", "no known finding"),
     ("disc;ring", "no known finding")],
)  # fmt: skip
def test_malformed_or_unknown_findings_are_refused_naming_the_row(tmp_path: Path, cell: str, says: str) -> None:
    with pytest.raises(DataError) as err:
        read_site(_site(tmp_path / "s", ["disc", cell]), READING)
    assert "manifest.csv line 3" in str(err.value) and says in str(err.value)


def test_config_refuses_what_multi_label_cannot_use() -> None:
    for overrides, key in [
        ({"evaluation.label-thresholds": [0.5, 0.5]}, "evaluation.label-thresholds"),
        ({"evaluation.label-thresholds": [0.5, 1.0, 0.5]}, "evaluation.label-thresholds"),
        ({"train.logit-adjust": True, "privacy.enabled": False}, "train.logit-adjust"),
        ({"data.class-names": ["a", "none", "b"]}, "data.class-names"),
        ({"run.task": "segmentation"}, "data.multi-label"),
    ]:
        with pytest.raises(ConfigError) as err:
            _config(**overrides)
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        tiny_config(**{"evaluation.label-thresholds": [0.5, 0.5]})
    assert err.value.key == "evaluation.label-thresholds"
    assert _config(**{"privacy.enabled": False}).train.logit_adjust is False  # the recipe's is off here


def test_loss_is_per_label_binary_cross_entropy() -> None:
    outputs = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 3.0]])
    labels = torch.tensor([[1, 0, 0], [1, 1, 0]])
    terms = [math.log(2), math.log(1 + math.e**2), math.log(1 + math.e**-1),
             math.log(1 + math.e**-1), math.log(2), math.log(1 + math.e**3)]  # fmt: skip
    assert float(classification.loss(outputs, {"label": labels})) == pytest.approx(sum(terms) / 6, rel=1e-6)
    probs = classification.decode(outputs, _config())
    torch.testing.assert_close(probs, torch.sigmoid(outputs))


def test_per_label_auroc_sensitivity_and_specificity_by_hand() -> None:
    probs = np.array([[0.9, 0.2, 0.6], [0.8, 0.7, 0.4], [0.3, 0.6, 0.1], [0.1, 0.1, 0.2]])
    truth = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    out = classification.multilabel_metrics(probs, truth, np.array([0.5, 0.65, 0.5]))
    # label 0: positives 0.9, 0.8 above both negatives -> 1; label 1: positives 0.7, 0.6 against
    # negatives 0.2, 0.1 -> 1; label 2: all positive -> undefined
    assert out["auroc_class_0"] == 1.0 and out["auroc_class_1"] == 1.0 and math.isnan(out["auroc_class_2"])
    assert out["auroc"] == 1.0
    assert out["sensitivity_class_1"] == 0.5 and out["specificity_class_1"] == 1.0  # 0.6 < 0.65
    assert out["sensitivity_class_2"] == 0.25 and math.isnan(out["specificity_class_2"])
    assert out["exact_match"] == 0.25 and out["accuracy"] == pytest.approx(8 / 12)
    probs[:, 1] = [0.2, 0.6, 0.7, 0.1]  # label 1: pairs (0.6|0.7 vs 0.2, 0.1) still all ordered
    probs[:, 0] = [0.9, 0.3, 0.8, 0.1]  # label 0: positive 0.3 below negative 0.8 -> 3 of 4 pairs
    assert classification.multilabel_metrics(probs, truth, np.full(3, 0.5))["auroc_class_0"] == 0.75


def test_thresholds_are_chosen_per_label_and_pooled_from_site_counts() -> None:
    config = _config()
    rng = np.random.default_rng(0)
    site_counts = {}
    for name in ("a", "b"):
        truth = rng.random((200, 3)) < 0.4
        scores = np.clip(truth * np.array([0.5, 0.3, 0.0]) + rng.random((200, 3)) * 0.5, 0, 1)
        metrics = classification.metrics(config)
        metrics.update(torch.as_tensor(scores), {"label": torch.as_tensor(truth)})
        site_counts[name] = metrics.score_counts()
    point = classification.operating_point(site_counts, config)
    assert len(point["label_thresholds"]) == 3 and point["val_sensitivity_class_0"] > 0.9
    pooled = classification.pooled_metrics(site_counts, config.with_overrides(
        {"evaluation.label-thresholds": point["label_thresholds"]}))  # fmt: skip
    assert pooled["auroc_class_0"] > 0.95 and 0.4 < pooled["auroc_class_2"] < 0.6
    assert pooled["auroc"] == pytest.approx(np.mean([pooled[f"auroc_class_{k}"] for k in range(3)]))


def _checkpoint(tmp_path: Path, thresholds: list[float]) -> Path:
    config = _config(**{"evaluation.label-thresholds": thresholds, "data.class-names": list(NAMES)})
    torch.manual_seed(0)
    model = classification.build_model(config)
    meta = {"round": 1, "task": "classification", "config": config.to_public_dict()}
    return save_checkpoint(tmp_path / "model.safetensors", model_to_arrays(model), meta)


def test_label_thresholds_travel_with_the_checkpoint_into_predict(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, [0.01, 0.99, 0.5])
    config, _ = load_model(checkpoint)
    assert config.evaluation.label_thresholds == (0.01, 0.99, 0.5)
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20), np.uint8)).save(cases / f"x{i}.png")
    result = predict_cases(checkpoint, cases, tmp_path / "out")
    with result.table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == ["x0", "x1"]
    for row in rows:  # an untrained model's sigmoids sit near 0.5: over 0.01, under 0.99
        assert row["call_disc"] == "1" and row["call_ring"] == "0" and row["threshold_ring"] == "0.9900"
        assert row["findings"].split("|")[0] == "disc" and "ring" not in row["findings"]
        assert (tmp_path / "out" / f"{row['case']}_gradcam.png").is_file()


@pytest.mark.usefixtures("task_identity")
def test_one_round_dp_federation_with_multi_label(tmp_path: Path) -> None:
    nodes = {}
    for i, name in enumerate(["alpha", "beta"]):
        folder = write_site(tmp_path / "data" / name, synthetic_multilabel_site(i, 40, image_size=16, seed=3))
        nodes[i] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp_path / "state" / name)}
    config = _config(**{"run.rounds": 1, "data.class-names": list(NAMES), "evaluation.cross-site": False})
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert report["primary_metric"] == "auroc" and report["config"]["data"]["multi-label"] is True
    per_site = report["final"]["per_site"]["alpha"]
    assert {"auroc", "auroc_class_0", "sensitivity_class_2", "threshold_class_1"} <= set(per_site)
    chosen = report["final"]["operating_point"]["label_thresholds"]
    assert [per_site[f"threshold_class_{k}"] for k in range(3)] == pytest.approx(chosen)
    assert report["final"]["pooled"] and 0 <= report["final"]["pooled"]["auroc"] <= 1
    assert all(0 < p["epsilon"] <= p["budget"] + 1e-6 for p in report["privacy"].values())
    assert "Findings (multi-label)" in write_report(report, tmp_path / "out").read_text()
    meta = json.loads(RunFolder(tmp_path / "out").global_model.with_suffix(".json").read_text())
    assert meta["config"]["evaluation"]["label-thresholds"] == pytest.approx(chosen)
