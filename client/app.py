"""Flower ClientApp: a site. It forwards each message to the site's long-lived worker
(:mod:`medfed.site_worker`), which answers it as :mod:`medfed.site` (and, for the exchanges of
secure aggregation, :mod:`medfed.secure_aggregation`) say; this module imports no torch, so a
message's own process starts fast."""

from __future__ import annotations

from flwr.clientapp import ClientApp

from medfed import secure_aggregation
from medfed.site_worker import forward

app = ClientApp()
app.train()(forward)
app.evaluate()(forward)

for _message_type in secure_aggregation.SITE_HANDLERS:  # "<category>.<action>"
    _category, _, _action = _message_type.partition(".")
    getattr(app, _category)(_action)(forward)
