"""The model a site holds: the last weights the server sent it, so that the server can send the
digest of a model the site already has instead of the weights.

A round's training request carries new weights (it also asks the site to score them on its
validation split, :data:`medfed.wire.SCORE`), but the requests after the rounds (the released
model's scoring on the validation, then the test split) send the same model again. A site keeps
the last weights it received (:func:`keep`: one file, ``STATE_DIR/held-model.pb``) and names them
in each reply (:func:`medfed.wire.held_model`); a request whose weights are that model carries their digest
instead (:func:`by_reference`, the setting :data:`medfed.wire.MODEL_DIGEST`), and the site puts
the weights back (:func:`resolve`) before anything reads the request: the handlers, and the
privacy ledger's release key (a digest of the request), see the very request a full send makes.
A site that does not hold the model (its state folder was cleared, a damaged file) answers
:data:`medfed.wire.UNKNOWN_MODEL`, and the server sends the weights. It also keeps the last
model a training request asked it to score (:data:`SCORED_FILE`): with ``run.ema`` the next
request asks it to score the moving average of that model and the new weights, which it makes
itself (:func:`kept` finds the model by digest). This module imports no torch.
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

__all__ = ["HELD_FILE", "SCORED_FILE", "by_reference", "keep", "kept", "model_digest", "resolve"]

log = logging.getLogger("medfed.held_model")

HELD_FILE = "held-model.pb"  # in the site's state folder: the last weights received (Flower's record encoding)
SCORED_FILE = "scored-model.pb"  # beside it: the last model scored by a training request (wire.SCORE)


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
    arrays = kept(folder, wanted) if isinstance(wanted, str) else None
    if arrays is None:
        return False
    content = RecordDict({key: record for key, record in msg.content.items() if key != wire.CONFIG})
    content[wire.ARRAYS] = arrays
    content[wire.CONFIG] = ConfigRecord({k: v for k, v in settings.items() if k != wire.MODEL_DIGEST})
    msg.content = content
    return True


def kept(folder: Path, digest: str, name: str = HELD_FILE) -> ArrayRecord | None:
    """The weights kept in ``folder``/``name`` if their digest is ``digest``, else None."""
    arrays = _load(folder / name)
    return arrays if arrays is not None and model_digest(arrays) == digest else None


def keep(arrays: ArrayRecord, folder: Path, name: str = HELD_FILE) -> str:
    """Keep ``arrays`` as the model this site holds (``name``: or another one, e.g. the one it
    scored), atomically, replacing the one before; its digest, or "" when it cannot be kept (the
    reason is logged: the server then sends weights)."""
    path = folder / name
    hidden = path.with_name(f".{name}")
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
