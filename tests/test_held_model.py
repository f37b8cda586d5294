"""The model sent once per round (medfed.held_model): a train request names the model the site
scored on its validation split by digest; a site that lost it gets the weights; run.ema and
the privacy release key unchanged; the prompt grid collects replies as Flower's does."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from medfed import held_model, wire
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
    """Records whether each request carried weights; ``forget`` (site names) lose their held model
    before every train request."""

    def __init__(self, nodes: dict[int, dict], forget: Iterable[str] = ()) -> None:
        super().__init__(nodes)
        self.forget = set(forget)
        self.sent: list[tuple[str, str, bool]] = []  # (message type, site, weights sent)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            node = self.nodes[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.TRAIN and node["site-name"] in self.forget:
                (Path(node["state-dir"]) / held_model.HELD_FILE).unlink(missing_ok=True)
            carried = wire.ARRAYS in msg.content.array_records
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
    return report["rounds"][0]["bytes_down"] // len(report["sites"])  # round 0: the model once to every site


def test_a_round_sends_the_model_once_and_a_site_that_lost_it_gets_the_weights(nodes: dict, tmp_path: Path) -> None:
    config = _config()
    grid = RecordingGrid(nodes)
    report = run_federation(grid, config, tmp_path / "once")
    trains = [sent for kind, _, sent in grid.sent if kind == MessageType.TRAIN]
    assert trains and not any(trains)  # every train request named the model the site had just scored
    model = _model_bytes(report)
    assert [r["bytes_down"] for r in report["rounds"]] == [3 * model] * 2  # 1 model per site per round
    assert all(r["sites_aggregated"] == ["alpha", "beta", "gamma"] for r in report["rounds"][1:])

    # Same sites (same seeds), beta's kept model gone before each train request: beta gets the
    # weights in a second request and every number of the report is the same.
    again = RecordingGrid(nodes, forget=["beta"])
    second = run_federation(again, config, tmp_path / "forgot")
    assert [r["bytes_down"] for r in second["rounds"]] == [3 * model, 4 * model]
    beta = [sent for kind, site, sent in again.sent if kind == MessageType.TRAIN and site == "beta"]
    assert beta == [False, True]  # named by digest, answered unknown-model, sent again with the weights
    for key in ("metrics", "sites_aggregated", "outcomes"):  # (JSON: NaN == NaN)
        assert json.dumps([r.get(key) for r in second["rounds"]]) == json.dumps([r.get(key) for r in report["rounds"]])
    assert json.dumps(second["final"]["per_site"]) == json.dumps(report["final"]["per_site"])


def test_with_ema_the_trained_model_travels_as_before(nodes: dict, tmp_path: Path) -> None:
    report = run_federation(RecordingGrid(nodes), _config(**{"run.rounds": 3, "run.ema": 0.5}), tmp_path / "ema")
    model = _model_bytes(report)
    # The average after round 1 is round 1's model; after round 2 the sites score (and hold) an
    # average they never train from: in round 3 both models travel, as before.
    assert [r["bytes_down"] for r in report["rounds"]] == [3 * model, 3 * model, 3 * model, 2 * 3 * model]
    assert report["rounds"][3]["sites_aggregated"] == ["alpha", "beta", "gamma"]


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
