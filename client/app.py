"""Flower ClientApp: a site. Everything it does is in :mod:`medfed.site`."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medfed.site import handle_evaluate, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, dict(context.node_config), context.run_id)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, dict(context.node_config))
