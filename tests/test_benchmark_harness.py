"""The scoring the benchmarks and the cross-site protocol share (medfed.central,
medfed.evaluation.bootstrap): bootstrap intervals around the same number the evaluation loop
gives, paired resamples across models, the per-image shortcut for per-image metrics; and the
benchmarks' own harness (traffic per round)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from medfed import central
from medfed.data.synthetic import synthetic_segmentation_site, synthetic_site
from medfed.evaluation import bootstrap
from medfed.tasks import get_task
from medfed.training import evaluate
from tests.conftest import REPO, tiny_config

# loaded by path: a dependency installs an unrelated top-level package named "benchmarks"
_spec = importlib.util.spec_from_file_location("harness", REPO / "benchmarks" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("harness", harness)
_spec.loader.exec_module(harness)


@pytest.fixture
def classification() -> tuple:
    config = tiny_config(**{"train.local-epochs": 1, "run.rounds": 1})
    sites = {f"site-{i + 1}": synthetic_site(i, 120, seed=3) for i in range(2)}
    model, info = central.train_central(config, [sites["site-1"]], private=False)
    assert info["steps"] > 0 and info["noise_multiplier"] is None
    return config, sites, model


def test_bootstrap_value_is_the_evaluation_loop_metric_and_lies_in_its_interval(classification: tuple) -> None:
    config, sites, model = classification
    scores = bootstrap.bootstrap_scores(config, model, sites, replicates=100)
    for name, site in sites.items():
        expected = evaluate(get_task("classification"), model, site.split("test"), config, torch.device("cpu"))
        entry = scores["per_site"][name]
        assert entry["value"] == pytest.approx(expected["auroc"])
        assert entry["low"] <= entry["value"] <= entry["high"] and entry["high"] - entry["low"] > 0.01
        assert entry["n"] == int((site.splits == "test").sum()) and len(entry["draws"]) == 100
    assert scores["mean"]["value"] == pytest.approx(np.mean([e["value"] for e in scores["per_site"].values()]))
    assert "draws" not in str(bootstrap.without_draws(scores))


def test_two_models_on_one_site_see_the_same_resamples(classification: tuple) -> None:
    config, sites, model = classification
    other, _ = central.train_central(config, [sites["site-2"]], private=False)
    a = bootstrap.bootstrap_scores(config, model, sites, replicates=50)["mean"]
    same = bootstrap.bootstrap_scores(config, model, sites, replicates=50)["mean"]
    b = bootstrap.bootstrap_scores(config, other, sites, replicates=50)["mean"]
    assert bootstrap.paired_ratio(a, same) == {"value": 1.0, "low": 1.0, "high": 1.0}
    ratio = bootstrap.paired_ratio(b, a)
    assert ratio["low"] <= ratio["value"] <= ratio["high"]


def test_segmentation_dice_is_bootstrapped_from_per_image_values() -> None:
    config = tiny_config(
        **{"run.task": "segmentation", "data.image-size": 32, "train.local-epochs": 2, "model.depth": 2}
    )
    site = synthetic_segmentation_site(0, 60, 32, 2, seed=2)
    model, _ = central.train_central(config, [site], private=False)
    entry = bootstrap.bootstrap_scores(config, model, {"a": site}, replicates=50)["per_site"]["a"]
    expected = evaluate(get_task("segmentation"), model, site.split("test"), config, torch.device("cpu"))["dice"]
    assert entry["value"] == pytest.approx(expected, abs=1e-6)
    assert entry["low"] <= entry["value"] <= entry["high"]


def test_per_round_traffic_is_in_float32_models() -> None:
    report = {"rounds": [
        {"round": 0, "seconds": 1.0, "local_seconds": {}, "bytes_down": 300, "bytes_up": 0, "sites_aggregated": []},
        {"round": 1, "seconds": 4.0, "local_seconds": {"a": 1.0, "b": 2.0}, "bytes_down": 600, "bytes_up": 300,
         "sites_aggregated": ["a", "b"]},
    ]}  # fmt: skip
    rows = harness.per_round(report, sites=3, model=100)
    assert rows[0]["wall_over_local"] is None
    assert rows[1]["wall_over_local"] == 2.0
    assert rows[1]["down_models_per_site"] == 2.0 and rows[1]["up_models_per_site"] == 1.0


@pytest.mark.parametrize("task_name", ["classification", "detection"])
def test_resampled_metrics_equal_metrics_over_the_resampled_cases(task_name: str) -> None:
    """A bootstrap draw from the filled accumulator is the same as scoring the drawn cases afresh."""
    from medfed.data.synthetic import synthetic_detection_site

    config = tiny_config(**{"run.task": task_name, "data.image-size": 32, "data.num-classes": 2})
    site = (
        synthetic_site(0, 80, 32, seed=5)
        if task_name == "classification"
        else synthetic_detection_site(0, 80, 32, 2, 5)
    )
    task = get_task(task_name)
    torch.manual_seed(0)
    predictions, targets = bootstrap._predictions(task, task.build_model(config), site.split("test"), config)
    filled = task.metrics(config)
    filled.update(predictions, targets)
    draw = np.random.default_rng(0).integers(0, len(predictions), len(predictions))
    fresh = task.metrics(config)
    fresh.update(predictions[draw], {k: v[draw] for k, v in targets.items()})
    expected, got = fresh.compute(), filled.resampled(draw).compute()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key


def test_central_training_with_dp_reports_the_guarantee_it_calibrated_for() -> None:
    config = tiny_config(**{"run.rounds": 1, "privacy.target-epsilon": 4.0})
    site = synthetic_site(0, 60, seed=1)
    _, info = central.train_central(config, [site, synthetic_site(1, 60, seed=1)], private=True)
    assert info["noise_multiplier"] > 0 and info["epsilon"] == pytest.approx(4.0, rel=0.05)
    assert info["delta"] == pytest.approx(1 / (10 * info["units"]))
