"""The mask-conditioned generator of 2D segmentation: shapes, conditioning on the mask, the generated
pairs (the site's own masks in new layouts, scarce classes first), DP charging of its steps in the
site's ledger and refusal past the budget, the report section, and the clear refusal of what it
does not support (3D, detection)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import ConfigError
from medfed.data import load_simulated_site
from medfed.evaluation.report import write_report
from medfed.federation import run_federation
from medfed.generative import MaskConditionalDiffusion, generator_config, sample, synthetic_masks, with_synthetic
from medfed.in_process import InProcessGrid
from medfed.privacy import PrivacyLedger, make_private
from medfed.site import Site, _Refused, _with_synthetic
from medfed.tasks import get_task
from medfed.training import build_optimizer, train
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEGMENTATION = {"run.task": "segmentation", "data.image-size": 16, "data.samples-per-site": 24,
                "train.synthetic-augmentation": 1.0, "train.synthetic-steps": 2}  # fmt: skip


def _layouts(mask: np.ndarray) -> list[np.ndarray]:
    """The eight flips and quarter turns of a square 2D mask."""
    turns = [np.rot90(mask, k) for k in range(4)]
    return turns + [np.fliplr(t) for t in turns]


def test_mask_generator_shapes_and_mask_conditioning() -> None:
    config = generator_config(tiny_config(**SEGMENTATION))
    assert config.model.name == "ddpm-mask" and config.run.task == "generation"
    model = get_task("generation").build_model(config)
    assert isinstance(model, MaskConditionalDiffusion)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: MONAI starts the output layer at zero, whatever the input
        for param in model.parameters():
            param.normal_(0, 0.2)
    images = torch.rand(3, 1, 16, 16)
    masks = torch.zeros(3, 1, 16, 16, dtype=torch.long)
    masks[:, :, 4:9, 4:9] = 1
    masks[2, :, :2] = -1  # outside the field of view: no class
    batch = {"image": images, "mask": masks}
    assert get_task("generation").forward(model, batch).shape == (3,)
    drawn = sample(model, masks, 16, steps=2, seed=0)
    assert drawn.shape == (3, 1, 16, 16) and 0 <= float(drawn.min()) <= float(drawn.max()) <= 1
    assert torch.equal(drawn, sample(model, masks, 16, steps=2, seed=0))  # seeded
    other = sample(model, torch.ones_like(masks), 16, steps=2, seed=0)
    assert not torch.equal(drawn, other)  # the mask counts, at the same noise
    with pytest.raises(ValueError, match="ddpm-mask"):
        model(images)  # no mask: no federated class scores


def test_mask_generator_takes_a_dp_step_on_segmentation_samples() -> None:
    config = generator_config(tiny_config(**{**SEGMENTATION, "data.channels": 3}))
    task = get_task("generation")
    model = task.build_model(config)
    assert ModuleValidator.validate(model, strict=False) == []
    before = [p.detach().clone() for p in model.parameters()]
    data = load_simulated_site(config.with_overrides({"run.task": "segmentation", "model.name": ""}), 0)[1]
    loader = DataLoader(data.split("train"), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape[1] == 3 and "mask" in batch
    private, optimizer, _ = make_private(model, build_optimizer(model, config.train), loader, 1.0, 1.0)
    stats = train(task, private, [batch], optimizer, torch.device("cpu"), epochs=1)
    assert stats.steps == 1 and stats.examples == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_generated_pairs_reuse_the_sites_masks_in_new_layouts() -> None:
    masks = np.zeros((10, 1, 8, 8), dtype=np.int64)
    masks[:2, 0, 1:3, 1:4] = 1  # 2 masks with the structure, 8 without
    out, source = synthetic_masks(masks, 2, ratio=1.0, seed=0)
    assert len(out) == 10 and out.dtype == masks.dtype
    assert (out.reshape(10, -1).max(axis=1) == 1).sum() == 8  # the scarce group first, as for classes
    for mask, i in zip(out, source, strict=True):
        assert any(np.array_equal(mask[0], layout) for layout in _layouts(masks[i, 0]))
    assert len({m.tobytes() for m in out[out.reshape(10, -1).max(axis=1) == 1]}) > 2  # new layouts, not copies
    config = tiny_config(**SEGMENTATION)
    site = load_simulated_site(config, 0)[1]
    train = site.splits == "train"
    spacing = np.full((3, 2), 0.5, dtype=np.float32)
    mixed = with_synthetic(site, np.zeros((3, 1, 16, 16), np.float32), site.targets[train][:3], spacing)
    assert len(mixed.split("train")) == len(site.split("train")) + 3 and mixed.target_key == "mask"
    assert mixed.spacing is not None and np.array_equal(mixed.spacing[-3:], spacing)


def test_synthetic_augmentation_refuses_what_it_does_not_support() -> None:
    for unsupported in ({"run.task": "detection"}, {"run.task": "instance-segmentation"},
                        {"run.task": "segmentation", "data.spatial-dims": 3}):  # fmt: skip
        with pytest.raises(ConfigError, match="train.synthetic-augmentation") as err:
            tiny_config(**{**SEGMENTATION, **unsupported})
        assert "'segmentation', with data.spatial-dims = 2" in str(err.value)
    with pytest.raises(ConfigError, match="data.patch-size"):
        tiny_config(**{**SEGMENTATION, "data.image-size": 32, "data.patch-size": 15})
    patches = generator_config(tiny_config(**{**SEGMENTATION, "data.image-size": 32, "data.patch-size": 16}))
    assert get_task("generation").train_transform(patches) is not None  # learns on the run's patches


def test_segmentation_site_charges_its_generator_and_refuses_past_the_budget(tmp_path: Path) -> None:
    # privacy.target-epsilon 2 (the generator 1): larger noise, whose calibration is quicker than at ε = 8
    config = tiny_config(**SEGMENTATION, **{"privacy.target-epsilon": 2.0})
    data = load_simulated_site(config, 0)[1]
    state = tmp_path / "state"
    poor = Site("alpha", data, state, budget=0.5, seed_secret="test")
    with pytest.raises(_Refused, match="generator"):
        _with_synthetic(poor, config, "run-1")
    assert PrivacyLedger.open(state, 0.0).history == []  # refused before anything was charged
    site, synthetic = _with_synthetic(Site("alpha", data, state, budget=3.0, seed_secret="test"), config, "run-1")
    ledger = PrivacyLedger.open(state, 0.0)
    assert [entry[2] for entry in ledger.history] == [2]  # the generator's 2 DP-SGD steps, charged
    assert synthetic.private and synthetic.epsilon == pytest.approx(ledger.epsilon())
    assert 0 < ledger.epsilon() <= 1.0 + 0.01  # half of privacy.target-epsilon
    real = int((data.splits == "train").sum())
    assert synthetic.images == real and len(site.data.split("train")) == 2 * real  # R = 1
    added = site.data.targets[len(data.targets) :]
    assert added.shape == (real, 1, 16, 16) and sum(synthetic.per_class) == real
    again, _ = _with_synthetic(Site("alpha", data, state, budget=3.0, seed_secret="test"), config, "run-1")
    assert np.array_equal(again.data.images, site.data.images)  # kept from the first round: drawn once
    assert len(PrivacyLedger.open(state, 0.0).history) == 1  # and charged once


@pytest.mark.usefixtures("task_identity")
def test_federated_segmentation_with_generated_pairs_reports_them(tmp_path: Path) -> None:
    config = tiny_config(**SEGMENTATION, **{"privacy.enabled": False, "run.rounds": 1, "train.local-steps": 1,
                                            "evaluation.cross-site": False, "evaluation.example-images": 0})  # fmt: skip
    grid = InProcessGrid({i: {"partition-id": i} for i in range(config.data.sites)})
    report = run_federation(grid, config, tmp_path / "run")
    sites = report["synthetic"]["sites"]
    assert len(sites) == 2 and all(not e["private"] and e["images"] > 0 for e in sites.values())
    html = write_report(report, tmp_path / "run").read_text()
    assert "mask-conditioned image generator" in html and "trained without DP" in html


def test_generate_trains_a_mask_generator_on_a_segmentation_site(tmp_path: Path) -> None:
    config = tmp_path / "generation-masks.toml"
    config.write_text(
        '[run]\nname = "gen-masks"\ntask = "generation"\nrounds = 1\n'
        "[data]\nsamples-per-site = 24\nimage-size = 16\n"
        '[model]\nname = "ddpm-mask"\nwidth = 8\n[train]\nlocal-steps = 2\nbatch-size = 8\n'
        "[privacy]\nenabled = false\n"
    )
    out = tmp_path / "out"
    base = ["generate", str(config), "--out", str(out), "--sample-steps", "2"]
    result = CliRunner().invoke(app, [*base, "--ratio", "0.5"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert (out / "samples.png").is_file() and "WITHOUT DP" in " ".join(result.output.split())
    synthetic = np.load(out / "synthetic.npz")
    assert synthetic["images"].shape == synthetic["masks"].shape and synthetic["masks"].shape[1:] == (1, 16, 16)
    result = CliRunner().invoke(app, [*base, "--checkpoint", str(out / "generator.safetensors")])
    assert result.exit_code != 0 and "ddpm-mask" in result.output
