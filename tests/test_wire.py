"""The wire protocol on its own: what a site encodes, the server parses back, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType, RecordDict

from medfed import wire
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("task_identity")


def _request() -> Message:
    config = wire.request_config(tiny_config(), "/nowhere", "cfg-0", {wire.PHASE: wire.PHASE_FEDERATED})
    return Message(content=RecordDict({wire.CONFIG: config}), dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("status", wire.STATUSES)
def test_every_status_round_trips(status: str) -> None:
    sent = wire.SiteReply(
        "alpha", status, "why", {wire.NUM_EXAMPLES: 42.0, wire.EPSILON: 1.5}, privacy_unit="patient", notes="1 warning"
    )
    assert wire.parse_reply(wire.encode_reply(_request(), sent), "alpha") == sent


def test_weights_and_bare_replies_round_trip() -> None:
    arrays = ArrayRecord({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    parsed = wire.parse_reply(wire.encode_reply(_request(), wire.SiteReply("alpha", wire.OK, arrays=arrays)), "alpha")
    assert parsed.arrays is not None and np.array_equal(parsed.arrays["w"].numpy(), arrays["w"].numpy())
    bare = wire.parse_reply(wire.encode_reply(_request(), wire.SiteReply("alpha", wire.REFUSED, "no")), "alpha")
    assert (bare.arrays, bare.privacy_unit, bare.notes, bare.metrics) == (None, "", "", {})


def test_a_malformed_reply_is_refused_with_the_site_and_the_fault() -> None:
    reply = wire.encode_reply(_request(), wire.SiteReply("alpha", wire.OK, metrics={wire.NUM_EXAMPLES: 3.0}))
    del reply.content[wire.SITE]
    with pytest.raises(wire.MalformedReply, match=r"site node-7 sent a malformed reply \(KeyError"):
        wire.parse_reply(reply, "node-7")
    assert wire.reported_site_name(reply) is None
    reply = wire.encode_reply(_request(), wire.SiteReply("alpha", wire.OK))
    reply.content[wire.METRICS][wire.LOCAL_SECONDS] = [1.0, 2.0]  # a list where a number belongs
    with pytest.raises(wire.MalformedReply, match=r"site alpha sent a malformed reply \(TypeError"):
        wire.parse_reply(reply, "alpha")


def test_a_failed_site_is_named_with_flowers_reason() -> None:
    failed = Message(Error(code=0, reason="node gone"), reply_to=_request())
    with pytest.raises(wire.MalformedReply, match="site alpha failed: node gone"):
        wire.parse_reply(failed, "alpha")


def test_a_request_carries_the_config_and_its_settings() -> None:
    config, settings = wire.read_request(_request())
    assert config == tiny_config()
    assert settings[wire.PHASE] == wire.PHASE_FEDERATED and settings[wire.RUN_KEY] == "cfg-0"
    assert settings[wire.STATE_ROOT] == "/nowhere"
