"""Flower ClientApp: a site. Everything it does is in :mod:`medfed.site` (and, for the exchanges of
secure aggregation, :mod:`medfed.secure_aggregation`)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medfed import secure_aggregation
from medfed.site import handle_evaluate, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    refusal = secure_aggregation.plain_training_refusal(msg, node_config)
    return refusal or handle_train(msg, node_config, context.run_id)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, dict(context.node_config))


for _message_type, _handler in secure_aggregation.SITE_HANDLERS.items():  # "<category>.<action>"
    _category, _, _action = _message_type.partition(".")
    getattr(app, _category)(_action)(_handler)
