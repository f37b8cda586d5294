"""The privacy planner: the numbers a site will use before it trains, and a warning when the noise
is too large for the model to learn."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import MessageType
from typer.testing import CliRunner

from medfed import wire
from medfed.cli import app
from medfed.privacy import NOISE_HOPELESS, PrivacyLedger, plan_privacy
from medfed.site import handle_train
from tests.conftest import REPO, tiny_config
from tests.test_site import _node, _request


def test_plan_spends_the_target_over_the_run_and_grows_round_by_round() -> None:
    plan = plan_privacy(1570, 128, 5, 8.0, local_epochs=3)
    assert (plan.batch_size, plan.steps_per_round, plan.run_steps) == (128, 39, 195)
    assert plan.sample_rate == pytest.approx(1 / 13)
    eps = plan.epsilon_after_round
    assert len(eps) == 5 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] == pytest.approx(8.0, abs=0.05)
    assert plan.noise_per_batch == pytest.approx(plan.noise_multiplier / 128)
    assert plan.warnings() == []


def test_local_only_models_take_half_the_run_and_a_small_site_gets_a_warning() -> None:
    plan = plan_privacy(20, 8, 25, 8.0, local_steps=20, runs_per_round=2)
    assert plan.run_steps == 1000 and plan.epsilon_after_round[-1] < 8.0
    assert plan.noise_per_batch > NOISE_HOPELESS
    (warning,) = plan.warnings()
    assert "unlikely to help" in warning and "train.batch-size" in warning
    assert any(line.startswith("WARNING") for line in plan.lines())
    assert "local-only" in plan.lines()[0]


def test_the_site_uses_the_plan_and_logs_it_once_per_run(
    site_dir: Path, tmp_path: Path, caplog, task_identity: None
) -> None:
    config = tiny_config()
    node = _node(site_dir, tmp_path)
    with caplog.at_level(logging.INFO, logger="medfed"):
        reply = handle_train(_request(config, MessageType.TRAIN), node, run_id=3)
        handle_train(_request(config, MessageType.TRAIN, **{wire.SERVER_ROUND: 2}), node, run_id=3)
    metrics = reply.content["metrics"]
    n = int(metrics["num-examples"])
    plan = plan_privacy(
        n,
        config.train.batch_size,
        config.run.rounds,
        config.privacy.target_epsilon,
        local_epochs=config.train.local_epochs,
        runs_per_round=2,
    )
    assert metrics["noise-multiplier"] == pytest.approx(plan.noise_multiplier)
    assert metrics["sample-rate"] == pytest.approx(plan.sample_rate)
    assert caplog.text.count("privacy plan for this run") == 1
    assert f"σ = {plan.noise_multiplier:.3f}" in caplog.text
    ledger = PrivacyLedger.open(Path(node["state-dir"]), plan.delta)
    assert ledger.epsilon() == pytest.approx(plan.epsilon_after_round[1], rel=1e-6)


def test_cli_plan_reads_a_config_and_offers_larger_batches() -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["privacy", "plan", "--site-size", "73", "--config", str(REPO / "configs" / "detection-bccd.toml"),
         "--no-cross-site"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "σ = 1.707" in result.output and "WARNING" in result.output
    assert "larger batches" in result.output and "64" in result.output
    bad = runner.invoke(app, ["privacy", "plan", "--site-size", "0"])
    assert bad.exit_code == 2 and "--site-size" in bad.output
