"""A model as one array on the wire: Flower 1.42 sends every array of an ArrayRecord as an object
of its own, pushed and pulled by one request each (with a retry backoff when a SuperNode sees a
message before all of them are there). :func:`pack` makes each model record of a message (the
weights, the model to score) one array, its arrays' bytes end to end, and writes the layout beside
it in a ConfigRecord; :func:`unpack` gives back the very arrays (names, dtypes, shapes, encodings
and bytes), so digests and handlers see what was sent. The server packs what it sends and unpacks
what it receives where it exchanges messages with the sites (``medfed.federation``); a site
likewise where its ClientApp takes a message (:func:`medfed.site_worker.forward`), and the
in-process transport (:class:`medfed.in_process.InProcessGrid`) as they do. This module imports
no torch.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from medfed import wire

__all__ = ["PACKED_STYPE", "pack", "unpack"]

PACKED_STYPE = "medfed.packed"  # the one array of a packed record: its arrays' bytes end to end
_LAYOUT = "packed-layout:"  # + record name: the ConfigRecord with that record's layout (JSON)
_ENTRY = "packed"  # the name of the one array of a packed record


def pack(msg: Message) -> None:
    """Make the model records of ``msg`` (:data:`medfed.wire.ARRAYS`, :data:`medfed.wire.SCORED`)
    one array each when they hold more than one (``msg`` gets a new content; the records it had
    are left as they are)."""
    if msg.has_error():
        return
    names = [name for name in (wire.ARRAYS, wire.SCORED) if len(msg.content.array_records.get(name, ())) > 1]
    if not names:
        return
    content = RecordDict(dict(msg.content.items()))
    for name in names:
        record = msg.content.array_records[name]
        layout = [[key, array.dtype, list(array.shape), array.stype, len(array.data)] for key, array in record.items()]
        blob = b"".join(array.data for array in record.values())
        content[name] = ArrayRecord({_ENTRY: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})
        content[_LAYOUT + name] = ConfigRecord({"arrays": json.dumps(layout)})
    msg.content = content


def unpack(msg: Message) -> None:
    """Give the packed ArrayRecords of ``msg`` their arrays back (in place).

    Raises:
        ValueError: a packed record whose layout is missing or does not match its bytes.
    """
    if msg.has_error():
        return
    layouts = [key for key in msg.content if key.startswith(_LAYOUT)]
    if not layouts:
        return
    content = RecordDict({key: record for key, record in msg.content.items() if not key.startswith(_LAYOUT)})
    for key in layouts:
        name = key[len(_LAYOUT) :]
        try:
            packed = msg.content.array_records[name][_ENTRY]
            layout = json.loads(str(msg.content.config_records[key]["arrays"]))
            arrays, start = {}, 0
            for entry, dtype, shape, stype, size in layout:
                data = packed.data[start : start + int(size)]
                arrays[str(entry)] = Array(dtype=str(dtype), shape=tuple(int(n) for n in shape), stype=str(stype),
                                           data=data)  # fmt: skip
                start += int(size)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the packed record {name!r} is malformed ({type(err).__name__}: {err})") from err
        if packed.stype != PACKED_STYPE or start != len(packed.data):
            raise ValueError(f"the packed record {name!r} does not match its layout")
        content[name] = ArrayRecord(arrays)
    msg.content = content
