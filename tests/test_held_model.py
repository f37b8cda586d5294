"""One message per site per round: the training request also asks the site to score the model on
its validation split (with run.ema, the average the site makes itself), so the model goes down
once; a request names a model the site holds by digest (medfed.held_model) and a site that lost
it gets the weights; the report is the one two messages per round made; the privacy release key
is unchanged; the prompt grid collects replies as Flower's does."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from medfed import federation, held_model, packing, wire
from medfed.data import write_site
from medfed.data.synthetic import synthetic_site
from medfed.federation import run_federation
from medfed.in_process import InProcessGrid
from medfed.prompt_grid import PromptGrid
from medfed.site import request_digest
from medfed.weights import array_bytes, model_to_arrays
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("task_identity")


class RecordingGrid(InProcessGrid):
    """Records each request's type, site and which models it carried; ``forget`` (site names) lose
    their held model before every evaluation request."""

    def __init__(self, nodes: dict[int, dict], forget: Iterable[str] = ()) -> None:
        super().__init__(nodes)
        self.forget = set(forget)
        self.sent: list[tuple[str, str, int]] = []  # (message type, site, models carried)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            node = self.nodes[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.EVALUATE and node["site-name"] in self.forget:
                (Path(node["state-dir"]) / held_model.HELD_FILE).unlink(missing_ok=True)
            carried = sum(key in msg.content.array_records for key in (wire.ARRAYS, wire.SCORED))
            assert all(len(record) == 1 for record in msg.content.array_records.values())  # medfed.packing
            self.sent.append((msg.metadata.message_type, node["site-name"], carried))
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture
def nodes(tmp_path: Path) -> dict[int, dict]:
    """Three deployed-style sites of 24 images of 16 px, training without DP."""
    result = {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        folder = write_site(tmp_path / "data" / name, synthetic_site(i, 24, image_size=16, seed=4))
        result[10 + i] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp_path / "state" / name),
                          "allow-training-without-privacy": True}  # fmt: skip
    return result


def _config(**overrides: object):  # noqa: ANN202
    base = {"run.rounds": 1, "data.image-size": 16, "evaluation.cross-site": False, "evaluation.example-images": 0,
            "privacy.enabled": False}  # fmt: skip
    return tiny_config(**{**base, **overrides})


def _model_bytes(report: dict) -> int:
    return report["rounds"][1]["bytes_down"] // len(report["sites"])  # round 1: the model once to every site


def _same_numbers(one: dict, other: dict) -> None:
    for key in ("metrics", "sites_aggregated", "outcomes"):  # (JSON: NaN == NaN)
        assert json.dumps([r.get(key) for r in one["rounds"]]) == json.dumps([r.get(key) for r in other["rounds"]])
    assert json.dumps(one["final"]["per_site"]) == json.dumps(other["final"]["per_site"])
    assert one["final"]["operating_point"] == other["final"]["operating_point"]


def test_one_message_per_site_per_round_and_a_site_that_lost_the_model_gets_the_weights(
    nodes: dict, tmp_path: Path
) -> None:
    config = _config()
    grid = RecordingGrid(nodes)
    report = run_federation(grid, config, tmp_path / "once")
    # per site: round 1's training request (scoring the starting model first), the last round's
    # validation scoring with the operating point's counts, the test split's (the model it holds)
    alpha = [(kind, carried) for kind, site, carried in grid.sent if site == "alpha"]
    assert alpha == [(MessageType.TRAIN, 1), (MessageType.EVALUATE, 1), (MessageType.EVALUATE, 0)]
    model = _model_bytes(report)
    assert [r["bytes_down"] for r in report["rounds"]] == [0, 3 * model]  # the rounds' requests: 1 model per site
    assert all(r["sites_aggregated"] == ["alpha", "beta", "gamma"] for r in report["rounds"][1:])
    assert all(set(r["metrics"]) == {"alpha", "beta", "gamma"} for r in report["rounds"])

    # Same sites (same seeds), beta's kept model gone before each evaluation request: beta gets the
    # weights in a second request and every number of the report is the same.
    again = RecordingGrid(nodes, forget=["beta"])
    _same_numbers(run_federation(again, config, tmp_path / "forgot"), report)
    beta = [carried for kind, site, carried in again.sent if kind == MessageType.EVALUATE and site == "beta"]
    assert beta == [1, 0, 1]  # the test split's request named by digest, answered unknown-model, sent again


def test_with_ema_the_sites_make_the_released_average_and_report_what_two_messages_did(
    nodes: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(**{"run.rounds": 3, "run.ema": 0.5})
    grid = RecordingGrid(nodes)
    report = run_federation(grid, config, tmp_path / "ema")
    model = _model_bytes(report)
    # In round 3 the sites score the average after round 2, which they make from the model they
    # scored in round 2 and the one they train from: one model per site per round.
    assert [r["bytes_down"] for r in report["rounds"]] == [0, 3 * model, 3 * model, 3 * model]
    assert all(carried == 1 for kind, _, carried in grid.sent if kind == MessageType.TRAIN)
    assert report["rounds"][3]["sites_aggregated"] == ["alpha", "beta", "gamma"]

    # gamma's kept scored model gone: it says so, trains, and is sent the average to score
    forgetful = RecordingGrid(nodes)
    original = forgetful.send_and_receive

    def forget(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if any(wire.SCORE_AVERAGE in m.content.config_records[wire.CONFIG] for m in messages):
            (Path(nodes[12]["state-dir"]) / held_model.SCORED_FILE).unlink()
        return original(messages, timeout=timeout)

    monkeypatch.setattr(forgetful, "send_and_receive", forget)
    _same_numbers(run_federation(forgetful, config, tmp_path / "forgot"), report)

    # The same run with a training and an evaluation request per round, as before: same report.
    monkeypatch.setattr(federation, "_folded", lambda config: False)
    _same_numbers(run_federation(RecordingGrid(nodes), config, tmp_path / "two"), report)


def test_a_resolved_request_is_the_request_a_full_send_makes(tmp_path: Path) -> None:
    arrays = model_to_arrays(torch.nn.Linear(3, 2))
    settings = {wire.PHASE: wire.PHASE_FEDERATED, wire.SERVER_ROUND: 2}

    def request() -> Message:
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(dict(settings))})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)

    full = request_digest(request())  # the privacy ledger's release key hashes this
    digest = held_model.keep(arrays, tmp_path)
    assert digest == held_model.model_digest(arrays)
    named = request()
    held_model.by_reference(named, digest)
    assert wire.ARRAYS not in named.content.array_records
    assert held_model.resolve(named, tmp_path) and request_digest(named) == full

    other = request()
    held_model.by_reference(other, "0" * 64)  # a model this site does not hold
    assert not held_model.resolve(other, tmp_path)
    (tmp_path / held_model.HELD_FILE).write_bytes(b"\x00not a record")  # a damaged file is no model
    damaged = request()
    held_model.by_reference(damaged, digest)
    assert not held_model.resolve(damaged, tmp_path)
    assert held_model.keep(arrays, tmp_path / held_model.HELD_FILE / "x") == ""  # cannot keep: no digest named
    assert array_bytes(arrays) > 0


def test_a_packed_model_is_one_array_and_unpacks_to_the_very_arrays() -> None:
    arrays = model_to_arrays(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({wire.SPLIT: "val"})})
    msg = Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=1)
    packing.pack(msg)
    assert len(msg.content.array_records[wire.ARRAYS]) == 1 and len(arrays) == 7  # the record sent is untouched
    packing.unpack(msg)
    assert held_model.model_digest(msg.content.array_records[wire.ARRAYS]) == held_model.model_digest(arrays)
    assert list(msg.content) == [wire.ARRAYS, wire.CONFIG]
    packing.pack(msg)
    msg.content.array_records[wire.ARRAYS] = model_to_arrays(torch.nn.Linear(2, 1))  # bytes unlike the layout
    with pytest.raises(ValueError, match="packed"):
        packing.unpack(msg)


class SlowGrid(InProcessGrid):
    """Replies become available to ``pull_messages`` only after ``delay`` seconds."""

    def __init__(self, nodes: dict[int, dict], delay: float) -> None:
        super().__init__(nodes)
        self.delay, self.pushed, self.pulls = delay, {}, 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for index, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{index}"
            ids.append(f"m{index}")
            self.pushed[f"m{index}"] = (time.monotonic() + self.delay, msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        ready = []
        for mid in message_ids:
            when, msg = self.pushed[mid]
            if time.monotonic() >= when:
                ready.append(Message(RecordDict(), reply_to=msg))
        return ready


def test_the_prompt_grid_collects_every_reply_or_stops_at_the_timeout() -> None:
    messages = [Message(RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=n) for n in (1, 2)]
    grid = SlowGrid({1: {}, 2: {}}, delay=0.3)
    started = time.monotonic()
    assert len(list(PromptGrid(grid).send_and_receive(messages, timeout=5))) == 2
    assert time.monotonic() - started < 0.3 + 0.3  # Flower's grid would look again after 3 s
    late = SlowGrid({1: {}, 2: {}}, delay=10)
    started = time.monotonic()
    assert list(PromptGrid(late).send_and_receive(messages, timeout=0.4)) == []
    assert 0.4 <= time.monotonic() - started < 1.0
