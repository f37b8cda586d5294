"""Site-level DP at the server (DP-FedAvg with adaptive clipping): the accountant against Opacus',
the clipping and noise against a hand computation, the clipping norm's adaptation, config checks,
and a 12-site federation (real site logic, in-process transport) whose report carries both the
site-level ε and each site's sample-level ε."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MessageType
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from rich.console import Console
from typer.testing import CliRunner

from medfed.cli import app
from medfed.cli.render import print_summary
from medfed.config import ConfigError
from medfed.data import write_site
from medfed.data.synthetic import synthetic_site
from medfed.federation import run_federation
from medfed.run_folder import RunFolder
from medfed.site import handle_train
from medfed.site_level_dp import (
    SiteLevelDP,
    clip_update,
    next_clip_norm,
    noised_mean,
    noised_unclipped_fraction,
    plan_site_level,
    poisson_sample,
    site_level_epsilon,
)
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid
from tests.test_site import _node, _request


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.1, 0.5, 3), (0.8, 0.1, 50), (2.0, 1.0, 10)])
def test_accountant_matches_opacus(sigma: float, q: float, rounds: int) -> None:
    delta = 1e-3
    rdp = RDPAccountant()
    rdp.history = [(sigma, q, rounds)]
    assert site_level_epsilon(sigma, q, rounds, delta, "rdp") == pytest.approx(rdp.get_epsilon(delta), rel=1e-9)
    prv = PRVAccountant()
    prv.history = [(sigma, q, rounds)]
    assert site_level_epsilon(sigma, q, rounds, delta, "prv") == pytest.approx(prv.get_epsilon(delta), rel=1e-6)


def test_calibration_meets_the_target_like_opacus_and_splits_noise_as_andrew_et_al() -> None:
    plan = plan_site_level(40, 0.25, 20, 4.0)
    assert plan.delta == pytest.approx(1 / 400)  # 1/(10 N)
    opacus_sigma = get_noise_multiplier(
        target_epsilon=4.0,
        target_delta=plan.delta,
        sample_rate=0.25,
        steps=20,
        accountant="rdp",
        epsilon_tolerance=0.01,
    )
    assert plan.noise_multiplier == pytest.approx(opacus_sigma, rel=0.02)
    assert 4.0 - 0.02 <= plan.epsilon_after(20) <= 4.0
    # Andrew et al.: the update and count queries together are one Gaussian mechanism of multiplier z
    z, z_update, count = plan.noise_multiplier, plan.update_noise_multiplier, plan.count_stddev
    assert count == pytest.approx(max(plan.expected_sites / 20, z))
    assert z**-2 == pytest.approx(z_update**-2 + (2 * count) ** -2)
    assert z < z_update <= z * 1.16
    fixed = plan_site_level(40, 0.25, 20, 4.0, adaptive=False)  # no count query: all noise on the update
    assert fixed.update_noise_multiplier == fixed.noise_multiplier and fixed.count_stddev == 0


def test_clipping_and_noise_against_a_hand_computation() -> None:
    big = [np.array([3.0, 0.0]), np.array([[4.0]])]  # norm 5
    small = [np.array([0.3, 0.0]), np.array([[0.4]])]  # norm 0.5
    clipped_big, bit_big = clip_update(big, 1.0)
    clipped_small, bit_small = clip_update(small, 1.0)
    assert not bit_big and bit_small
    np.testing.assert_allclose(clipped_big[0], [0.6, 0.0])
    np.testing.assert_allclose(clipped_big[1], [[0.8]])
    np.testing.assert_allclose(clipped_small[0], small[0])
    shapes = [(2,), (1, 1)]
    mean = noised_mean([clipped_big, clipped_small], shapes, 1.0, 0.5, 4.0, np.random.default_rng(7))
    # by hand: (0.6 + 0.3, 0) and 0.8 + 0.4, plus N(0, (0.5 * 1.0)^2) from the same seeded stream, over m = 4
    draws = np.random.default_rng(7)
    noise_a, noise_b = draws.normal(0, 0.5, size=(2,)), draws.normal(0, 0.5, size=(1, 1))
    np.testing.assert_allclose(mean[0], (np.array([0.9, 0.0]) + noise_a) / 4)
    np.testing.assert_allclose(mean[1], (np.array([[1.2]]) + noise_b) / 4)
    # the count: one of two unclipped, centred bits (1 - 1/2 + 0 - 1/2 = 0) plus N(0, 2^2), over m = 4, + 1/2
    fraction = noised_unclipped_fraction([bit_big, bit_small], 2.0, 4.0, np.random.default_rng(3))
    assert fraction == pytest.approx(np.random.default_rng(3).normal(0, 2.0) / 4 + 0.5)


def test_aggregate_noises_only_trainable_float_arrays_and_charges_the_round(tmp_path: Path) -> None:
    config = tiny_config(**{"privacy.level": "site", "evaluation.cross-site": False, "data.sites": 12})
    dp = SiteLevelDP.start(config, 12, tmp_path / "state.json")
    dp.rng = np.random.default_rng(0)
    keys = sorted(dp.keys)
    current = ArrayRecord({"w": torch.zeros(2), "frozen": torch.ones(3), "count": torch.tensor([5])})
    dp.keys = {"w", "count"}  # "count" is an integer buffer: never noised
    updates = [ArrayRecord({"w": torch.tensor([3.0, 4.0]), "frozen": torch.ones(3) * 9, "count": torch.tensor([7])})]
    released = dp.aggregate(current, updates)
    assert keys  # the tiny model's parameters are all trainable
    np.testing.assert_array_equal(released["frozen"].numpy(), np.ones(3, dtype=np.float32))
    assert np.array_equal(released["count"].numpy(), [5])
    rng = np.random.default_rng(0)
    expected = (np.array([0.06, 0.08]) + rng.normal(0, dp.plan.update_noise_multiplier * 0.1, size=2)) / 12
    np.testing.assert_allclose(released["w"].numpy(), expected.astype(np.float32), rtol=1e-6)
    # one update, clipped: the noised unclipped fraction is below the 0.5 target on average, the norm grows
    assert dp.rounds_charged == 1 and dp.clip_norms == [0.1]
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["clip_norms"] == [0.1] and saved["sites"] == 12
    resumed = SiteLevelDP.start(config, 30, tmp_path / "state.json", resume=True)
    assert resumed.rounds_charged == 1 and resumed.plan.sites == 12 and resumed.clip_norm == dp.clip_norm
    assert resumed.epsilon == pytest.approx(dp.plan.epsilon_after(1))


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clipping_moves_to_the_target_quantile(quantile: float) -> None:
    rng = np.random.default_rng(1)
    plan = plan_site_level(1000, 0.1, 300, 8.0)  # about 100 sites a round
    norms = rng.lognormal(mean=1.0, sigma=0.5, size=1000)  # the sites' update norms, median e = 2.7
    clip = 0.1
    history = []
    for _ in range(300):
        sampled = poisson_sample(list(norms), plan.sample_rate, rng)
        fraction = noised_unclipped_fraction([n <= clip for n in sampled], plan.count_stddev, plan.expected_sites, rng)
        clip = next_clip_norm(clip, fraction, quantile, 0.2)
        history.append(clip)
    target = float(np.quantile(norms, quantile))
    settled = float(np.median(history[-100:]))
    assert abs(settled - target) / target < 0.1
    assert history[50] > 10 * 0.1  # it climbed from the small start
    assert next_clip_norm(1.0, 0.9, 0.5, 0.2) < 1.0 < next_clip_norm(1.0, 0.1, 0.5, 0.2)


def test_poisson_sampling_rate() -> None:
    rng = np.random.default_rng(0)
    counts = [len(poisson_sample(range(20), 0.5, rng)) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(10, abs=0.2)
    assert 0 < min(counts) < 10 < max(counts)  # Poisson: the count varies, it is not fixed
    assert poisson_sample([1, 2, 3], 1.0, rng) == [1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"privacy.level": "site", "privacy.enabled": False}, "privacy.level"),
        ({"privacy.level": "everything"}, "privacy.level"),
        ({"privacy.level": "site", "run.strategy": "fedmedian", "evaluation.cross-site": False}, "run.strategy"),
        ({"privacy.level": "site"}, "evaluation.cross-site"),
        ({"run.fraction-train": 0.0}, "run.fraction-train"),
        ({"run.fraction-train": 1.5}, "run.fraction-train"),
        ({"privacy.site-epsilon": float("inf")}, "privacy.site-epsilon"),
        ({"privacy.site-epsilon": 0.0}, "privacy.site-epsilon"),
        ({"privacy.site-delta": 0.5}, "privacy.site-delta"),
        ({"privacy.site-clip-quantile": 1.0}, "privacy.site-clip-quantile"),
        ({"privacy.site-clip-norm": -1.0}, "privacy.site-clip-norm"),
        ({"privacy.site-clip-lr": float("nan")}, "privacy.site-clip-lr"),
    ],
)
def test_settings_that_cannot_give_site_level_dp_are_refused(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        tiny_config(**overrides)
    assert err.value.key.startswith(key.split(".")[0])


def test_site_level_needs_many_sites_and_a_meaningful_delta() -> None:
    with pytest.raises(ValueError, match="privacy.level.*at least 10 sites"):
        plan_site_level(6, 1.0, 3, 8.0)
    with pytest.raises(ValueError, match="privacy.site-delta"):
        plan_site_level(20, 1.0, 3, 8.0, delta=0.06)  # not below 1/20
    with pytest.raises(ValueError, match="run.fraction-train"):
        plan_site_level(20, 0.01, 3, 8.0)  # 0.2 sites a round
    for epsilon in (0.0, 1000.0, math.nan):
        with pytest.raises(ValueError, match="privacy.site-epsilon"):
            plan_site_level(20, 1.0, 3, epsilon)


def test_a_run_with_fewer_than_ten_sites_is_refused_before_it_starts(nodes: dict, tmp_path: Path) -> None:
    config = tiny_config(**{"privacy.level": "sample+site"})
    with pytest.raises(ValueError, match="at least 10 sites"):
        run_federation(InProcessGrid(nodes), config, tmp_path / "out")


@pytest.mark.usefixtures("task_identity")
def test_twelve_sites_sampled_at_half_report_site_and_sample_level_epsilon(tmp_path: Path) -> None:
    nodes = {}
    for i in range(12):
        name = f"h{i:02d}"
        folder = write_site(tmp_path / "data" / name, synthetic_site(i % 3, 40, seed=i))
        nodes[100 + i] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp_path / "state" / name)}
    config = tiny_config(
        **{
            "privacy.level": "sample+site",
            "privacy.target-epsilon": 30.0,
            "run.fraction-train": 0.5,
            "run.rounds": 3,
            "run.min-sites": 1,
            "model.width": 4,
            "model.depth": 1,
            "model.norm-groups": 2,
            "train.batch-size": 64,  # the whole train split: sample rate 1, the sites' accounting is quick
            "evaluation.cross-site": False,
        }
    )
    out = tmp_path / "out"
    report = run_federation(InProcessGrid(nodes), config, out)
    site_level = report["site_privacy"]
    plan = plan_site_level(12, 0.5, 3, 8.0)
    assert site_level["sites"] == 12 and site_level["rounds"] == 3 and site_level["sample_rate"] == 0.5
    assert site_level["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert site_level["delta"] == pytest.approx(1 / 120)
    assert site_level["epsilon"] == pytest.approx(plan.epsilon_after(3)) and site_level["epsilon"] <= 8.0
    epsilons = [entry["site_epsilon"] for entry in report["rounds"][1:]]
    assert epsilons == sorted(epsilons) and epsilons[-1] == site_level["epsilon"]
    norms = site_level["clip_norms"]
    assert len(norms) == 3 and norms[0] == 0.1 and norms[1] != norms[0]
    # about half the sites in a round (18 of 36 expected, 4 standard deviations either side); each site
    # that trained has its own sample-level ε beside the site-level one
    rounds = [set(entry["sites_aggregated"]) for entry in report["rounds"][1:]]
    assert 6 <= sum(map(len, rounds)) <= 30
    trained = set().union(*rounds)
    assert set(report["privacy"]) == trained
    assert all(0 < privacy["epsilon"] <= 30.0 for privacy in report["privacy"].values())
    assert all(math.isfinite(m["loss"]) for m in report["final"]["per_site"].values())
    charged = json.loads(RunFolder(out).site_privacy.read_text())
    assert charged["clip_norms"] == norms
    console = Console(width=300, record=True)
    print_summary(console, report)
    assert f"site-level DP (each whole site): ε {site_level['epsilon']:.2f}" in console.export_text()
    assert "Site-level privacy" in RunFolder(out).report_html.read_text()


def test_site_plan_command_prints_the_servers_numbers_and_refuses_few_sites() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["privacy", "site-plan", "--sites", "40", "--fraction-train", "0.25",
                                 "--rounds", "20", "--epsilon", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = plan_site_level(40, 0.25, 20, 4.0)
    assert f"{plan.noise_multiplier:.3f}" in result.output and "WARNING" in result.output
    few = runner.invoke(app, ["privacy", "site-plan", "--sites", "5"])
    assert few.exit_code == 2 and "--sites" in few.output and "Traceback" not in few.output
    bad = runner.invoke(app, ["privacy", "site-plan", "--sites", "40", "--fraction-train", "2"])
    assert bad.exit_code == 2 and "--fraction-train" in bad.output


@pytest.mark.usefixtures("task_identity")
def test_a_deployed_site_runs_site_level_only_training_just_when_it_allows_training_without_its_own_dp(
    site_dir: Path, tmp_path: Path
) -> None:
    config = tiny_config(**{"privacy.level": "site", "evaluation.cross-site": False})
    refused = handle_train(_request(config, MessageType.TRAIN), _node(site_dir, tmp_path), run_id=1)
    assert refused.content["site"]["status"] == "refused"
    assert "privacy.level" in refused.content["site"]["reason"]
    allowed = _node(site_dir, tmp_path, **{"allow-training-without-privacy": True})
    reply = handle_train(_request(config, MessageType.TRAIN), allowed, run_id=1)
    assert reply.content["site"]["status"] == "ok"
    assert "epsilon" not in reply.content["metrics"]  # no DP-SGD at the site: nothing charged to its ledger
    assert not (tmp_path / "state" / "privacy.json").exists()
