"""Following a run: `medfed status` on a finished run, on a run caught between two rounds, on
folders that are not run folders; report.html rewritten after every round, marked running; the
progress lines a command prints when its output is not a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from typer.testing import CliRunner

from medfed import progress
from medfed.cli import app
from medfed.data import write_site
from medfed.data.synthetic import synthetic_site
from medfed.federation import run_federation
from medfed.run_folder import RunFolder
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid

runner = CliRunner()
SITES = ["alpha", "beta", "gamma"]


def _status(folder: Path, *more: str) -> dict[str, Any]:
    result = runner.invoke(app, ["status", str(folder), "--json", *more])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.splitlines()[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-round run of 3 in-process sites, gamma's updates poisoned; the run folder is copied, and
    its status and report.html read, while round 2 trains."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    root = tmp_path_factory.mktemp("status")
    nodes = {}
    for i, name in enumerate(SITES):
        folder = write_site(root / "data" / name, synthetic_site(i, 60, seed=4))
        nodes[10 + i] = {"data-path": str(folder), "site-name": name, "state-dir": str(root / "state" / name)}
    out, mid_run = root / "run", root / "mid-run"
    seen: dict[str, Any] = {"train_replies": 0}

    def during_training(node: int, reply: Message) -> None:
        seen["train_replies"] += 1
        if seen["train_replies"] == len(SITES) + 1:  # the first reply of round 2
            shutil.copytree(out, mid_run)
            seen["status"] = _status(out)
            seen["html"] = RunFolder(out).report_html.read_text()
        if node == 12 and "arrays" in reply.content:
            state = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in state.items()})

    config = tiny_config(**{"evaluation.cross-site": False, "run.name": "status [test]"})
    run_federation(InProcessGrid(nodes, during_training), config, out)
    return {"out": out, "mid_run": mid_run, **seen}


def test_status_of_a_finished_run(run: dict[str, Any]) -> None:
    status = _status(run["out"])
    assert status["state"] == "finished" and status["name"] == "status [test]"
    assert (status["round"], status["rounds"]) == (2, 2) and status["seconds_left"] is None
    assert status["primary_metric"] == "auroc" and status["seconds_per_round"] > 0
    sites = {s["site"]: s for s in status["sites"]}
    assert list(sites) == SITES
    assert sites["gamma"]["outcome"] == "rejected" and not sites["gamma"]["aggregated"]
    for name in ("alpha", "beta"):
        site = sites[name]
        assert site["outcome"] == "answered" and site["aggregated"] and site["local_seconds"] > 0
        assert 0 < site["epsilon"] <= site["budget"]
        assert 0 <= site["metric"] <= 1 and 0 <= site["test_metric"] <= 1


def test_status_between_two_rounds_says_running(run: dict[str, Any]) -> None:
    status = run["status"]
    assert status["state"] == "running" and (status["round"], status["rounds"]) == (1, 2)
    assert status["seconds_left"] == pytest.approx(status["seconds_per_round"]) and status["seconds_left"] > 0
    assert [s["site"] for s in status["sites"]] == SITES
    assert all(s["test_metric"] is None for s in status["sites"])
    assert _status(run["mid_run"])["state"] == "running"  # the copy, read later: still the round-1 state


def test_report_html_is_marked_running_after_round_1_and_replaced_by_the_final_one(run: dict[str, Any]) -> None:
    page = run["html"]
    assert "id='running'" in page and "round 1 of 2 done" in page and "http-equiv='refresh'" in page
    # round 1's model is scored with round 2's request: while round 2 trains, round 0 is the latest scored
    assert "after round 0 on each site's validation split" in page and "status [test]" in page
    final = RunFolder(run["out"]).report_html.read_text()
    assert "id='running'" not in final and "http-equiv" not in final and "test split" in final
    assert not (run["mid_run"] / "report.json").exists()  # a running report writes no report.json


def test_status_prints_whole_lines_when_not_a_terminal(run: dict[str, Any]) -> None:
    result = runner.invoke(app, ["status", str(run["out"])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "round 2 of 2, finished" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == SITES  # one line per site


def test_follow_ends_when_the_run_finishes(run: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run["mid_run"], folder)
    report = RunFolder(folder).report_json

    def finish() -> None:
        time.sleep(1.0)
        shutil.copy(RunFolder(run["out"]).report_json, report)
        os.utime(report)  # newer than the progress file: the run is over

    writer = threading.Thread(target=finish)
    writer.start()
    result = runner.invoke(app, ["status", str(folder), "--follow", "--interval", "0.2", "--json"])
    writer.join()
    assert result.exit_code == 0, result.output
    states = [json.loads(line)["state"] for line in result.output.splitlines()]
    assert states == ["running", "finished"]  # one line per change, then the command ends


def test_a_started_run_without_a_round_is_starting(tmp_path: Path) -> None:
    RunFolder(tmp_path).checkpoints.mkdir()
    assert _status(tmp_path)["state"] == "starting"


def _progress_of(run: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(RunFolder(run["mid_run"]).progress.read_text())
    return result


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "not a folder"),
        ("a file", "not a folder"),
        ("empty", "not a run folder"),
        ("garbage", "progress.json: not JSON"),
        ("cut short", "progress.json: not JSON"),
        ("a list", "progress.json: a JSON list, not an object"),
        ("no config", "progress.json: 'config' is missing"),
        ("bad config", "progress.json: its 'config' is not a medfed config (run.rounds = -3"),
        ("no rounds", "progress.json: 'rounds' is not a list of round entries"),
        ("bad rounds", "progress.json: 'rounds' is not a list of round entries"),
        ("bad values", ""),  # read: values of the wrong kind show as unknown
        ("report garbage", "report.json: not JSON"),
        ("report without config", "report.json: 'config' has no [run]"),
    ],
)
def test_a_folder_that_is_not_a_run_is_refused_clearly(
    run: dict[str, Any], tmp_path: Path, case: str, expected: str
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run["mid_run"], folder)
    files = RunFolder(folder)
    text = files.progress.read_text()
    progress_doc = _progress_of(run)
    written = {
        "garbage": "\x00\xff not json",
        "cut short": text[: len(text) // 2],
        "a list": "[1, 2]",
        "no config": json.dumps({**progress_doc, "config": None}),
        "bad config": json.dumps({**progress_doc, "config": json.dumps({"run": {"rounds": -3}})}),
        "no rounds": json.dumps({**progress_doc, "rounds": []}),
        "bad rounds": json.dumps({**progress_doc, "rounds": [{"round": "one"}]}),
        "bad values": json.dumps(
            {
                **progress_doc,
                "privacy": {"alpha": [1], "beta": {"epsilon": "lots"}},
                "rounds": [{"round": 1, "seconds": "x", "metrics": {"alpha": 3}, "sites_aggregated": 7}],
            }
        ),
    }
    if case in written:
        files.progress.write_text(written[case])
    elif case.startswith("report"):
        report = {} if case == "report without config" else None
        files.report_json.write_text("{{{" if report is None else json.dumps(report))
    elif case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "a file":
        folder = tmp_path / "file.txt"
        folder.write_text("x")
    elif case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    result = runner.invoke(app, ["status", str(folder), "--json"])
    assert "Traceback" not in result.output
    if not expected:
        assert result.exit_code == 0, result.output
        assert {s["site"]: s["epsilon"] for s in json.loads(result.output)["sites"]} == {"alpha": None, "beta": None}
        return
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_plain_progress_lines_come_only_for_a_long_step(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=40)
    with progress.steps(console, "quick"):
        pass
    assert out.getvalue() == ""  # a quick step leaves a command's output as it was
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.05)
    with progress.steps(console, "cases", 4) as counter:
        for _ in progress.tracked(range(4), counter):
            time.sleep(0.03)
        counter.update(4, "writing the table")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("cases: ") and "s left" in " ".join(lines)
    assert lines[-2].startswith("writing the table: 4/4") and lines[-1].startswith("writing the table: 4/4 (done in")


def test_the_bar_prints_flower_log_lines_above_itself() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    flower = logging.getLogger("flwr")
    handler = logging.StreamHandler(io.StringIO())
    before = handler.stream
    flower.addHandler(handler)
    try:
        with progress.steps(console, "rounds", 2) as counter:
            flower.error("a flower line")
            counter.advance(2)
    finally:
        flower.removeHandler(handler)
    assert handler.stream is before and "a flower line" not in before.getvalue()
    assert "a flower line" in out.getvalue() and "2/2" in out.getvalue()


def test_a_progress_file_of_an_earlier_medfed_names_its_metric_through_the_task(
    run: dict[str, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run["mid_run"], folder)
    doc = _progress_of(run)
    del doc["primary_metric"]
    RunFolder(folder).progress.write_text(json.dumps(doc))
    assert _status(folder)["primary_metric"] == "auroc"


def test_site_names_print_as_written_without_terminal_control(run: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run["mid_run"], folder)
    doc = _progress_of(run)
    name = "[bold]x\x1b[2J"
    doc["rounds"][-1]["metrics"] = {name: {"auroc": 0.5}}
    RunFolder(folder).progress.write_text(json.dumps(doc))
    result = runner.invoke(app, ["status", str(folder)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "[bold]x\\x1b[2J:" in result.output
