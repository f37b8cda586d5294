"""The privacy ledger charges a round once: a round repeated exactly (a coordinator crash and
--resume) releases nothing new and is not charged again; a round on changed data, or for another
received model, draws fresh noise and is charged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MessageType

from medfed import wire
from medfed.data.manifest import write_site
from medfed.data.synthetic import synthetic_site
from medfed.federation import run_federation
from medfed.privacy import LEDGER_FILE, PrivacyLedger, Release
from medfed.site import handle_train
from tests.conftest import tiny_config
from tests.test_fault_tolerance import _copy_nodes
from tests.test_federation import InProcessGrid
from tests.test_site import _node, _request

pytestmark = pytest.mark.usefixtures("task_identity")


def _train(request, node: dict) -> tuple[float, dict[str, torch.Tensor]]:  # noqa: ANN001
    reply = handle_train(request, node, run_id=1)
    assert reply.content["site"]["status"] == "ok", reply.content["site"]["reason"]
    return float(reply.content["metrics"]["epsilon"]), reply.content["arrays"].to_torch_state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-5) for k in a)


def _ledger(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state" / LEDGER_FILE).read_text())


def test_a_repeated_round_is_charged_once_and_trains_the_same(site_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(**{"evaluation.cross-site": False})
    request = _request(config, MessageType.TRAIN, **{wire.RUN_KEY: "run-a", wire.SERVER_ROUND: 1})
    node = _node(site_dir, tmp_path)
    first_eps, first = _train(request, node)
    again_eps, again = _train(request, node)
    assert again_eps == pytest.approx(first_eps)
    assert _same(first, again)  # the same seeded noise on the same data: nothing new released
    ledger = _ledger(tmp_path)
    assert len(ledger["charged"]) == 1 and sum(steps for *_, steps in ledger["history"]) > 0

    # The next round is new: charged.
    next_round = _request(config, MessageType.TRAIN, **{wire.RUN_KEY: "run-a", wire.SERVER_ROUND: 2})
    assert _train(next_round, node)[0] > first_eps * 1.05


def test_a_round_on_changed_data_is_charged_again(site_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(**{"evaluation.cross-site": False})
    request = _request(config, MessageType.TRAIN, **{wire.RUN_KEY: "run-a", wire.SERVER_ROUND: 1})
    node = _node(site_dir, tmp_path)
    first_eps, first = _train(request, node)
    write_site(site_dir, synthetic_site(0, 60, seed=2))  # the site's data changed between the two
    changed_eps, changed = _train(request, node)
    assert changed_eps > first_eps * 1.05
    assert len(_ledger(tmp_path)["charged"]) == 2
    assert not _same(first, changed)


def test_the_same_round_for_another_model_draws_fresh_noise_and_is_charged(site_dir: Path, tmp_path: Path) -> None:
    """Resending a round with other weights would, with the same noise draw, let the server subtract
    the noise (the difference of the two updates): the site salts the seed and charges it."""
    config = tiny_config(**{"evaluation.cross-site": False})
    request = _request(config, MessageType.TRAIN, **{wire.RUN_KEY: "run-a", wire.SERVER_ROUND: 1})
    node = _node(site_dir, tmp_path)
    first_eps, first = _train(request, node)
    moved = _request(config, MessageType.TRAIN, **{wire.RUN_KEY: "run-a", wire.SERVER_ROUND: 1})
    state = moved.content[wire.ARRAYS].to_torch_state_dict()
    moved.content[wire.ARRAYS] = ArrayRecord({k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()})
    second_eps, second = _train(moved, node)
    assert second_eps > first_eps * 1.05
    noise_a = {k: first[k] - request.content[wire.ARRAYS].to_torch_state_dict()[k] for k in first}
    noise_b = {k: second[k] - moved.content[wire.ARRAYS].to_torch_state_dict()[k] for k in second}
    assert not _same(noise_a, noise_b)  # not the same step: fresh noise
    assert _train(moved, node)[0] == pytest.approx(second_eps)  # and that repeat, too, is charged once


def test_a_ledger_written_before_round_keys_still_opens_and_counts(tmp_path: Path) -> None:
    old = {"delta": 1e-5, "accountant": "rdp", "history": [[1.2, 0.1, 10]], "calibrations": {"run": 1.2}}
    (tmp_path / LEDGER_FILE).write_text(json.dumps(old))
    ledger = PrivacyLedger.open(tmp_path, 1e-5)
    spent = ledger.epsilon()
    assert ledger.rounds == {} and ledger.charged == [] and spent > 0
    release = Release("run|federated|1|data", "request")
    assert ledger.noise_salt(release) == ""
    after = ledger.reserve(1.2, 0.1, 10, budget=100.0, release=release)
    assert after > spent
    assert PrivacyLedger.open(tmp_path, 1e-5).reserve(1.2, 0.1, 10, budget=100.0, release=release) == after
    for bad in ({"charged": "abc"}, {"charged": [5]}, {"rounds": []}, {"rounds": {"k": 5}}):
        (tmp_path / LEDGER_FILE).write_text(json.dumps({**old, **bad}))
        with pytest.raises(Exception, match="privacy ledger .* is unreadable"):
            PrivacyLedger.open(tmp_path, 1e-5)


class CrashAfterTraining(InProcessGrid):
    """The server dies once the sites have trained round ``crash_round`` (and charged it), before
    it aggregates: the resumed run sends that round again."""

    def __init__(self, nodes: dict, crash_round: int) -> None:
        super().__init__(nodes)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        for msg in messages:
            config = msg.content["config"] if "config" in msg.content.config_records else {}
            if msg.metadata.message_type == MessageType.TRAIN and config.get(wire.SERVER_ROUND) == self.crash_round:
                raise RuntimeError(f"killed after the sites trained round {self.crash_round}")
        return replies


def test_resume_charges_the_repeated_round_once(nodes: dict, tmp_path: Path) -> None:
    config = tiny_config(**{"run.rounds": 2, "evaluation.cross-site": False})
    clean = run_federation(InProcessGrid(nodes), config, tmp_path / "clean")

    crashed = _copy_nodes(nodes, tmp_path / "state-2")
    with pytest.raises(RuntimeError, match="killed after"):
        run_federation(CrashAfterTraining(crashed, crash_round=2), config, tmp_path / "resumed")
    resumed = run_federation(InProcessGrid(crashed), config, tmp_path / "resumed", resume=True)
    assert resumed["resumed_after_round"] == 1
    for site, spent in clean["privacy"].items():  # round 2 trained twice, charged once
        assert resumed["privacy"][site]["epsilon"] == pytest.approx(spent["epsilon"])
        assert np.isclose(
            spent["epsilon"], PrivacyLedger.open(Path(crashed[_node_of(crashed, site)]["state-dir"]), 0).epsilon()
        )


def _node_of(nodes: dict, site: str) -> int:
    return next(node for node, entry in nodes.items() if entry["site-name"] == site)
