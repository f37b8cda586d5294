"""run.tracking: a tiny 2-site federation followed in MLflow and in TensorBoard, read back with each
tool's own reader (through a crash and --resume); settings refused up front; a tracker that fails
never ends a run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medfed import tracking
from medfed.config import Config, ConfigError
from medfed.federation import run_federation
from medfed.run_folder import RunFolder
from medfed.simulation import simulate
from tests.conftest import tiny_config
from tests.test_fault_tolerance import CrashingGrid, ServerCrash
from tests.test_federation import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def two_sites(nodes: dict) -> dict:
    """Two sites; beta's privacy budget is too small for one round, so it refuses every round."""
    two = {node: entry for node, entry in nodes.items() if node in (10, 11)}
    two[11]["privacy-budget"] = 0.05
    return two


def _config(**overrides: object) -> Config:
    return tiny_config(**{"run.rounds": 2, "run.min-sites": 1, "evaluation.cross-site": False, **overrides})


def _crash_then_resume(sites: dict, config: Config, out: Path) -> dict:
    """Run until the server dies before round 2, then resume to the end: the finished report."""
    with pytest.raises(ServerCrash):
        run_federation(CrashingGrid(sites, crash_round=2), config, out)
    return run_federation(InProcessGrid(sites), config, out, resume=True)


def test_mlflow_gets_every_round_the_config_and_the_artifacts_through_a_resume(two_sites: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = _crash_then_resume(two_sites, _config(**{"run.tracking": "mlflow"}), out)

    client = MlflowClient(f"sqlite:///{RunFolder(out).mlflow_store}")
    experiment = client.get_experiment_by_name("medfed")
    assert experiment is not None and experiment.artifact_location == RunFolder(out).mlflow_artifacts.as_uri()
    [run] = client.search_runs([experiment.experiment_id])  # the resumed run went on logging to the same run
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    run_id = run.info.run_id

    def steps(key: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, key)]

    assert steps("round/seconds") == [0, 1, 2]  # each round once, none logged twice by the resume
    assert steps("val/alpha/auroc") == steps("val/beta/loss") == [0, 1, 2]
    assert steps("epsilon/alpha") == steps("local_seconds/alpha") == [1, 2]
    metrics = run.data.metrics  # the last value of each
    assert metrics["round/bytes_up"] == report["rounds"][2]["bytes_up"] > 0
    assert metrics["round/bytes_down"] == report["rounds"][2]["bytes_down"]
    assert metrics["epsilon/alpha"] == pytest.approx(report["privacy"]["alpha"]["epsilon"])
    assert metrics["sites/answered"] == metrics["sites/aggregated"] == 1  # alpha
    assert metrics["sites/refused"] == 1 and metrics["sites/rejected"] == 0  # beta
    assert metrics["test/alpha/loss"] == pytest.approx(report["final"]["per_site"]["alpha"]["loss"])
    assert "epsilon/beta" in metrics and "local_seconds/beta" not in metrics

    params = run.data.params
    assert params["run.tracking"] == "mlflow" and params["run.rounds"] == "2" and params["train.batch-size"] == "16"
    assert params["data.path"] == report["config"]["data"]["path"]  # as the report has it: no full path
    assert len(params) > 50

    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.json", "report.html", "plots", "checkpoints"} <= listed
    checkpoints = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/global.safetensors", "checkpoints/global.json"}


def test_tensorboard_gets_every_round_and_the_config_through_a_resume(two_sites: dict, tmp_path: Path) -> None:
    out, log_dir = tmp_path / "run", tmp_path / "tb"
    report = _crash_then_resume(
        two_sites, _config(**{"run.tracking": "tensorboard", "run.tracking-uri": str(log_dir)}), out
    )

    assert not RunFolder(out).tensorboard.exists()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()
    assert "config/text_summary" in tags["tensors"]
    # the round the crash interrupted is written again by the resumed run, and shown once
    assert [e.step for e in events.Scalars("round/seconds")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("val/alpha/auroc")] == [0, 1, 2]
    last = {key: events.Scalars(key)[-1].value for key in tags["scalars"]}
    assert last["round/bytes_up"] == report["rounds"][2]["bytes_up"] > 0
    assert last["sites/aggregated"] == 1 and last["sites/refused"] == 1
    assert last["epsilon/alpha"] == pytest.approx(report["privacy"]["alpha"]["epsilon"])
    assert last["test/alpha/loss"] == pytest.approx(report["final"]["per_site"]["alpha"]["loss"], rel=1e-6)
    config_text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert '"tracking": "tensorboard"' in config_text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"run.tracking": "wandb"}, "one of ['none', 'mlflow', 'tensorboard']"),
        ({"run.tracking-uri": "sqlite:///x.db"}, "no value with run.tracking = 'none'"),
        ({"run.tracking": "mlflow", "run.tracking-uri": "ftp://host/store"}, "sqlite:///PATH/mlflow.db"),
        ({"run.tracking": "mlflow", "run.tracking-uri": "file:///tmp/mlruns"}, "no longer writes a folder store"),
        ({"run.tracking": "mlflow", "run.tracking-uri": "sqlite://"}, "three slashes"),
        ({"run.tracking": "mlflow", "run.tracking-uri": "https://:8080"}, "a server's address"),
        ({"run.tracking": "mlflow", "run.tracking-uri": "http://host:99999"}, "a server's address"),
        ({"run.tracking": "mlflow", "run.tracking-uri": "https://host/?token=1"}, "without '?query'"),
        ({"run.tracking": "tensorboard", "run.tracking-uri": "http://host/logs"}, "a log folder"),
        ({"run.tracking": "tensorboard", "run.tracking-uri": "logs\nmore"}, "without control characters"),
    ],
)
def test_bad_tracking_settings_are_refused_naming_the_key(overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match="run.tracking") as err:
        Config().with_overrides(overrides)
    assert expected in str(err.value)


def test_credentials_in_the_tracking_uri_are_refused_and_not_shown() -> None:
    with pytest.raises(ConfigError, match="run.tracking-uri") as err:
        Config().with_overrides({"run.tracking": "mlflow", "run.tracking-uri": "https://me:s3cret@mlflow.example.org"})
    assert "MLFLOW_TRACKING_PASSWORD" in str(err.value) and "s3cret" not in str(err.value)


def test_good_tracking_settings_are_taken() -> None:
    for tracking_name, uri in [
        ("mlflow", "sqlite:////srv/mlflow/mlflow.db"),
        ("mlflow", "https://mlflow.example.org:5000/team"),
        ("tensorboard", "runs/tensorboard"),
        ("tensorboard", "file:///srv/tensorboard"),
    ]:
        assert Config().with_overrides({"run.tracking": tracking_name, "run.tracking-uri": uri}).run.tracking_uri == uri


def test_tracking_without_the_extra_is_refused_before_the_run(
    nodes: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(tracking._PACKAGES, "mlflow", "medfed_no_such_package")  # as if MLflow were not installed
    config = _config(**{"run.tracking": "mlflow"})
    for start in (
        lambda: simulate(config, tmp_path / "sim"),
        lambda: run_federation(InProcessGrid(nodes), config, tmp_path / "fed"),
    ):
        with pytest.raises(ConfigError, match="run.tracking") as err:
            start()
        assert "pip install 'medfed[tracking]'" in str(err.value)
    assert not (tmp_path / "fed" / "report.json").exists()


def test_a_tracker_that_fails_warns_once_and_the_run_goes_on(
    two_sites: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    in_the_way = tmp_path / "not-a-folder"
    in_the_way.write_text("TensorBoard cannot make its log folder here")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for uri, name in [(str(in_the_way / "tb"), "tensorboard"), ("http://127.0.0.1:9", "mlflow")]:
        caplog.clear()
        config = _config(**{"run.tracking": name, "run.tracking-uri": uri, "run.rounds": 1})
        with caplog.at_level(logging.WARNING, logger="medfed.tracking"):
            report = run_federation(InProcessGrid(two_sites), config, tmp_path / name)
        assert [r["round"] for r in report["rounds"]] == [0, 1]
        assert RunFolder(tmp_path / name).report_json.is_file()
        warnings = [r.getMessage() for r in caplog.records if r.name == "medfed.tracking"]
        assert len(warnings) == 1 and "the run goes on without tracking" in warnings[0]
