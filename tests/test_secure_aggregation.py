"""Secure aggregation (run.secure-aggregation): the masked sum equals the plain FedAvg of the same
updates, a site that drops mid-protocol is unmasked out of the sum, sites refuse a server that
tries to unmask one update, and the config refuses what cannot run with it.

The federation tests go through the real ClientApp (client/app.py, its message-type routing and
each site's Flower context, kept per node across messages as a SuperNode keeps it) over an
in-process transport; tests/test_deployment_secure_aggregation.py runs the same over a real
SuperLink and SuperNodes.
"""

from __future__ import annotations

import math
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from client.app import app as client_app
from medfed import secure_aggregation as sa
from medfed import wire
from medfed.config import ConfigError
from medfed.federation import initial_model, run_federation, run_key
from medfed.run_folder import RunFolder
from medfed.site import handle_train, training_seed
from medfed.weights import load_checkpoint, model_to_arrays
from tests.conftest import tiny_config
from tests.test_federation import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")

Tamper = Callable[[int, Message], Message | None]


class ClientAppGrid(InProcessGrid):
    """Delivers each message to the real ClientApp, with one Flower context per node kept across
    messages. ``tamper(node, message)`` may stand for the network or a hostile server: it returns
    the message to deliver, or None for a node that is gone (Flower's error reply comes back)."""

    def __init__(self, nodes: dict[int, dict], tamper: Tamper | None = None) -> None:
        super().__init__(nodes)
        self.contexts = {  # in this process, without the site worker (tests/test_site_worker.py tests that)
            n: Context(42, n, {**node_config, "site-worker": False}, RecordDict(), {})
            for n, node_config in nodes.items()
        }
        self.sent: list[str] = []
        self.deliver = tamper or (lambda node, msg: msg)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(msg.metadata.message_type)
            delivered = self.deliver(node, msg)
            if delivered is None:
                replies.append(Message(Error(3, "Node Unavailable"), reply_to=msg))
                continue
            replies.append(client_app(delivered, self.contexts[node]))
        return replies


def _config(**overrides: object):  # noqa: ANN202
    """One round under secure aggregation with DP; the sites' budget leaves room for the replay."""
    base = {"run.rounds": 1, "run.secure-aggregation": True, "evaluation.cross-site": False, "privacy.budget": 30}
    return tiny_config(**{**base, **overrides})


def _without_dp(nodes: dict[int, dict]) -> tuple[dict[int, dict], dict[str, object]]:
    """Sites that allow training without DP, and the override that turns it off (faster: no noise
    calibration), for the tests about the protocol's refusals."""
    allowed = {n: {**entry, "allow-training-without-privacy": True} for n, entry in nodes.items()}
    return allowed, {"privacy.enabled": False}


def _copies(nodes: dict[int, dict], root: Path) -> dict[int, dict]:
    """Copies of the sites' state folders as they are before the run, each with its site secret
    already drawn: a copy's first request for round 1 is then seeded as the site's own was (a later
    copy would hold the run's ledger entry for round 1 and give a different request fresh noise)."""
    copies = {}
    for node, entry in nodes.items():
        training_seed(Path(entry["state-dir"]), "")  # draws the site secret as the site itself does
        state = root / Path(entry["state-dir"]).name
        shutil.copytree(entry["state-dir"], state)
        copies[node] = {**entry, "state-dir": str(state)}
    return copies


def _plain_updates(nodes: dict[int, dict], config, out: Path) -> dict[int, tuple[dict, int]]:  # noqa: ANN001
    """Each site's round-1 trained weights and example count (by node), trained again in plain mode
    from a copy of its state (same secret, same calibrated noise: the same local training as in the
    run; the copy's ledger is charged again, the site's own is not)."""
    start = model_to_arrays(initial_model(config))
    settings = wire.request_config(
        config, str(out), run_key(config), {wire.PHASE: wire.PHASE_FEDERATED, wire.SERVER_ROUND: 1}
    )
    updates = {}
    for node, entry in nodes.items():
        request = Message(
            RecordDict({wire.ARRAYS: start, wire.CONFIG: settings}), dst_node_id=node, message_type="train"
        )
        parsed = wire.parse_reply(handle_train(request, entry, run_id=42), "site")
        assert parsed.status == wire.OK, parsed.reason
        assert parsed.arrays is not None
        updates[node] = (parsed.arrays.to_torch_state_dict(), int(parsed.metrics[wire.NUM_EXAMPLES]))
    return updates


def _fedavg(start: dict, updates: list[tuple[dict, int]], max_norm: float) -> dict[str, torch.Tensor]:
    """Plain FedAvg of the updates, each clipped to ``max_norm`` as the sites clip them."""
    total = sum(n for _, n in updates)
    out = {}
    clipped = []
    for weights, n in updates:
        delta = {k: weights[k].double() - start[k].double() for k in start}
        norm = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped.append(({k: d * scale for k, d in delta.items()}, n))
    for key in start:
        out[key] = start[key].double() + sum(d[key] * n for d, n in clipped) / total
    return out


# ---------------------------------------------------------------- the arithmetic


def _pair_keys() -> tuple[dict[int, bytes], dict[int, bytes], dict[int, dict[int, bytes]]]:
    """Three sites' mask key pairs (PEM) and the keys each agrees with every other."""
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

    secret, public = {}, {}
    for node in (3, 7, 11):
        sk, pk = generate_key_pairs()
        secret[node], public[node] = private_key_to_bytes(sk), public_key_to_bytes(pk)
    agreed = {i: {j: sa._agreed_key(secret[i], public[j]) for j in secret if j != i} for i in secret}
    return secret, public, agreed


def test_the_unmasked_sum_is_the_weighted_sum_of_the_clipped_updates_even_with_a_site_dropped() -> None:
    rng = np.random.default_rng(0)
    secret, public, agreed = _pair_keys()
    deltas = {3: rng.normal(0, 0.1, 1000), 7: rng.normal(0, 0.1, 1000), 11: rng.normal(0, 5.0, 1000)}
    weights = {3: 40, 7: 25, 11: 60}
    seeds = {node: secrets.token_bytes(32) for node in deltas}
    max_norm = 10.0  # site 11's update (norm ~158) is clipped, the others are not
    masked = {n: sa.mask_update(deltas[n], weights[n], max_norm, n, seeds[n], agreed[n]) for n in deltas}
    step = sa.quantization_step(max_norm)

    def clipped(n: int) -> np.ndarray:
        return deltas[n] * min(1.0, max_norm / np.linalg.norm(deltas[n]))

    # every site in the sum
    plain, total = sa.unmask_sum(sum(masked.values()), seeds, {}, public)
    assert total == 125
    expected = sum(clipped(n) * weights[n] for n in deltas)
    np.testing.assert_allclose(plain * step, expected, rtol=0, atol=3 * step)
    # site 7 dropped after sharing its keys: its pairwise masks are removed with its rebuilt key
    survivors = {3: seeds[3], 11: seeds[11]}
    plain, total = sa.unmask_sum(masked[3] + masked[11], survivors, {7: secret[7]}, public)
    assert total == 100
    np.testing.assert_allclose(plain * step, clipped(3) * 40 + clipped(11) * 60, rtol=0, atol=2 * step)
    # one masked update alone looks nothing like the update
    alone = masked[3][:-1].view(np.int64) * step / 40
    assert np.abs(alone - deltas[3]).min() > 1.0


def test_the_threshold_is_a_strict_majority_and_at_least_two() -> None:
    assert [sa.threshold_for(n, 0.6) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    assert sa.threshold_for(3, 1.0) == 3
    assert sa.threshold_for(4, 0.51) == 3


# ---------------------------------------------------------------- a federation


def test_the_secure_round_equals_plain_fedavg_of_the_same_dp_updates(nodes: dict, tmp_path: Path) -> None:
    """Three sites with DP-SGD, one round under secure aggregation; the same round trained again in
    plain mode from copies of the sites' state gives the same three updates, whose FedAvg is the
    round's global model (within the float noise of CPU convolutions and the fixed-point rounding).
    No file the server wrote holds one site's update, and its log names none."""
    config = _config(**{"run.max-update-norm": 0.2})  # below the updates' norms (about 0.28): they get clipped
    grid = ClientAppGrid(nodes)
    out = tmp_path / "out"
    replay = _copies(nodes, tmp_path / "replay")
    report = run_federation(grid, config, out)

    assert report["protections"]["secure_aggregation"] is True
    assert report["protections"]["sample_level_dp"] is True
    entry = report["rounds"][1]
    assert entry["sites_aggregated"] == ["alpha", "beta", "gamma"]
    assert entry["secure_aggregation"]["dropped"] == [] and entry["secure_aggregation"]["threshold"] == 2
    assert [t for t in grid.sent if t.startswith(("train", "query"))] == (
        [sa.KEYS] * 3 + [sa.SHARES] * 3 + [sa.TRAIN] * 3 + [sa.UNMASK] * 3
    )  # no plain train message went out
    assert set(report["privacy"]) == {"alpha", "beta", "gamma"}  # sample-level ε still reported

    start = initial_model(config).state_dict()
    updates = _plain_updates(replay, config, tmp_path / "unused")
    assert entry["secure_aggregation"]["total_examples"] == sum(n for _, n in updates.values())
    norms = [
        math.sqrt(sum(float(((w[k].double() - start[k].double()) ** 2).sum()) for k in start))
        for w, _ in updates.values()
    ]
    assert max(norms) > config.run.max_update_norm  # the sites' clipping is exercised
    expected = _fedavg(start, list(updates.values()), config.run.max_update_norm)
    got = load_checkpoint(RunFolder(out).round_model(1))[0]
    for key in start:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=0, atol=2e-5)

    # the server kept no individual update: every tensor file it wrote is a global model
    individual = [weights for weights, _ in updates.values()]
    for path in out.rglob("*.safetensors"):
        stored = load_checkpoint(path)[0]
        for weights in individual:
            distance = max(float((stored[k].double() - weights[k].double()).abs().max()) for k in stored)
            assert distance > 1e-3, f"{path.name} holds a site's own trained weights"


def test_a_site_dropped_mid_protocol_is_unmasked_out_of_the_sum(nodes: dict, tmp_path: Path) -> None:
    """gamma shares its keys, then is gone when the training request comes: the round completes
    with alpha and beta, whose sum the server unmasks with gamma's rebuilt mask key."""

    def gamma_dies_before_training(node: int, msg: Message) -> Message | None:
        gone = node == 12 and msg.metadata.message_type in (sa.TRAIN, sa.UNMASK)
        return None if gone else msg

    config = _config()
    replay = _copies({n: e for n, e in nodes.items() if n != 12}, tmp_path / "replay")
    report = run_federation(ClientAppGrid(nodes, gamma_dies_before_training), config, tmp_path / "out")

    entry = report["rounds"][1]
    assert entry["sites_aggregated"] == ["alpha", "beta"]
    assert entry["secure_aggregation"]["dropped"] == ["gamma"]
    assert any("Node Unavailable" in note for note in report["site_notes"]["gamma"])
    start = initial_model(config).state_dict()
    expected = _fedavg(start, list(_plain_updates(replay, config, tmp_path).values()), config.run.max_update_norm)
    got = load_checkpoint(RunFolder(tmp_path / "out").round_model(1))[0]
    for key in start:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=0, atol=2e-5)


def test_sites_refuse_a_server_that_asks_to_unmask_one_update(nodes: dict, tmp_path: Path) -> None:
    """A hostile server says only alpha's masked update arrived (to get alpha's self-mask seed and the
    others' mask keys, hence alpha's update): every site refuses, and the round is lost."""

    def one_survivor(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == sa.UNMASK:
            record = msg.content[sa.RECORD]
            record["survivors"], record["dropped"] = [10], [11, 12]
        return msg

    nodes, no_dp = _without_dp(nodes)
    config = _config(**no_dp)
    report = run_federation(ClientAppGrid(nodes, one_survivor), config, tmp_path / "out")
    entry = report["rounds"][1]
    assert entry["sites_aggregated"] == []
    assert "unmask shares" in entry["secure_aggregation"]["failure"]
    assert any("below the threshold" in note for note in report["site_notes"]["alpha"])
    start = initial_model(config).state_dict()
    got = load_checkpoint(RunFolder(tmp_path / "out").round_model(1))[0]
    assert all(torch.equal(got[k], start[k]) for k in start)  # the global model was kept


def test_a_second_unmask_request_in_a_round_is_refused(nodes: dict, tmp_path: Path) -> None:
    nodes, no_dp = _without_dp(nodes)
    grid = ClientAppGrid(nodes)
    run_federation(grid, _config(**no_dp), tmp_path / "out")
    request = Message(
        RecordDict({sa.RECORD: sa.ConfigRecord({"round": 1, "survivors": [10, 11, 12], "dropped": []})}),
        dst_node_id=10,
        message_type=sa.UNMASK,
    )
    reply = client_app(request, grid.contexts[10])
    parsed = wire.parse_reply(reply, "alpha")
    assert parsed.status == wire.ERROR and "out of order" in parsed.reason


def test_a_site_that_requires_secure_aggregation_refuses_plain_training(nodes: dict, tmp_path: Path) -> None:
    nodes, no_dp = _without_dp(nodes)
    strict = {n: {**entry, "require-secure-aggregation": True} for n, entry in nodes.items()}
    config = tiny_config(**{"run.rounds": 1, "evaluation.cross-site": False, **no_dp})
    grid = ClientAppGrid(strict)
    report = run_federation(grid, config, tmp_path / "plain")
    assert report["rounds"][1]["sites_aggregated"] == []
    assert all(any("only under secure aggregation" in n for n in notes) for notes in report["site_notes"].values())
    assert report["protections"]["secure_aggregation"] is False


# ---------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"run.strategy": "fedmedian"}, "run.strategy"),
        ({"run.strategy": "fedtrimmedavg"}, "run.strategy"),
        ({"run.strategy": "fedadam"}, "run.strategy"),
        ({"run.update-compression": "int8"}, "run.update-compression"),
        ({"run.update-compression": "fp16"}, "run.update-compression"),
        ({"evaluation.cross-site": True}, "evaluation.cross-site"),
        ({"run.min-sites": 1}, "run.min-sites"),
        ({"run.secure-aggregation-threshold": 0.5}, "run.secure-aggregation-threshold"),
        ({"run.secure-aggregation-threshold": 1.5}, "run.secure-aggregation-threshold"),
        ({"run.secure-aggregation": "yes"}, "run.secure-aggregation"),
    ],
)
def test_the_config_refuses_what_secure_aggregation_cannot_run_with(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(**overrides)
    assert named in str(err.value)
    if "compression" in named:
        assert "run.secure-aggregation" in str(err.value)  # names both keys
