"""The empirical privacy audit: attack figures and canary exposure against hand-computed cases, the
audit of a model trained without DP and with DP ε = 1 on a tiny site, and the command's refusals."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

from medfed.audit import (
    MIN_GROUP,
    auc,
    auc_ceiling,
    canary_test,
    exposure,
    lira_offline_scores,
    logit_confidence,
    make_canaries,
    membership_groups,
    tpr_at_fpr,
    tpr_ceiling,
)
from medfed.cli import app
from medfed.config import load_config
from medfed.data import read_site, write_site
from medfed.data.manifest import SiteReading
from medfed.data.synthetic import synthetic_segmentation_site, synthetic_site
from medfed.run_folder import RunFolder
from medfed.weights import model_to_arrays, save_checkpoint
from tests.conftest import REPO

runner = CliRunner()


def test_auc_counts_member_above_non_member_pairs_and_ties_half() -> None:
    # pairs: 4 beats all three; 3 beats 1 and 2.5 and ties 3; 2 beats 1: (3 + 2.5 + 1) / 9
    assert auc(np.array([4.0, 3.0, 2.0]), np.array([1.0, 2.5, 3.0])) == pytest.approx(6.5 / 9)
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0, 1.0])) == 0.5


def test_tpr_at_fpr_allows_floor_of_fpr_times_n_false_positives() -> None:
    nonmembers = np.arange(100.0)  # 0 .. 99
    members = np.array([150.0, 99.5, 98.5, 98.0, 50.0])
    rate = tpr_at_fpr(members, nonmembers, 0.01)
    assert rate is not None
    # one false positive allowed: threshold 98 (the second-highest non-member), members strictly above it
    assert (rate["tpr"], rate["flagged"], rate["false_positives"]) == (0.6, 3, 1)
    exact = binomtest(3, 5).proportion_ci(0.95, method="exact")
    assert rate["ci95"] == pytest.approx([exact.low, exact.high])
    assert tpr_at_fpr(members, nonmembers, 0.001) is None  # 0.1% needs 1000 non-members
    thousand = tpr_at_fpr(np.array([1000.5, 997.5]), np.arange(1000.0), 0.001)
    assert thousand is not None and thousand["tpr"] == 0.5


def test_exposure_is_log2_n_minus_log2_rank_with_ties_half() -> None:
    references = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])  # n = 8: at most 3 bits
    bits = exposure(np.array([0.05, 0.35, 0.8, 0.2]), references)
    assert bits == pytest.approx([3.0, 1.0, 0.0, 3 - math.log2(2.5)])


def test_dp_ceilings_are_the_tradeoff_curve_of_epsilon_delta() -> None:
    assert tpr_ceiling(0.0, 0.0, 0.01) == pytest.approx(0.01)
    assert auc_ceiling(0.0, 0.0) == pytest.approx(0.5, abs=1e-6)
    # ε = ln 3: min(3a, 1 - (1 - a) / 3) crosses at a = 1/4; area 3/32 + 1/2 + 5/32
    assert auc_ceiling(math.log(3), 0.0) == pytest.approx(0.75, abs=1e-6)
    assert tpr_ceiling(math.log(3), 1e-3, 0.01) == pytest.approx(0.031)


def test_lira_scores_the_gap_to_the_references_that_never_saw_an_image() -> None:
    target = np.array([0.1, 1.0])
    references = np.array([[1.0, 0.5], [2.0, 0.1], [3.0, 1.0]])
    out = np.array([[True, True], [True, False], [False, True]])
    phi, ref = logit_confidence(target), logit_confidence(references)
    assert phi[0] == pytest.approx(math.log(math.exp(-0.1) / (1 - math.exp(-0.1))))
    mean = [(ref[0, 0] + ref[1, 0]) / 2, (ref[0, 1] + ref[2, 1]) / 2]
    squares = (ref[0, 0] - mean[0]) ** 2 + (ref[1, 0] - mean[0]) ** 2
    squares += (ref[0, 1] - mean[1]) ** 2 + (ref[2, 1] - mean[1]) ** 2
    sd = math.sqrt(squares / 2)
    assert lira_offline_scores(target, references, out) == pytest.approx((phi - mean) / sd)


def test_held_out_copies_of_training_images_are_left_out_and_counted() -> None:
    site = synthetic_site(0, 60, 16, 4, seed=3, split_fractions=(0.4, 0.0, 0.6))
    images = site.images.copy()
    images[np.flatnonzero(site.splits == "test")[:3]] = images[np.flatnonzero(site.splits == "train")[:3]]
    groups = membership_groups(dataclasses.replace(site, images=images), ("val", "test"), "site")
    assert (groups.duplicates, len(groups.members.images), len(groups.nonmembers.images)) == (3, 24, 33)


def test_canaries_carry_any_tasks_target_on_noise_images() -> None:
    site = synthetic_segmentation_site(0, 40, 32, 3, seed=1)
    canaries = make_canaries(site, 6, seed=0)
    assert canaries.images.shape == (6, *site.images.shape[1:]) and canaries.targets.shape == (
        6,
        *site.targets.shape[1:],
    )
    assert set(canaries.splits) == {"train"} and len({c.tobytes() for c in canaries.images}) == 6
    train_masks = {t.tobytes() for t in site.targets[site.splits == "train"]}
    assert all(t.tobytes() in train_masks for t in canaries.targets)  # each a training image's mask


# ---------------------------------------------------------------- trained models, through the command

SITE = "hospital"
# a constant step size, whatever the demo config's schedule: the no-DP model must be able to memorise
TRAINING = {"run.rounds": 1, "train.local-epochs": 30, "train.batch-size": 8, "data.image-size": 16,
            "data.num-classes": 4, "privacy.target-epsilon": 1.0, "privacy.unit": "image",
            "train.schedule": "constant"}  # fmt: skip


def _run_folder(root: Path, private: bool, site_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A run folder holding a model trained at the site (plus 3 canaries) as the run's recipe trains
    (DP ε = 1 or none), its released checkpoint and a report with the ε it spent."""
    overrides = TRAINING | {"privacy.enabled": private} | ({} if private else {"train.lr": 0.003})
    config = load_config(REPO / "configs" / "classification-synthetic.toml", overrides)
    site = read_site(site_dir, SiteReading.from_config(config.data, "label"))
    model, info, canaries = canary_test(config, site, private, inserted=3, references=30, seed=0)
    folder = RunFolder(root)
    public = config.to_public_dict()
    save_checkpoint(
        folder.global_model, model_to_arrays(model), {"round": 1, "task": "classification", "config": public}
    )
    privacy = {SITE: {"epsilon": info["epsilon"], "delta": info["delta"], "unit": "image"}} if private else {}
    report = {"task": "classification", "config": public, "privacy": privacy,
              "rounds": [{"round": 1, "epsilon": {SITE: info["epsilon"]} if private else {}}]}  # fmt: skip
    folder.report_json.write_text(json.dumps(report))
    return folder.global_model, {"info": info, "canaries": canaries}


@pytest.fixture(scope="module")
def runs(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny 4-class site (24 training, 36 held-out images of 16 px) and two run folders trained on
    it for 30 epochs: without DP (it overfits) and with DP at ε = 1."""
    root = tmp_path_factory.mktemp("audit")
    site_dir = write_site(root / SITE, synthetic_site(0, 60, 16, 4, seed=3, split_fractions=(0.4, 0.0, 0.6)))
    plain, plain_extra = _run_folder(root / "no-dp", False, site_dir)
    private, private_extra = _run_folder(root / "dp", True, site_dir)
    return {"root": root, "site": site_dir, "no-dp": plain, "dp": private,
            "extra": {"no-dp": plain_extra, "dp": private_extra}}  # fmt: skip


def _audit(checkpoint: Path, site: Path, out: Path, *more: str) -> dict[str, Any]:
    args = ["privacy", "audit", "--model", str(checkpoint), "--data", str(site), "--out", str(out), *more]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["audit.json"]
    return json.loads((out / "audit.json").read_text())


def test_audit_finds_members_of_a_model_trained_without_dp_and_not_with_dp(runs: dict[str, Any]) -> None:
    root = runs["root"]
    plain = _audit(runs["no-dp"], runs["site"], root / "audit-no-dp", "--shadows", "4", "--bootstrap", "200")
    private = _audit(runs["dp"], runs["site"], root / "audit-dp", "--bootstrap", "200")
    for audit in (plain, private):
        assert (audit["members"], audit["nonmembers"], audit["site"]) == (24, 36, SITE)
        assert audit["attacks"]["loss"]["tpr_at_fpr"] == {"0.01": None, "0.001": None}  # 36 held out: n/a
    no_dp_auc, dp_auc = plain["attacks"]["loss"]["auc"], private["attacks"]["loss"]["auc"]
    assert no_dp_auc > 0.6 and dp_auc < no_dp_auc
    assert plain["mean_loss"]["members"] < plain["mean_loss"]["nonmembers"]
    lira = plain["attacks"]["lira-offline"]
    assert lira["shadows"] == 4 and 0 <= lira["auc_ci95"][0] <= lira["auc"] <= lira["auc_ci95"][1] <= 1
    assert plain["theory"]["epsilon"] is None and "without differential privacy" in plain["theory"]["reason"]
    theory = private["theory"]
    assert theory["epsilon"] == pytest.approx(1.0, abs=0.02) and theory["source"] == "report.json"
    assert theory["auc_ceiling"] == pytest.approx(auc_ceiling(theory["epsilon"], theory["delta"]))
    assert f"within what ε = {theory['epsilon']:.3g} permits" in private["verdict"][0]


def test_canaries_are_exposed_without_dp_and_less_with_it(runs: dict[str, Any]) -> None:
    plain, private = runs["extra"]["no-dp"]["canaries"], runs["extra"]["dp"]["canaries"]
    assert plain["inserted"] == 3 and plain["max_bits"] == pytest.approx(math.log2(31))
    assert plain["mean_bits"] > 3.0 and private["mean_bits"] < plain["mean_bits"]


def test_audit_of_a_simulated_site_reads_the_configs_synthetic_site(runs: dict[str, Any], tmp_path: Path) -> None:
    """Without --data the checkpoint's own config gives the site (its synthetic site-1): a model
    never trained on it finds its members at chance, and no report names that site."""
    audit = _audit_simulated(runs["dp"], tmp_path)
    assert audit["site"] == "site-1" and audit["members"] >= MIN_GROUP
    assert "no ε for site 'site-1'" in audit["theory"]["reason"]


def _audit_simulated(checkpoint: Path, out: Path) -> dict[str, Any]:
    result = runner.invoke(
        app, ["privacy", "audit", "--model", str(checkpoint), "--out", str(out), "--bootstrap", "100"]
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "audit.json").read_text())


def _few_images_site(root: Path) -> Path:
    return write_site(root / "small", synthetic_site(0, 30, 16, 4, seed=3, split_fractions=(0.4, 0.0, 0.6)))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-checkpoint", "checkpoint not found: {root}/nowhere.safetensors"),
        ("corrupt-checkpoint", "{root}/garbage.safetensors is not a safetensors file"),
        (
            "other-task",
            "segmentation-synthetic.toml: a segmentation config, but global.safetensors is a classification",
        ),
        ("few-members", "{root}/small: 12 training image(s) and 18 held-out (val + test) image(s)"),
        ("corrupt-report", "{root}/bad-report.json: not a readable run report"),
        ("other-run-report", "{root}/other-report.json: the report is of another run than the checkpoint"),
        ("odd-shadows", "--shadows 3: expected 0 or an even number"),
        ("bad-held-out", "--held-out 'train': expected one of test, val, val+test"),
        ("out-is-a-file", "--out {root}/occupied: a file is there"),
    ],
)
def test_audit_refuses_bad_input_naming_the_file(runs: dict[str, Any], case: str, message: str) -> None:
    root = runs["root"]
    model, site, out = runs["dp"], runs["site"], root / f"out-{case}"
    extra: list[str] = []
    if case == "missing-checkpoint":
        model = root / "nowhere.safetensors"
    elif case == "corrupt-checkpoint":
        model = root / "garbage.safetensors"
        model.write_bytes(b"\x00not a checkpoint")
        model.with_suffix(".json").write_text("{}")
    elif case == "other-task":
        extra = ["--config", str(REPO / "configs" / "segmentation-synthetic.toml")]
    elif case == "few-members":
        site = _few_images_site(root)
    elif case == "corrupt-report":
        (root / "bad-report.json").write_text("{not json")
        extra = ["--report", str(root / "bad-report.json")]
    elif case == "other-run-report":
        other = json.loads((runs["dp"].parent.parent / "report.json").read_text())
        other["config"]["run"]["seed"] = 99
        (root / "other-report.json").write_text(json.dumps(other))
        extra = ["--report", str(root / "other-report.json")]
    elif case == "odd-shadows":
        extra = ["--shadows", "3"]
    elif case == "bad-held-out":
        extra = ["--held-out", "train"]
    elif case == "out-is-a-file":
        out = root / "occupied"
        out.write_text("taken")
    args = ["privacy", "audit", "--model", str(model), "--data", str(site), "--out", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message.format(root=root) in result.output
    if case == "few-members":
        assert f"the audit needs at least {MIN_GROUP} of each" in result.output
    assert "Traceback" not in result.output
    assert not (out / "audit.json").exists()
