"""A Flower grid that collects the sites' replies promptly: the deployed ServerApp's grid.

Flower 1.42's deployed grid (``send_and_receive``) looks for replies every 3 s, so every exchange
with the sites waited 1.5 s on average after the last reply came (two exchanges per round).
:class:`PromptGrid` sends and pulls through the grid it wraps, looking again after 0.05 s, then
less and less often, every :data:`REPLY_POLL_SECONDS` at most.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["REPLY_POLL_SECONDS", "PromptGrid"]

REPLY_POLL_SECONDS = 0.25  # the longest pause between two looks for replies
_FIRST_POLL_SECONDS = 0.05


class PromptGrid(Grid):
    """``grid`` with a ``send_and_receive`` that looks for replies every 0.05-0.25 s."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(  # noqa: PLR0913 - Flower's signature
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all came or ``timeout`` seconds passed (as
        Flower's own, which pulls every 3 s)."""
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = _FIRST_POLL_SECONDS
        while True:
            pulled = list(self.grid.pull_messages(pending))
            replies += pulled
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                return replies
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 1.5, REPLY_POLL_SECONDS)
