"""The Flower-native path: `flwr run .` on a local simulation SuperLink (slow: about a minute)."""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_flwr_run_writes_the_report(tmp_path) -> None:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    overrides = f'overrides="run.rounds=1;evaluation.cross-site=false" out-dir="{tmp_path / "out"}"'
    result = subprocess.run(
        [str(REPO / "deploy" / "flwr-local-simulation.sh"), "--run-config", overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sites"] == ["site-1", "site-2", "site-3"]
    assert [r["round"] for r in report["rounds"]] == [0, 1]
