"""The names of a run's files: they are what users, scripts and the README point at, so they stay put."""

from __future__ import annotations

from pathlib import Path

from medfed.run_folder import ProtocolFolder, RunFolder


def test_a_run_folder_names_every_file_as_documented() -> None:
    run = RunFolder(Path("out"))
    assert run.report_json == Path("out/report.json")
    assert run.report_html == Path("out/report.html")
    assert run.plots == Path("out/plots")
    assert run.checkpoints == Path("out/checkpoints")
    assert run.global_model == Path("out/checkpoints/global.safetensors")
    assert run.round_model(3) == Path("out/checkpoints/round-003.safetensors")
    assert run.round_model(12, ema=True) == Path("out/checkpoints/round-012-ema.safetensors")
    assert run.round_model(1000) == Path("out/checkpoints/round-1000.safetensors")
    assert run.progress == Path("out/checkpoints/progress.json")
    assert run.strategy_state == Path("out/checkpoints/strategy.safetensors")
    assert run.site_states == Path("out/state")
    assert run.tracking_state == Path("out/checkpoints/tracking.json")
    assert run.mlflow_store == Path("out/mlflow.db")
    assert run.mlflow_artifacts == Path("out/mlflow-artifacts")
    assert run.tensorboard == Path("out/tensorboard")


def test_a_protocol_folder_holds_its_report_and_one_run_folder_per_federation() -> None:
    protocol = ProtocolFolder(Path("out"))
    assert protocol.protocol_json == Path("out/protocol.json")
    assert protocol.protocol_html == Path("out/protocol.html")
    assert protocol.plots == Path("out/plots")
    assert protocol.run("without-north") == RunFolder(Path("out/without-north"))
    assert protocol.run("fedavg").report_json == Path("out/fedavg/report.json")
