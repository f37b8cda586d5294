"""The model a site holds: the last weights the server sent it, so that the server can send the
digest of a model the site already has instead of the weights.

In every round the server sends the global model to each site twice: to score on the validation
split after aggregation, then to train from in the next round. A site keeps the last weights it
received (:func:`keep`: one file, ``STATE_DIR/held-model.pb``) and names them in each reply
(:func:`medfed.wire.held_model`); a request whose weights are that model carries their digest
instead (:func:`by_reference`, the setting :data:`medfed.wire.MODEL_DIGEST`), and the site puts
the weights back (:func:`resolve`) before anything reads the request: the handlers, and the
privacy ledger's release key (a digest of the request), see the very request a full send makes.
A site that does not hold the model (its state folder was cleared, a damaged file) answers
:data:`medfed.wire.UNKNOWN_MODEL`, and the server sends the weights. This module imports no torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from medfed import wire

__all__ = ["HELD_FILE", "by_reference", "keep", "model_digest", "resolve"]

log = logging.getLogger("medfed.held_model")

HELD_FILE = "held-model.pb"  # in the site's state folder: the last weights received (Flower's record encoding)


def model_digest(arrays: ArrayRecord) -> str:
    """The SHA-256 of a model's weights: every array's name, dtype, shape, encoding and bytes, in order."""
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(repr((key, array.dtype, tuple(array.shape), array.stype)).encode())
        digest.update(array.data)
    return digest.hexdigest()


def by_reference(msg: Message, digest: str) -> None:
    """Make ``msg`` (a request with weights) carry the weights' ``digest`` in its settings instead."""
    content = RecordDict({key: record for key, record in msg.content.items() if key != wire.ARRAYS})
    content[wire.CONFIG] = ConfigRecord({**msg.content.config_records[wire.CONFIG], wire.MODEL_DIGEST: digest})
    msg.content = content


def resolve(msg: Message, folder: Path) -> bool:
    """Put the weights a request refers to (:data:`medfed.wire.MODEL_DIGEST`) back into it, as the
    server would have sent them; False when the site does not hold that model (the request is
    left as it is). A request that carries its weights is left as it is (True)."""
    settings = msg.content.config_records.get(wire.CONFIG)
    if settings is None or wire.MODEL_DIGEST not in settings:
        return True
    wanted = settings[wire.MODEL_DIGEST]
    arrays = _load(folder / HELD_FILE)
    if not isinstance(wanted, str) or arrays is None or model_digest(arrays) != wanted:
        return False
    content = RecordDict({key: record for key, record in msg.content.items() if key != wire.CONFIG})
    content[wire.ARRAYS] = arrays
    content[wire.CONFIG] = ConfigRecord({k: v for k, v in settings.items() if k != wire.MODEL_DIGEST})
    msg.content = content
    return True


def keep(arrays: ArrayRecord, folder: Path) -> str:
    """Keep ``arrays`` as the model this site holds (atomically, replacing the one before); its
    digest, or "" when it cannot be kept (the reason is logged: the server then sends weights)."""
    path = folder / HELD_FILE
    hidden = path.with_name(f".{HELD_FILE}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        hidden.write_bytes(recorddict_to_proto(RecordDict({wire.ARRAYS: arrays})).SerializeToString())
        os.replace(hidden, path)
    except OSError as err:
        log.warning("the received model is not kept in %s (%s): the server will send it again", folder, err)
        return ""
    return model_digest(arrays)


def _load(path: Path) -> ArrayRecord | None:
    """The weights kept in ``path``; None when there are none or the file is damaged."""
    try:
        record = recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))
        return record.array_records[wire.ARRAYS]
    except FileNotFoundError:
        return None
    except (OSError, DecodeError, KeyError, TypeError, ValueError) as err:
        log.warning("ignoring the kept model %s: %s", path.name, err)
        return None
