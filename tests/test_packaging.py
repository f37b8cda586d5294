"""A fresh editable install of the project prints no warning from its own packaging (setuptools
deprecations, editable-install notices): what `make install` shows a new user."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_editable_install_prints_no_packaging_warning(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    # as `make install` does: the pip of the day shows a build backend's warnings, older ones hid them
    subprocess.run([*pip, "--upgrade", "pip"], check=True, capture_output=True, timeout=600)
    result = subprocess.run(
        [*pip, "--no-deps", "-e", str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    # setuptools' messages are Python warnings (…Warning) or its "Editable install" notices
    noisy = [line for line in (result.stdout + result.stderr).splitlines() if "Warning" in line or "Editable" in line]
    assert not noisy, noisy
