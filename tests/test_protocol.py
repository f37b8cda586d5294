"""The cross-site protocol (medfed.protocol, ``medfed simulate --protocol cross-site``): its report
schema, leaving a site out of a simulation without changing the others' data, and the CLI's refusals.

The fast tests run each federation over an in-process transport (the real server loop and site
logic, no Ray); one slow test runs the whole protocol through the CLI and Flower's simulation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import Config, ConfigError
from medfed.data import load_simulated_site, simulated_site_names, write_site
from medfed.data.synthetic import synthetic_site
from medfed.federation import run_federation
from medfed.protocol import run_cross_site_protocol
from tests.conftest import REPO, tiny_config
from tests.test_federation import InProcessGrid

runner = CliRunner()
CONFIG = str(REPO / "configs" / "classification-synthetic.toml")
CELL = {"value", "low", "high", "n"}


def _in_process(config: Config, out: Path) -> dict[str, Any]:
    """One simulated federation without Ray: each site is the simulated site of its partition id."""
    nodes = {i: {"partition-id": i} for i in range(len(simulated_site_names(config)))}
    return run_federation(InProcessGrid(nodes), config, out)


def _tiny(**overrides: object) -> Config:
    return tiny_config(
        **{"data.sites": 3, "data.samples-per-site": 60, "run.rounds": 1, "privacy.enabled": False} | overrides
    )


@pytest.fixture(scope="module")
def protocol(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    out = tmp_path_factory.mktemp("protocol")
    report = run_cross_site_protocol(_tiny(**{"data.image-size": 16}), out, replicates=10, federate=_in_process)
    return report, out


def _check_cell(cell: dict[str, Any]) -> None:
    assert set(cell) == CELL and cell["n"] > 0
    assert cell["low"] <= cell["value"] <= cell["high"]


def test_report_schema(protocol: tuple[dict[str, Any], Path]) -> None:
    report, out = protocol
    sites = ["site-1", "site-2", "site-3"]
    assert report["protocol"] == "cross-site" and report["task"] == "classification" and report["metric"] == "auroc"
    assert report["sites"] == sites
    assert report["models"] == ["local:site-1", "local:site-2", "local:site-3", "fedavg", "pooled"]
    assert report["federated"] == "fedavg"
    assert len(report["matrix"]) == 5 and all(len(row) == 3 for row in report["matrix"])
    for row in report["matrix"]:
        for cell in row:
            _check_cell(cell)
    assert set(report["leave_one_site_out"]) == set(sites)
    for cell in report["leave_one_site_out"].values():
        _check_cell(cell)
    assert set(report["gap"]) == set(report["models"])
    for model, gap in report["gap"].items():
        assert gap["gap"] == pytest.approx(gap["own"] - gap["other"]), model
    local = report["gap"]["local:site-2"]
    assert local["own"] == report["matrix"][1][1]["value"]
    assert local["other"] == pytest.approx((report["matrix"][1][0]["value"] + report["matrix"][1][2]["value"]) / 2)
    loso = np.mean([c["value"] for c in report["leave_one_site_out"].values()])
    assert report["gap"]["fedavg"]["other"] == pytest.approx(loso)
    assert report["gap"]["fedavg"]["own"] == pytest.approx(np.mean([c["value"] for c in report["matrix"][3]]))
    assert report["runs"] == {"fedavg": "fedavg/report.json"} | {
        f"without:{s}": f"without-{s}/report.json" for s in sites
    }
    for path in report["runs"].values():
        assert (out / path).is_file()
    # each LOSO federation trained without its site, and its site never reported in it
    assert json.loads((out / "without-site-2" / "report.json").read_text())["sites"] == ["site-1", "site-3"]
    assert report["privacy"] == {} and not report["config"]["data"]["leave-out"]
    assert (out / "plots" / "cross_site_protocol.png").stat().st_size > 1000
    assert "without the site (LOSO)" in (out / "protocol.html").read_text()
    assert json.loads((out / "protocol.json").read_text())["models"] == report["models"]


def test_report_holds_aggregates_only(protocol: tuple[dict[str, Any], Path]) -> None:
    """No per-case values, no resample draws in the written report: every list is a list of
    names or a row of cells, and every number is a value, an interval bound, a count or a setting."""
    _, out = protocol
    text = (out / "protocol.json").read_text()
    assert "draws" not in text

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list) and key not in ("matrix", ""):
            assert len(value) <= 10, key  # names, short settings: never one entry per case

    walk(json.loads(text))


def test_leave_out_keeps_the_other_sites_data_identical() -> None:
    config = _tiny(**{"data.sites": 4})
    without = config.with_overrides({"data.leave-out": ["site-2"]})
    assert simulated_site_names(without) == ["site-1", "site-3", "site-4"]
    for index, name in enumerate(simulated_site_names(without)):
        _, expected = load_simulated_site(config, ["site-1", "site-2", "site-3", "site-4"].index(name))
        got_name, got = load_simulated_site(without, index)
        assert got_name == name
        assert np.array_equal(got.images, expected.images) and np.array_equal(got.targets, expected.targets)
        assert np.array_equal(got.splits, expected.splits)


def test_leave_out_keeps_a_dirichlet_partition(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 120), ("val", 60), ("test", 60)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.repeat([[0], [1]], n // 2, axis=0)
    np.savez(tmp_path / "tiny.npz", **arrays)
    config = _tiny(
        **{"data.source": "medmnist", "data.path": str(tmp_path / "tiny.npz"), "data.partitioner": "dirichlet"}
    )
    full = {name: site for name, site in (load_simulated_site(config, i) for i in range(3))}
    without = config.with_overrides({"data.leave-out": ["site-1"]})
    for index in range(2):
        name, site = load_simulated_site(without, index)
        assert name in ("site-2", "site-3")
        assert np.array_equal(site.images, full[name].images) and np.array_equal(site.splits, full[name].splits)


def test_leave_out_of_site_folders(tmp_path: Path) -> None:
    for i, name in enumerate(["basel", "bern", "zurich"]):
        write_site(tmp_path / name, synthetic_site(i, 30, seed=2))
    config = _tiny(**{"data.source": "sites", "data.path": str(tmp_path), "data.leave-out": ["bern"]})
    assert simulated_site_names(config) == ["basel", "zurich"]
    assert load_simulated_site(config, 1)[0] == "zurich"


@pytest.mark.parametrize(
    ("leave_out", "message"),
    [
        (["site-9"], "'site-9'.*does not give"),
        (["site-1", "site-2"], "fewer than run.min-sites"),
    ],
)
def test_leave_out_refuses_unknown_sites_and_too_few_left(leave_out: list[str], message: str) -> None:
    config = _tiny(**{"data.leave-out": leave_out})
    with pytest.raises(ConfigError, match=message) as raised:
        simulated_site_names(config)
    assert raised.value.key == "data.leave-out"
    if "site-9" in leave_out:
        assert "'site-1', 'site-2', 'site-3'" in str(raised.value)


def test_leave_out_values_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="data.leave-out"):
        _tiny(**{"data.leave-out": ["site-1", "site-1"]})
    with pytest.raises(ConfigError, match="data.leave-out"):
        _tiny(**{"data.leave-out": "site-1"})
    with pytest.raises(ConfigError, match="data.leave-out"):
        _tiny(**{"data.leave-out": ["a\x1b[2Jb"]})


@pytest.mark.parametrize(
    ("args", "code", "keyword"),
    [
        (["--protocol", "crosssite"], 2, "cross-site"),
        (["--protocol", "cross-site", "--sites", "2"], 2, "at least 3 sites"),
        (["--protocol", "cross-site", "--resume"], 2, "--resume"),
        (["--protocol", "cross-site", "--state-dir", "ledgers"], 2, "--state-dir"),
        (["--protocol", "cross-site", "--replicates", "3"], 2, "--replicates"),
    ],
)
def test_cli_refuses_what_the_protocol_cannot_run(args: list[str], code: int, keyword: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", CONFIG, "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == code, result.output
    assert keyword in " ".join(result.output.split())
    assert not (tmp_path / "out" / "protocol.json").exists()


def test_cli_prints_the_protocol_summary(
    protocol: tuple[dict[str, Any], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's path from options to summary (the protocol itself stands in: see test_report_schema)."""
    import medfed.protocol

    report, _ = protocol
    calls = []

    def stand_in(config: Config, out: Path, replicates: int, federate: object) -> dict[str, Any]:
        calls.append((config, replicates))
        medfed.protocol.write_protocol_report(report, out)
        return report

    monkeypatch.setattr(medfed.protocol, "run_cross_site_protocol", stand_in)
    out = tmp_path / "out"
    args = ["simulate", CONFIG, "--protocol", "cross-site", "--replicates", "20", "--out", str(out), "--rounds", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls[0][1] == 20 and calls[0][0].run.rounds == 1
    assert "LOSO" in result.output and "local:site-1" in result.output and "fedavg" in result.output
    assert (out / "protocol.json").is_file()


@pytest.mark.slow
def test_cli_runs_the_protocol_in_flower_simulation(tmp_path: Path) -> None:
    """The whole protocol as a researcher runs it: four Flower simulations (Ray), DP on."""
    out = tmp_path / "out"
    args = ["simulate", CONFIG, "--protocol", "cross-site", "--replicates", "20", "--out", str(out),
            "--set", "data.samples-per-site=60", "--rounds", "1", "--set", "privacy.target-epsilon=30",
            "--set", "model.width=8", "--set", "model.depth=2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "protocol.json").read_text())
    assert report["sites"] == ["site-1", "site-2", "site-3"] and not math.isnan(report["gap"]["pooled"]["gap"])
    assert set(report["privacy"]["models"]) == {*report["models"], *(f"without:{s}" for s in report["sites"])}
    for site, total in report["privacy"]["total"].items():
        # its local model, the federation, the two LOSO runs it is in, pooled: ε = 30 each at most
        assert 30 < total["epsilon"] <= 5 * 30 + 1e-6, site


def test_generalization_benchmark_reads_the_protocol_report(
    protocol: tuple[dict[str, Any], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/generalization.py lays the protocol's report out as its results file, which its
    plot and the README table read (the protocol itself stands in, as above)."""
    import importlib.util
    import sys

    modules = {}
    for name in ("harness", "generalization", "readme_table"):
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, modules[name])
        spec.loader.exec_module(modules[name])
    generalization = modules["generalization"]
    report, _ = protocol
    monkeypatch.setattr(generalization, "run_cross_site_protocol", lambda *_: report)
    result = generalization.run_dataset("synthetic", _tiny(), tmp_path, 10)
    assert len(result["local_matrix"]["values"]) == 3 and set(result["loso_at_held_out_site"]) == set(report["sites"])
    assert result["loso_gap"] == report["gap"]["fedavg"]["gap"]
    assert result["local_gap"] == pytest.approx(
        np.mean([report["gap"][f"local:{s}"]["own"] - report["gap"][f"local:{s}"]["other"] for s in report["sites"]])
    )
    generalization.plot({"synthetic": result}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    rows = list(modules["readme_table"].FORMATS["generalization"]({"datasets": {"synthetic": result}}))
    assert len(rows) == 2 and all("nan" not in row[2] for row in rows)


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_segmentation_protocol(tmp_path: Path) -> None:
    """Every task: Dice per image, bootstrapped per image (about 35 s on 2 busy cores)."""
    config = _tiny(**{"run.task": "segmentation", "data.image-size": 16, "data.samples-per-site": 40})
    report = run_cross_site_protocol(config, tmp_path, replicates=10, federate=_in_process)
    assert report["metric"] == "dice" and len(report["matrix"]) == 5
    for cell in [*(c for row in report["matrix"] for c in row), *report["leave_one_site_out"].values()]:
        _check_cell(cell)
    assert (tmp_path / "plots" / "cross_site_protocol.png").is_file()
