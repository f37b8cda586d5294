"""Private training that stays useful on small sites: a public starting model (``medfed pretrain``,
``run.initial-model``) with its provenance in the report, training only biases and normalisation,
the image or the patient as the privacy unit, and fundus-like vessel phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from medfed.cli import app
from medfed.data.arrays import SiteArrays
from medfed.data.synthetic import synthetic_nuclei_site, synthetic_organ_site, synthetic_vessel_site
from medfed.federation import initial_model, run_federation
from medfed.pretrain import pretrain
from medfed.privacy import make_private
from medfed.tasks import get_task
from medfed.training import build_optimizer, train
from medfed.weights import load_checkpoint
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return pretrain(tiny_config(), tmp_path / "public.safetensors", epochs=1, samples_per_site=40)


def test_pretrained_checkpoint_records_where_it_came_from(checkpoint: Path) -> None:
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    provenance = meta["provenance"]
    assert meta["task"] == "classification" and provenance["patient_data"] is False
    assert provenance["data"].startswith("synthetic lesion phantoms: 3 simulated scanners x 40 images")
    assert provenance["steps"] > 0 and provenance["images"] > 0


def test_a_run_starts_from_the_public_model_and_its_report_says_so(
    checkpoint: Path, nodes: dict, tmp_path: Path, task_identity: None
) -> None:
    config = tiny_config(**{"run.rounds": 1, "run.initial-model": str(checkpoint)})
    state, _ = load_checkpoint(checkpoint)
    start = initial_model(config).state_dict()
    assert all(torch.equal(start[k], v) for k, v in state.items())
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert report["initial_model"]["file"] == "public.safetensors"
    assert report["initial_model"]["provenance"]["patient_data"] is False
    assert "Starting model" in (tmp_path / "out" / "report.html").read_text()


def test_a_checkpoint_of_another_model_is_refused_with_the_setting_to_fix(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="does not fit this run's model.*medfed pretrain --config"):
        initial_model(tiny_config(**{"run.initial-model": str(checkpoint), "model.width": 16}))
    with pytest.raises(ValueError, match="is a classification model"):
        initial_model(tiny_config(**{"run.initial-model": str(checkpoint), "run.task": "segmentation"}))
    with pytest.raises(ValueError, match="checkpoint not found"):
        initial_model(tiny_config(**{"run.initial-model": str(checkpoint.parent / "nope.safetensors")}))


def test_bias_norm_training_under_dp_leaves_the_weights_frozen() -> None:
    config = tiny_config(**{"train.trainable": "bias-norm"})
    task = get_task("classification")
    model = task.build_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, config.train)
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 28, 28), torch.randint(0, 2, (32,)))
    loader = torch.utils.data.DataLoader(
        [{"image": x, "label": y} for x, y in data], batch_size=16
    )  # fmt: skip
    model, optimizer, loader = make_private(model, optimizer, loader, 1.0, 1.0)
    train(task, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=3)
    after = model._module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".bias") or ".N." in k or "norm" in k.lower() for k in changed), changed
    assert any(k.endswith("conv.weight") for k in before) and not any(k.endswith("conv.weight") for k in changed)


def test_privacy_unit_is_the_patient_unless_the_image_is_asked_for() -> None:
    site = SiteArrays(
        np.arange(4 * 64, dtype=np.float32).reshape(4, 1, 8, 8), np.zeros(4, np.int64), np.array(["train"] * 4),
        np.array(["p1", "p1", "p2", "p3"]),
    )  # fmt: skip
    assert site.privacy_units("train")[0] == "patient" and len(site.privacy_units("train")[1]) == 3
    assert site.privacy_units("train", "image")[0] == "image" and len(site.privacy_units("train", "image")[1]) == 4


def test_vessel_phantoms_are_branching_trees_inside_the_field_of_view() -> None:
    site = synthetic_vessel_site(0, 4, 96, seed=1)
    again = synthetic_vessel_site(0, 4, 96, seed=1)
    assert np.array_equal(site.images, again.images) and np.array_equal(site.targets, again.targets)
    masks = site.targets[:, 0].astype(bool)
    assert 0.03 < masks.mean() < 0.2
    assert not masks[:, 0, :].any() or masks[:, 0, :].mean() < 0.05  # the corners lie outside the field of view
    vessel, background = site.images[:, 0][masks].mean(), site.images[:, 0][~masks].mean()
    assert vessel < background + 0.2  # drawn darker than the retina around them (shift may rescale)


@pytest.mark.parametrize("dims", [2, 3])
def test_nuclei_phantoms_are_many_small_blobs_of_each_class(dims: int) -> None:
    site = synthetic_nuclei_site(0, 3, 32, num_classes=3, seed=2, spatial_dims=dims)
    assert site.images.shape == (3, 1, *(32,) * dims) and site.targets.shape == site.images.shape
    assert set(np.unique(site.targets)) == {0, 1, 2}
    for mask in site.targets[:, 0]:
        blobs = ndimage.label(mask > 0)[1]
        assert blobs >= 3 and 0.01 < (mask > 0).mean() < 0.6  # several small nuclei, not one large region
    assert site.images[site.targets > 0].mean() < site.images[site.targets == 0].mean()  # stained darker


@pytest.mark.parametrize("dims", [2, 3])
def test_organ_phantoms_are_large_smooth_shapes_one_per_class(dims: int) -> None:
    site = synthetic_organ_site(1, 4, 32, num_classes=4, seed=2, spatial_dims=dims)
    assert site.images.shape == (4, 1, *(32,) * dims)
    for image, mask in zip(site.images[:, 0], site.targets[:, 0], strict=True):
        present = [k for k in (1, 2, 3) if (mask == k).any()]
        assert len(present) >= 2  # organs may hide one another where they overlap, rarely wholly
        for k in present:
            assert ndimage.label(mask == k)[1] <= 2  # one organ, perhaps cut by another
        means = [image[mask == k].mean() for k in present]
        assert np.std(means) > 0.02  # classes have their own intensities


def test_pretraining_on_nuclei_and_organ_phantoms(tmp_path: Path) -> None:
    config = tiny_config(**{"run.task": "segmentation", "data.image-size": 32, "data.num-classes": 3})
    for phantom in ("nuclei", "organs"):
        path = pretrain(config, tmp_path / f"{phantom}.safetensors", epochs=1, samples_per_site=12, phantom=phantom)
        provenance = json.loads(path.with_suffix(".json").read_text())["provenance"]
        assert provenance["data"].startswith(f"synthetic {'nucleus' if phantom == 'nuclei' else 'organ'} phantoms")
    with pytest.raises(ValueError, match="nuclei phantoms are segmentation data"):
        pretrain(tiny_config(), tmp_path / "x.safetensors", epochs=1, samples_per_site=12, phantom="nuclei")


def test_pretraining_a_detector_on_object_phantoms_of_sites_with_different_box_counts(tmp_path: Path) -> None:
    """Synthetic detection sites pad their boxes to their own most objects per image; pooled for
    pre-training they share batches all the same."""
    config = tiny_config(**{"run.task": "detection", "data.image-size": 32, "data.num-classes": 3})
    path = pretrain(config, tmp_path / "objects.safetensors", epochs=1, samples_per_site=12)
    provenance = json.loads(path.with_suffix(".json").read_text())["provenance"]
    assert provenance["data"].startswith("synthetic object phantoms") and provenance["images"] > 12


def test_cli_pretrain_writes_a_checkpoint_and_refuses_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "p.safetensors"
    args = ["pretrain", "--out", str(out), "--samples", "20", "--epochs", "1", "--set", "data.image-size=16",
            "--set", "model.width=8", "--set", "model.depth=2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "run.initial-model=" in result.output
    bad = runner.invoke(app, [*args, "--phantom", "vessels"])
    assert bad.exit_code == 2 and "vessel phantoms are 2D binary segmentation" in " ".join(bad.output.split())
    missing = runner.invoke(app, [*args, "--data", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "public site folder" in " ".join(missing.output.split())
    unknown = runner.invoke(app, [*args, "--optimizer", "lbfgs"])
    assert unknown.exit_code == 2 and "--optimizer" in unknown.output
    adam = runner.invoke(app, [*args, "--optimizer", "adam"])
    assert adam.exit_code == 0, adam.output
    recorded = json.loads(out.with_suffix(".json").read_text())["provenance"]["optimizer"]
    assert recorded["name"] == "adam" and recorded["lr"] == 2e-3 and recorded["momentum"] is None


def test_pretraining_is_repeatable(tmp_path: Path) -> None:
    """Random patches included: the same config and seed give the same starting model."""
    config = tiny_config(**{"run.task": "segmentation", "data.image-size": 32, "data.patch-size": 16})
    first, second = (
        load_checkpoint(pretrain(config, tmp_path / f"{name}.safetensors", epochs=1, samples_per_site=12))[0]
        for name in ("a", "b")
    )
    assert all(torch.allclose(first[k], second[k], atol=1e-5) for k in first)
