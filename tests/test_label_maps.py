"""Sites with different label sets: a site's label map (label-map.toml), its refusals, the masked
cross-entropy and marginal loss at sites that label only some classes, their metrics (n/a for
the classes they do not label) and a federation with one partially labelled site."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from medfed.central import train_central, union
from medfed.cli import app
from medfed.data import DataError, PrivacyUnitDataset, read_site, write_site
from medfed.data.label_map import LABEL_MAP, read_label_map, write_label_map
from medfed.data.manifest import SiteReading
from medfed.data.preflight import problem_kind, run_preflight
from medfed.data.synthetic import drop_classes, synthetic_segmentation_site, synthetic_site
from medfed.federation import run_federation
from medfed.privacy import make_private
from medfed.site import seed_everything
from medfed.tasks import classification, seeded_train_transform, segmentation
from medfed.training import build_optimizer, evaluate, train
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid

NAMES = ("background", "liver", "spleen")
runner = CliRunner()


def _map(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LABEL_MAP).write_text(text, encoding="utf-8")
    return folder


def _mask_site(folder: Path, values: list[int], label_map: str | None) -> Path:
    """A 2-image segmentation site whose masks hold ``values`` (one square each) on 8x8 images."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = ["image,mask,split"]
    for i, value in enumerate(values):
        image = np.full((8, 8), 40 * (i + 1), np.uint8)
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:5] = value
        Image.fromarray(image).save(folder / f"images/{i}.png")
        Image.fromarray(mask).save(folder / f"masks/{i}.png")
        rows.append(f"images/{i}.png,masks/{i}.png,train")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    if label_map is not None:
        _map(folder, label_map)
    return folder


def test_a_map_names_classes_by_name_or_index(tmp_path: Path) -> None:
    folder = _map(tmp_path, '[labels]\n"0" = "background"\n"7" = 1\n"9" = "liver"\n')
    label_map = read_label_map(folder, 3, NAMES, "mask")
    assert label_map is not None
    assert label_map.values == {"0": 0, "7": 1, "9": 1}  # two site values may stand for one class
    assert label_map.labelled == (0, 1)
    assert label_map.lines(NAMES)[-1] == "not labelled here: spleen (2)"
    assert read_label_map(tmp_path / "elsewhere", 3, NAMES, "mask") is None  # no file: every class, as indices


@pytest.mark.parametrize(
    ("text", "target", "reason"),
    [
        ('[labels]\n"0" = "background"\n"1" = "kidney"\n', "mask", "unknown class name 'kidney'"),
        ('[labels]\n"0" = 0\n"1" = 1\n"01" = 2\n', "mask", "mapped twice"),
        ('[labels]\n"0" = 0\n" 1" = 1\n"1" = 2\n', "label", "mapped twice"),
        ('[labels]\n"0" = 0\n"1" = 3\n', "mask", "out of range"),
        ('[labels]\n"0" = 0\n"1" = 1.5\n', "mask", "expected a class name"),
        ('[labels]\n"0" = 0\n"1" = true\n', "mask", "expected a class name"),
        ('[labels]\n"0" = 0\n"liver" = 1\n', "mask", "expected an integer mask value"),
        ('[labels]\n"0" = 0\n"-3" = 1\n', "mask", "expected an integer in"),
        ('[labels]\n"1" = 1\n', "mask", "class 0 (background)"),
        ('[labels\n"0" = 0\n', "mask", "not a readable UTF-8 TOML"),
        ('"0" = 0\n', "mask", "found keys ['0']"),
        ("[labels]\n", "mask", "non-empty [labels]"),
        ('[labels]\n"0" = 0\n', "boxes", "not boxes"),
    ],
)
def test_a_bad_map_is_refused_naming_the_file_and_entry(tmp_path: Path, text: str, target: str, reason: str) -> None:
    folder = _map(tmp_path / "site", text)
    with pytest.raises(DataError) as caught:
        read_label_map(folder, 3, NAMES, target)
    message = str(caught.value)
    assert LABEL_MAP in message and reason in message
    assert all(problem_kind(p) == "bad label map" for p in caught.value.problems)


def test_a_map_that_is_not_utf8_or_too_large_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / LABEL_MAP).write_bytes(b"\xff\xfe[labels]")
    with pytest.raises(DataError, match="not a readable UTF-8 TOML"):
        read_label_map(folder, 3, NAMES, "mask")
    (folder / LABEL_MAP).write_bytes(b"[labels]\n" + b"#" * 2_000_000)
    with pytest.raises(DataError, match="expected a small TOML file"):
        read_label_map(folder, 3, NAMES, "mask")


def test_mask_values_are_translated_and_unlabelled_classes_recorded(tmp_path: Path) -> None:
    folder = _mask_site(tmp_path / "site", [7, 0], '[labels]\n"0" = "background"\n"7" = "spleen"\n')
    site = read_site(folder, SiteReading(8, 3, "mask", class_names=NAMES))
    assert sorted(np.unique(site.targets).tolist()) == [0, 2]
    assert site.labelled is not None and site.labelled.tolist() == [True, False, True]
    sample = site.split("train")[0]
    assert sample["labelled"].tolist() == [True, False, True]
    checked = run_preflight(folder, SiteReading(8, 3, "mask", class_names=NAMES))
    assert checked.label_map is not None and checked.label_map.labelled == (0, 2)
    assert not any("never occur" in w.reason for w in checked.warnings)  # class 1 is unlabelled, not missing


def test_a_mask_value_not_in_the_map_names_the_file_and_value(tmp_path: Path) -> None:
    folder = _mask_site(tmp_path / "site", [7, 5], '[labels]\n"0" = 0\n"7" = 2\n')
    with pytest.raises(DataError) as caught:
        read_site(folder, SiteReading(8, 3, "mask"))
    (problem,) = caught.value.problems
    assert problem.where == "manifest.csv line 3" and "masks/1.png" in problem.reason and "[5]" in problem.reason
    assert LABEL_MAP in problem.reason and problem_kind(problem) == "value not in the site's label map"


def test_manifest_labels_go_through_the_map_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    folder = write_site(tmp_path / "site", synthetic_site(0, 12, 8, 3, seed=1))
    rows = (folder / "manifest.csv").read_text().splitlines()
    cells = [row.split(",") for row in rows[1:]]
    words = {"0": "normal", "1": "pneumonia", "2": "covid"}
    for cell in cells:
        cell[1] = words[cell[1]]
    (folder / "manifest.csv").write_text("\n".join([rows[0], *(",".join(c) for c in cells)]) + "\n")
    _map(folder, '[labels]\n"normal" = 0\npneumonia = 1\ncovid = 2\n')
    site = read_site(folder, SiteReading(8, 3, "label"))
    assert site.labelled is None  # a map that labels every class only renames
    assert site.targets.tolist() == [int(c[1] == "pneumonia") + 2 * int(c[1] == "covid") for c in cells]
    _map(folder, '[labels]\n"normal" = 0\npneumonia = 1\n')
    with pytest.raises(DataError) as caught:
        read_site(folder, SiteReading(8, 3, "label"))
    assert all("'covid' is not in label-map.toml" in p.reason for p in caught.value.problems)


def test_written_sites_keep_the_classes_they_label(tmp_path: Path) -> None:
    site = drop_classes(synthetic_segmentation_site(0, 20, 16, 3, seed=2), [2], 3)
    assert not (site.targets == 2).any()
    back = read_site(write_site(tmp_path / "site", site), SiteReading(16, 3, "mask"))
    assert back.labelled is not None and back.labelled.tolist() == [True, True, False]
    labels = drop_classes(synthetic_site(0, 30, 8, 3, seed=2), [1], 3)
    assert 1 not in labels.targets and labels.labelled is not None and labels.labelled.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="background"):
        drop_classes(site, [0], 3)
    write_label_map(tmp_path, {"0": 'back"ground'})
    assert read_label_map(tmp_path, 2, ('back"ground', "x"), "label") is not None


def test_pooled_sites_keep_each_sample_s_labelled_classes() -> None:
    full = synthetic_site(0, 20, 8, 3, seed=1)
    partial = drop_classes(synthetic_site(1, 20, 8, 3, seed=1), [2], 3)
    pooled = union([full, partial])
    assert pooled.labelled is not None and pooled.labelled.shape == (len(pooled.targets), 3)
    train = pooled.split("train")
    rows = {tuple(train[i]["labelled"].tolist()) for i in range(len(train))}
    assert rows == {(True, True, True), (True, True, False)}
    assert pooled.subset(pooled.splits == "test").labelled.shape[0] == int((pooled.splits == "test").sum())


def test_synth_writes_hospitals_that_leave_a_class_unlabelled(tmp_path: Path) -> None:
    out = tmp_path / "sites"
    args = ["data", "synth", "--out", str(out), "--task", "segmentation", "--sites", "2", "--samples", "12",
            "--image-size", "16", "--num-classes", "3"]  # fmt: skip
    assert runner.invoke(app, [*args, "--unlabelled", "2:2"]).exit_code == 0
    assert (out / "hospital-2" / LABEL_MAP).is_file() and not (out / "hospital-1" / LABEL_MAP).exists()
    check = ["data", "check", str(out / "hospital-2"), "--task", "segmentation", "--num-classes", "3",
             "--image-size", "16"]  # fmt: skip
    assert runner.invoke(app, check).exit_code == 0
    for bad in ("2:0", "3:1", "x", "1:1"):  # background, no hospital 3, not SITE:CLASS, hospital 1 left 1 class
        extra = ["--unlabelled", "1:2"] if bad == "1:1" else []
        assert runner.invoke(app, [*args, "--unlabelled", bad, *extra]).exit_code == 2


def test_masked_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    labels = torch.tensor([0, 2])
    labelled = torch.tensor([[True, True, False], [True, False, True]])
    first = -(1.0 - math.log(math.exp(1.0) + math.exp(2.0)))  # class 2 is not in the softmax
    second = -(4.0 - math.log(math.exp(0.5) + math.exp(4.0)))
    got = classification.loss(logits, {"label": labels, "labelled": labelled})
    assert got.item() == pytest.approx((first + second) / 2, rel=1e-6)
    every = torch.ones_like(labelled)
    plain = classification.loss(logits, {"label": labels})
    assert classification.loss(logits, {"label": labels, "labelled": every}).item() == pytest.approx(plain.item())


def test_marginal_loss_by_hand() -> None:
    """Two pixels, three classes; the site labels background and class 1. Pixel 0 is class 1,
    pixel 1 background-or-class-2: its probability is p0 + p2."""
    logits = torch.tensor([[[[2.0, 0.0]], [[1.0, 0.0]], [[0.0, 3.0]]]])  # (B=1, K=3, 1, 2)
    mask = torch.tensor([[[[1, 0]]]])
    labelled = torch.tensor([[True, True, False]])
    p = torch.softmax(logits, dim=1)[0, :, 0].numpy().astype(float)  # (3, 2)
    merged = np.stack([p[0] + p[2], p[1]])  # background-or-unlabelled, class 1
    cross_entropy = -(math.log(merged[1, 0]) + math.log(merged[0, 1])) / 2
    truth = np.array([[0.0, 1.0], [1.0, 0.0]])
    dice = [1 - (2 * (merged[c] * truth[c]).sum() + 1e-5) / (merged[c].sum() + truth[c].sum() + 1e-5) for c in (0, 1)]
    expected = np.mean(dice) + cross_entropy
    got = segmentation.loss(logits, {"mask": mask, "labelled": labelled})
    assert got.item() == pytest.approx(expected, rel=1e-5)
    plain = segmentation.loss(logits, {"mask": mask})  # class 2's high score at pixel 1 is penalised here
    assert plain.item() > got.item() + 0.5


def test_marginal_loss_with_every_class_labelled_is_dice_plus_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 8, 8, requires_grad=True)
    mask = torch.randint(0, 3, (3, 1, 8, 8))
    every = torch.ones(3, 3, dtype=torch.bool)
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)(logits, mask)
    assert segmentation.marginal_loss(logits, mask, every).item() == pytest.approx(expected.item(), rel=1e-5)
    partial = segmentation.marginal_loss(
        logits, mask.masked_fill(mask == 2, 0), every.index_fill(1, torch.tensor([2]), False)
    )
    partial.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    single = [segmentation.marginal_loss(logits[i : i + 1], mask[i : i + 1], every[:1]) for i in range(3)]
    assert float(sum(single).detach() / 3) == pytest.approx(expected.item(), rel=1e-5)  # per image, as DP needs


def test_metrics_leave_unlabelled_classes_out() -> None:
    truth = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    truth[..., 1:4, 1:4] = 1
    predictions = truth.clone()
    predictions[..., 5:7, 5:7] = 2  # class 2 where the site says background: it may be class 2
    batch = {"mask": truth, "labelled": torch.tensor([[True, True, False]])}
    accumulator = segmentation.SegmentationMetrics(3)
    accumulator.update(predictions, batch)
    out = accumulator.compute()
    assert out["dice_class_1"] == pytest.approx(1.0) and math.isnan(out["dice_class_2"])
    assert out["dice"] == pytest.approx(1.0) and out["dice_pooled"] == pytest.approx(1.0)
    assert (out["labelled_class_1"], out["labelled_class_2"]) == (1.0, 0.0)
    probs = torch.tensor([[0.2, 0.1, 0.7], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])
    scores = classification.ClassificationMetrics(3)
    scores.update(probs, {"label": labels, "labelled": torch.tensor([[True, True, False]] * 4)})
    result = scores.compute()
    assert result["accuracy"] == 1.0 and result["specificity"] == 1.0  # class 2's probability is left out
    assert math.isnan(result["auroc_class_2"]) and result["labelled_class_2"] == 0.0


def test_dp_sgd_trains_a_partially_labelled_site_with_views() -> None:
    """Opacus' Poisson loader and per-sample clipping carry each sample's labelled classes (two
    random patches per image: the views are flattened with them)."""
    config = tiny_config(**{"run.task": "segmentation", "data.num-classes": 3, "data.image-size": 16,
                            "data.patch-size": 8, "train.augmentations": 2})  # fmt: skip
    site = drop_classes(synthetic_segmentation_site(0, 20, 16, 3, seed=1), [2], 3)
    transform = seeded_train_transform(segmentation, config, 0)
    units = site.privacy_units("train")[1]
    data = PrivacyUnitDataset(site.split("train"), units, transform, views=2)
    model = segmentation.build_model(config)
    optimizer = build_optimizer(model, config.train)
    model, optimizer, loader = make_private(model, optimizer, DataLoader(data, batch_size=8), 1.0, 1.0)
    stats = train(segmentation, model, loader, optimizer, torch.device("cpu"), epochs=1, max_steps=2, views=2)
    assert stats.steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.usefixtures("task_identity")
def test_a_federation_with_a_partially_labelled_site(tmp_path: Path) -> None:
    nodes = {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        site = synthetic_segmentation_site(i, 24, 16, 3, seed=3)
        site = drop_classes(site, [2], 3) if name == "gamma" else site
        folder = write_site(tmp_path / "data" / name, site)
        nodes[10 + i] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp_path / "state" / name),
                         "allow-training-without-privacy": True}  # fmt: skip
    config = tiny_config(
        **{"run.task": "segmentation", "run.rounds": 1, "data.num-classes": 3, "data.image-size": 16,
           "evaluation.cross-site": False, "evaluation.example-images": 0, "train.batch-size": 8,
           "privacy.enabled": False}
    )  # fmt: skip
    report = run_federation(InProcessGrid(nodes), config, tmp_path / "out")
    assert report["rounds"][1]["sites_aggregated"] == ["alpha", "beta", "gamma"]
    final = json.loads((tmp_path / "out" / "report.json").read_text())["final"]["per_site"]
    assert final["gamma"]["labelled_class_2"] == 0.0 and final["gamma"]["dice_class_2"] is None
    assert "labelled_class_2" not in final["alpha"]  # a site that labels every class says nothing more
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Classes each site labels" in page and "n/a: not labelled" in page


@pytest.mark.slow
def test_the_marginal_loss_learns_a_structure_one_site_does_not_label() -> None:
    """3 synthetic sites pooled, site 3 outlining structure 1 only (structure 2 painted as
    background). Plain Dice + cross-entropy teaches structure 2 as background there; the marginal
    loss does not, so structure 2 is learned from the other two sites. Scored on site 3's hidden
    full labels and on the other sites (2-4 minutes on 2 shared CPU cores; measured: Dice
    of structure 2 at site 3, 0.02 plain vs 0.25 marginal)."""
    config = tiny_config(
        **{"run.task": "segmentation", "run.rounds": 1, "data.num-classes": 3, "data.image-size": 16,
           "model.input-norm": True, "train.lr": 0.6, "train.momentum": 0.5, "train.local-epochs": 8,
           "privacy.enabled": False}
    )  # fmt: skip
    sites = [synthetic_segmentation_site(i, 60, 16, 3, 0) for i in range(3)]
    partial = drop_classes(sites[2], [2], 3)
    dice = {}
    for name, third in (("plain", dataclasses.replace(partial, labelled=None)), ("marginal", partial)):
        seed_everything(0)
        model, _ = train_central(config, [sites[0], sites[1], third], private=False)
        scores = [evaluate(segmentation, model, s.split("test"), config, torch.device("cpu")) for s in sites]
        dice[name] = [score["dice_class_2"] for score in scores]
    assert dice["marginal"][2] > dice["plain"][2] + 0.1
    assert np.mean(dice["marginal"][:2]) > np.mean(dice["plain"][:2])
