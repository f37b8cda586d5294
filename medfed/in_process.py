"""A Flower Grid that delivers each message straight to this process's site handlers: a federation
run in one process, without Ray or a SuperLink (tests, and benchmarks that need it repeatable)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from medfed import packing
from medfed.site import handle_evaluate, handle_train

__all__ = ["InProcessGrid"]


class InProcessGrid(Grid):
    """Delivers each message to the site handlers with the node config of the node it is addressed
    to (``nodes``: node id -> node config); ``tamper(node, reply)`` may alter a train reply. Models
    travel packed (:mod:`medfed.packing`), as between processes."""

    def __init__(
        self, nodes: dict[int, dict[str, Any]], tamper: Callable[[int, Message], None] | None = None, run_id: int = 42
    ) -> None:
        self.nodes = nodes
        self.tamper = tamper
        self.run_id = run_id

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            packing.unpack(msg)  # as the site's ClientApp does (medfed.site_worker.forward)
            if msg.metadata.message_type == MessageType.TRAIN:
                reply = handle_train(msg, self.nodes[node], run_id=self.run_id)
                if self.tamper:
                    self.tamper(node, reply)
            else:
                reply = handle_evaluate(msg, self.nodes[node])
            packing.pack(reply)
            replies.append(reply)
        return replies
