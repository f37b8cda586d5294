import json
from pathlib import Path

import pytest

from medfed.privacy import BudgetExceeded, PrivacyLedger, default_delta


def test_calibrated_noise_spends_the_target_over_the_planned_steps(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, delta=1e-4)
    sigma = ledger.noise_for_run("run-1", target_epsilon=4.0, sample_rate=0.1, steps=50)
    assert sigma > 0.5
    assert ledger.noise_for_run("run-1", 4.0, 0.1, 50) == sigma  # calibrated once per run
    epsilons = [ledger.reserve(sigma, 0.1, 10, budget=4.0) for _ in range(5)]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))  # ε grows every round
    assert epsilons[-1] == pytest.approx(4.0, rel=0.02)
    assert epsilons[-1] <= 4.0 + 1e-6


def test_ledger_survives_a_restart_and_composes_across_runs(tmp_path: Path) -> None:
    first = PrivacyLedger.open(tmp_path, delta=1e-4)
    sigma = first.noise_for_run("a", 2.0, 0.1, 20)
    spent = first.reserve(sigma, 0.1, 20, budget=100.0)
    reopened = PrivacyLedger.open(tmp_path, delta=0.5)  # a later run cannot change δ
    assert reopened.delta == 1e-4
    assert reopened.epsilon() == pytest.approx(spent)
    sigma_b = reopened.noise_for_run("b", 2.0, 0.1, 20)
    assert reopened.reserve(sigma_b, 0.1, 20, budget=100.0) > spent * 1.2


def test_round_past_budget_is_refused_and_not_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, delta=1e-4)
    sigma = ledger.noise_for_run("a", 3.0, 0.2, 10)
    ledger.reserve(sigma, 0.2, 10, budget=3.0)
    with pytest.raises(BudgetExceeded, match=r"would bring it to .* > budget 3.00"):
        ledger.reserve(sigma, 0.2, 10, budget=3.0)
    assert json.loads((tmp_path / "privacy.json").read_text())["history"] == [[sigma, 0.2, 10]]


def test_two_runs_at_one_site_cannot_both_spend_the_same_budget(tmp_path: Path) -> None:
    first, second = PrivacyLedger.open(tmp_path, 1e-4), PrivacyLedger.open(tmp_path, 1e-4)
    sigma = first.noise_for_run("a", 3.0, 0.2, 10)
    first.reserve(sigma, 0.2, 10, budget=3.0)
    with pytest.raises(BudgetExceeded):  # second was opened before first spent: it re-reads
        second.reserve(sigma, 0.2, 10, budget=3.0)


def test_corrupt_ledger_refuses_rather_than_forgets(tmp_path: Path) -> None:
    (tmp_path / "privacy.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="refusing to train"):
        PrivacyLedger.open(tmp_path, delta=1e-4)


def test_default_delta_is_below_one_over_n() -> None:
    assert default_delta(500) < 1 / 500


def test_prv_accountant_agrees_roughly_with_rdp(tmp_path: Path) -> None:
    rdp = PrivacyLedger.open(tmp_path / "rdp", delta=1e-4, accountant="rdp")
    prv = PrivacyLedger.open(tmp_path / "prv", delta=1e-4, accountant="prv")
    for ledger in (rdp, prv):
        ledger.reserve(1.0, 0.05, 200, budget=100.0)
    assert 0 < prv.epsilon() <= rdp.epsilon() * 1.05  # PRV is the tighter accountant
    assert PrivacyLedger.open(tmp_path / "prv", delta=1e-4).accountant == "prv"
