"""The class-conditional generator: shapes, conditioning, the class-balancing mix, DP charging of its
steps in the site's ledger and refusal past the budget (``medfed generate``), and the federated
generator's sample grids in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import ConfigError
from medfed.data import load_simulated_site
from medfed.evaluation.report import write_report
from medfed.federation import run_federation
from medfed.generative import generator_config, sample, synthetic_counts, with_synthetic
from medfed.in_process import InProcessGrid
from medfed.privacy import PrivacyLedger
from medfed.tasks import get_task
from tests.conftest import tiny_config

TINY = {"run.task": "generation", "data.image-size": 16, "data.samples-per-site": 24, "model.width": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_generator_shapes_and_class_conditioning() -> None:
    config = tiny_config(**TINY)
    model = get_task("generation").build_model(config)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: MONAI starts the output layer at zero, whatever the class
        for param in model.parameters():
            param.normal_(0, 0.2)
    images = torch.rand(3, 1, 16, 16)
    assert model(images, torch.tensor([0, 1, 0])).shape == (3,)
    model.eval()
    scores = model(images)  # every class, at fixed noise: repeatable
    assert scores.shape == (3, 2) and torch.equal(scores, model(images))
    drawn = sample(model, torch.tensor([0, 0, 1, 1]), 16, steps=2, seed=0)
    assert drawn.shape == (4, 1, 16, 16) and 0 <= float(drawn.min()) <= float(drawn.max()) <= 1
    same_noise = sample(model, torch.tensor([1, 1, 1, 1]), 16, steps=2, seed=0)
    assert torch.equal(drawn[2:], same_noise[2:]) and not torch.equal(drawn[:2], same_noise[:2])  # the class counts


def test_generated_images_go_to_the_scarce_classes_first() -> None:
    counts = synthetic_counts(np.array([0] * 2 + [1] * 8), 2, ratio=1.0)
    assert counts.tolist() == [8, 2]  # 6 to even the classes, then alternately
    config = tiny_config(**TINY)
    site = load_simulated_site(config, 0)[1]
    mixed = with_synthetic(site, np.zeros((5, 1, 16, 16), np.float32), np.array([0, 0, 0, 1, 1]))
    assert len(mixed.split("train")) == len(site.split("train")) + 5
    assert len(mixed.split("test")) == len(site.split("test"))


def test_generation_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="train.augment"):
        tiny_config(**TINY, **{"train.augment": True})
    with pytest.raises(ConfigError, match="model.width"):
        tiny_config(**{**TINY, "model.width": 6})


def _generate(tmp_path: Path, *options: str) -> tuple[int, str]:
    config = tmp_path / "generation.toml"
    config.write_text(
        '[run]\nname = "gen"\ntask = "generation"\nrounds = 1\n'
        "[data]\nsamples-per-site = 24\nimage-size = 16\n"
        "[model]\nwidth = 8\n[train]\nlocal-steps = 2\nbatch-size = 8\n"
        "[privacy]\ntarget-epsilon = 2.0\nbudget = 3.0\n"
    )
    args = ["generate", str(config), "--out", str(tmp_path / "out"), "--sample-steps", "2", *options]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


def test_generate_charges_the_site_ledger_and_refuses_past_its_budget(tmp_path: Path) -> None:
    code, output = _generate(tmp_path, "--ratio", "0.5")
    assert code == 0, output
    out = tmp_path / "out"
    assert (out / "samples.png").is_file() and (out / "generator.safetensors").is_file()
    ledger = PrivacyLedger.open(out / "state", 0.0)
    assert [entry[2] for entry in ledger.history] == [2]  # the generator's 2 DP-SGD steps, charged
    spent = ledger.epsilon()
    assert 0 < spent <= 2.0 + 0.01
    assert json.loads((out / "generator.json").read_text())["generator"]["epsilon"] == pytest.approx(spent)
    synthetic = np.load(out / "synthetic.npz")
    assert len(synthetic["images"]) == len(synthetic["labels"]) > 0
    code, output = _generate(tmp_path, "--set", "run.name=second", "--budget", "2.5")
    assert code == 1 and "refuses" in output and "budget" in output
    assert PrivacyLedger.open(out / "state", 0.0).epsilon() == pytest.approx(spent)  # nothing more charged


@pytest.mark.usefixtures("task_identity")
def test_federated_generator_shows_its_samples_per_round(nodes: dict, tmp_path: Path) -> None:
    config = tiny_config(**TINY, **{"run.rounds": 1, "train.local-steps": 1, "evaluation.cross-site": False,
                                    "evaluation.example-images": 0})  # fmt: skip
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "run")
    assert report["task"] == "generation" and report["primary_metric"] == "denoising-error"
    assert all(0 < p["epsilon"] <= 8.0 for p in report["privacy"].values())  # DP-SGD at every site
    report["round_figures"] = get_task("generation").round_figures(config, tmp_path / "run")
    assert list(report["round_figures"]) == ["round 1"]
    html = write_report(report, tmp_path / "run").read_text()
    assert "Generated samples per round" in html and "samples-round-001.png" in html


# privacy.target-epsilon 2 (the generator 1): larger noise, whose calibration is quicker than at ε = 8
MIXED = {"data.image-size": 16, "run.rounds": 1, "train.local-steps": 1, "evaluation.cross-site": False,
         "evaluation.example-images": 0, "train.synthetic-augmentation": 0.5, "train.synthetic-steps": 2,
         "privacy.target-epsilon": 2.0}  # fmt: skip


def _train_labels(node: dict) -> np.ndarray:
    from medfed.data.manifest import SiteReading, read_site

    site = read_site(Path(node["data-path"]), SiteReading.from_config(tiny_config(**MIXED).data, "label"))
    return site.targets[site.splits == "train"]


@pytest.mark.usefixtures("task_identity")
def test_synthetic_augmentation_charges_the_generator_and_refuses_past_the_budget(nodes: dict, tmp_path: Path) -> None:
    poor = nodes[10] | {"privacy-budget": 0.5}  # alpha: less than the generator's ε = 1
    config = tiny_config(**MIXED)
    report = run_federation(InProcessGrid({**nodes, 10: poor}), config, tmp_path / "run")
    synthetic = report["synthetic"]
    assert synthetic["ratio"] == 0.5 and set(synthetic["sites"]) == {"beta", "gamma"}
    assert PrivacyLedger.open(poor["state-dir"], 0.0).epsilon() == 0.0  # refused before anything was charged
    assert any("generator" in note for note in report["site_notes"].get("alpha", []))
    for node in (nodes[11], nodes[12]):
        entry, labels = synthetic["sites"][node["site-name"]], _train_labels(node)
        assert entry["images"] == round(0.5 * len(labels))  # the mixing ratio
        assert entry["per_class"] == synthetic_counts(labels, 2, 0.5).tolist()  # the scarce class first
        assert entry["private"] and entry["steps"] == 2 and 0 < entry["epsilon"] <= 1.0 + 0.01  # half of ε = 2
        ledger = PrivacyLedger.open(node["state-dir"], 0.0)
        assert ledger.history[0][2] == 2  # the generator's steps, charged first
        spent = report["privacy"][node["site-name"]]["epsilon"]
        assert entry["epsilon"] < spent == pytest.approx(ledger.epsilon()) and spent <= 2.0 + 0.01  # together: ε = 2
    html = write_report(report, tmp_path / "run").read_text()
    assert "Generated training images" in html and "DP-SGD" in html


@pytest.mark.usefixtures("task_identity")
def test_synthetic_augmentation_without_dp_says_what_it_means(tmp_path: Path) -> None:
    config = tiny_config(**MIXED, **{"privacy.enabled": False, "data.samples-per-site": 40})
    grid = InProcessGrid({i: {"partition-id": i} for i in range(config.data.sites)})
    report = run_federation(grid, config, tmp_path / "run")
    assert report["privacy"] == {} and all(not e["private"] and e["epsilon"] is None
                                           for e in report["synthetic"]["sites"].values())  # fmt: skip
    assert all(e["images"] > 0 for e in report["synthetic"]["sites"].values())
    html = write_report(report, tmp_path / "run").read_text()
    assert "trained without DP" in html


def test_synthetic_augmentation_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="train.synthetic-augmentation"):
        tiny_config(**{"run.task": "detection", "train.synthetic-augmentation": 1.0})
    with pytest.raises(ConfigError, match="train.synthetic-epsilon"):
        tiny_config(**{"train.synthetic-augmentation": 1.0, "train.synthetic-epsilon": 8.0})
    generator = generator_config(tiny_config(**{"train.synthetic-augmentation": 1.0, "train.synthetic-steps": 7}))
    assert generator.run.task == "generation" and generator.train.local_steps == 7
    assert generator.privacy.target_epsilon == 4.0 and generator.train.optimizer == "adam"
