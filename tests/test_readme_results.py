"""The README's results table is generated from benchmarks/results/*.json, never typed by hand."""

import importlib.util

from tests.conftest import REPO

# loaded by path: a dependency installs an unrelated top-level package named "benchmarks"
_spec = importlib.util.spec_from_file_location("readme_table", REPO / "benchmarks" / "readme_table.py")
readme_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_table)
updated = readme_table.updated


def test_readme_results_table_matches_the_result_files() -> None:
    readme = (REPO / "README.md").read_text()
    assert updated(readme) == readme, "run .venv/bin/python benchmarks/readme_table.py"


def test_the_table_has_a_row_per_measured_setting() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert "| [spine](benchmarks/results/spine.json) | PneumoniaMNIST, pooled, no DP |" in table
