"""Secure aggregation (``run.secure-aggregation``): the coordinator learns only the weighted sum of
the sites' updates of a round, never one site's update, and the round survives sites that drop out.

This is the SecAgg protocol of Bonawitz et al. (CCS 2017; SecAgg+ with every site a neighbour of
every other, which suits federations of hospitals), run over medfed's own Message API loop with
Flower's cryptographic primitives: ECDH key agreement and Fernet encryption
(``flwr.common.secure_aggregation.crypto.symmetric_encryption``), Shamir secret sharing
(``...crypto.shamir``), keys on SECP384R1 (``flwr.supercore.primitives.asymmetric``). Flower's own
``SecAggPlusWorkflow`` / ``secaggplus_mod`` are not used: the workflow runs only inside Flower's
legacy ``DefaultWorkflow`` (``LegacyContext``, ``FitIns``/``FitRes`` strategies), the mod expects the
legacy ``fitres.*`` reply layout, and their mask generator folds each 256-bit key into a 32-bit
NumPy seed (flwrlabs/flower#7522), which a server can search. Masks here are AES-256-CTR key
streams of the full keys.

One round, four exchanges (message types ``query.secagg_keys``, ``query.secagg_shares``,
``train.secagg``, ``query.secagg_unmask``):

1. keys: each site makes two key pairs (one to encrypt shares, one to agree mask keys);
2. shares: each site draws a self-mask seed, splits it and its mask private key into Shamir
   shares (``threshold`` of them rebuild a secret), and sends each peer its shares encrypted;
3. train: each site trains, clips its update (trained minus received weights, floating tensors)
   to ``run.max-update-norm``, multiplies it by its example count, quantizes it to fixed point
   (:data:`FRACTION_BITS` bits below ``run.max-update-norm``), appends the count, and adds its
   self mask and one pairwise mask per peer (``+`` towards larger node ids, ``-`` towards smaller),
   all modulo 2**64: pairwise masks cancel in the sum;
4. unmask: the sites still there send, for each site whose masked update arrived, its self-mask
   seed share, and for each site that dropped after step 2, its mask private key share: the server
   removes the self masks and the dropped sites' pairwise masks, and holds the sum of the weighted
   updates and the total example count; it divides one by the other (FedAvg).

A site refuses to unmask a sum of fewer than ``threshold`` sites, a threshold of at most half the
sites, or a second unmask request in a round: what stops a server from unmasking one update.
"""

from __future__ import annotations

import base64
import functools
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from medfed import wire
from medfed.config import Config

__all__ = [
    "FRACTION_BITS",
    "KEYS",
    "MASKED",
    "MAX_SITE_EXAMPLES",
    "SHARES",
    "SITE_HANDLERS",
    "TRAIN",
    "UNMASK",
    "SecureRound",
    "handle_keys",
    "handle_shares",
    "handle_train",
    "handle_unmask",
    "mask_update",
    "plain_training_refusal",
    "quantization_step",
    "secure_round",
    "threshold_for",
    "unmask_sum",
]

log = logging.getLogger("medfed.secure_aggregation")

# Message types (Flower routes "<category>.<action>" to the ClientApp function of that action).
KEYS = "query.secagg_keys"
SHARES = "query.secagg_shares"
TRAIN = "train.secagg"
UNMASK = "query.secagg_unmask"

RECORD = "secagg"  # the protocol's ConfigRecord in a request and a reply
MASKED = "masked"  # the masked update in a train reply's ARRAYS record
STATE = "medfed-secagg"  # the site's protocol state in its Flower context (per run)

FRACTION_BITS = 24  # fixed-point resolution: run.max-update-norm / 2**24
MAX_SITE_EXAMPLES = 2**30  # a site's weight; with FRACTION_BITS, 2**9 sites fit below 2**63
MAX_SITES = 2**63 // (MAX_SITE_EXAMPLES << FRACTION_BITS)  # sites whose sum cannot overflow

# Keys of the RECORD in requests and replies.
_ROUND, _THRESHOLD, _NODES, _ENC_KEYS, _MASK_KEYS = "round", "threshold", "nodes", "enc-keys", "mask-keys"
_SOURCES, _CIPHERTEXTS, _DESTINATIONS = "sources", "ciphertexts", "destinations"
_SURVIVORS, _DROPPED, _OWNERS, _SHARE_LIST = "survivors", "dropped", "owners", "shares"
_ENC_KEY, _MASK_KEY = "enc-key", "mask-key"


class ProtocolError(ValueError):
    """A message of the protocol that a site or the server must not act on."""


# ---------------------------------------------------------------- arithmetic shared by both sides


def threshold_for(sites: int, fraction: float) -> int:
    """Shares needed to rebuild a secret among ``sites``: ``ceil(fraction * sites)``, at least a strict
    majority and at least 2 (a server that lies about who dropped gets either a site's self-mask seed
    or its mask key, never both)."""
    return max(2, sites // 2 + 1, math.ceil(fraction * sites - 1e-9))


def quantization_step(max_update_norm: float) -> float:
    """The fixed-point step of one weighted update value."""
    return max_update_norm / 2**FRACTION_BITS


def float_keys(reference: ArrayRecord) -> list[str]:
    """The tensors an update covers (floating point; integer buffers keep the global model's values)."""
    return [key for key, array in reference.items() if np.issubdtype(array.numpy().dtype, np.floating)]


def flatten(arrays: ArrayRecord, keys: list[str]) -> np.ndarray:
    """The tensors ``keys`` of ``arrays`` as one float64 vector."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([arrays[key].numpy().astype(np.float64).ravel() for key in keys])


def _prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uniform words modulo 2**64: the AES-256-CTR key stream of a 32-byte key."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8")  # read-only: an operand, never written


def _agreed_key(private_pem: bytes, public_pem: bytes) -> bytes:
    """The 32-byte key two sites agree on (ECDH + HKDF, Flower's ``generate_shared_key``)."""
    fernet_key = generate_shared_key(bytes_to_private_key(private_pem), bytes_to_public_key(public_pem))
    return base64.urlsafe_b64decode(fernet_key)


def _pair_sign(own: int, peer: int) -> int:
    return 1 if own < peer else -1


def mask_update(
    delta: np.ndarray,
    weight: int,
    max_update_norm: float,
    own: int,
    self_seed: bytes,
    pair_keys: dict[int, bytes],
) -> np.ndarray:
    """What a site sends: ``delta`` clipped to ``max_update_norm``, times ``weight``, in fixed point,
    then the weight, plus the self mask and the pairwise masks (``pair_keys``: peer node id to agreed
    key), modulo 2**64 (uint64)."""
    if not (isinstance(weight, int) and 0 < weight <= MAX_SITE_EXAMPLES):
        raise ProtocolError(f"the example count {weight} is not in [1, {MAX_SITE_EXAMPLES}]")
    if not np.isfinite(delta).all():
        raise ProtocolError("the update holds NaN or Inf")
    norm = float(np.linalg.norm(delta))
    clipped = delta * min(1.0, max_update_norm / norm) if norm > 0 else delta
    fixed = np.rint(clipped * (weight / quantization_step(max_update_norm))).astype(np.int64)
    vector = np.concatenate([fixed, np.array([weight], dtype=np.int64)]).view(np.uint64)
    np.add(vector, _prg(self_seed, vector.size), out=vector)
    for peer, key in pair_keys.items():
        (np.add if _pair_sign(own, peer) > 0 else np.subtract)(vector, _prg(key, vector.size), out=vector)
    return vector


def unmask_sum(
    masked_sum: np.ndarray,
    self_seeds: dict[int, bytes],
    dropped_keys: dict[int, bytes],
    mask_public_keys: dict[int, bytes],
) -> tuple[np.ndarray, int]:
    """The plain sum of the survivors' weighted fixed-point updates and their total weight, from the
    sum of their masked vectors, the survivors' self-mask seeds and the dropped sites' mask private
    keys (PEM); ``mask_public_keys`` holds every survivor's mask public key."""
    total = masked_sum.copy()
    for seed in self_seeds.values():
        np.subtract(total, _prg(seed, total.size), out=total)
    for dropped, private_pem in dropped_keys.items():
        for survivor in self_seeds:
            stream = _prg(_agreed_key(private_pem, mask_public_keys[survivor]), total.size)
            # the survivor added sign(survivor, dropped) * stream: take it back
            (np.subtract if _pair_sign(survivor, dropped) > 0 else np.add)(total, stream, out=total)
    plain = total.view(np.int64)
    return plain[:-1], int(plain[-1])


# ---------------------------------------------------------------- the site's side


def plain_training_refusal(msg: Message, node_config: dict[str, Any]) -> Message | None:
    """The refusal of a plain train message by a site whose node config says
    ``require-secure-aggregation = true`` (its update would reach the coordinator unmasked), or None.
    The request to make a personal model (:data:`wire.PHASE_PERSONALIZE`) is answered: it sends no weights."""
    if node_config.get("require-secure-aggregation", False) is not True:
        return None
    settings = msg.content.config_records.get(wire.CONFIG)
    if settings is not None and settings.get(wire.PHASE) == wire.PHASE_PERSONALIZE:
        return None
    reason = "this site sends updates only under secure aggregation (run.secure-aggregation = false was asked)"
    log.warning("site refuses a plain train message: %s", reason)
    return wire.encode_reply(msg, wire.SiteReply(_site_name(node_config), wire.REFUSED, reason))


def _site_name(node_config: dict[str, Any]) -> str:
    return str(node_config.get("site-name", "unknown"))


Handler = Callable[[Message, Context], Message]


def _guarded(handler: Handler) -> Handler:
    """``handler`` whose refusals (a request out of order or malformed, a share that does not
    decrypt) become an ``error`` reply that says why, logged at the site."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (ProtocolError, KeyError, TypeError, ValueError, InvalidToken) as err:
            reason = f"secure aggregation: {err or type(err).__name__}"
            log.error("%s", reason)
            return wire.encode_reply(msg, wire.SiteReply(_site_name(dict(context.node_config)), wire.ERROR, reason))

    return guarded


@dataclass
class _SiteState:
    """What a site keeps between the exchanges of one round (in its Flower context)."""

    stage: str = ""
    round: int = 0
    node: int = 0
    threshold: int = 0
    enc_secret: bytes = b""
    mask_secret: bytes = b""
    self_seed: bytes = b""
    peers: list[int] = field(default_factory=list)  # every site of the round, this one included
    enc_keys: list[bytes] = field(default_factory=list)
    mask_keys: list[bytes] = field(default_factory=list)
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> its self-mask seed share
    key_shares: dict[int, bytes] = field(default_factory=dict)  # owner -> its mask private key share

    @classmethod
    def load(cls, context: Context) -> _SiteState:
        if STATE not in context.state.config_records:
            return cls()
        record = context.state.config_records[STATE]
        state = cls(
            str(record["stage"]), int(cast(int, record["round"])), int(cast(int, record["node"])),
            int(cast(int, record["threshold"])), cast(bytes, record["enc-secret"]),
            cast(bytes, record["mask-secret"]), cast(bytes, record["self-seed"]),
            list(cast(list[int], record["peers"])), list(cast(list[bytes], record["enc-keys"])),
            list(cast(list[bytes], record["mask-keys"])),
        )  # fmt: skip
        owners = cast(list[int], record["share-owners"])
        state.seed_shares = dict(zip(owners, cast(list[bytes], record["seed-shares"]), strict=True))
        state.key_shares = dict(zip(owners, cast(list[bytes], record["key-shares"]), strict=True))
        return state

    def save(self, context: Context) -> None:
        owners = sorted(self.seed_shares)
        context.state[STATE] = ConfigRecord(
            {
                "stage": self.stage,
                "round": self.round,
                "node": self.node,
                "threshold": self.threshold,
                "enc-secret": self.enc_secret,
                "mask-secret": self.mask_secret,
                "self-seed": self.self_seed,
                "peers": self.peers,
                "enc-keys": self.enc_keys,
                "mask-keys": self.mask_keys,
                "share-owners": owners,
                "seed-shares": [self.seed_shares[o] for o in owners],
                "key-shares": [self.key_shares[o] for o in owners],
            }
        )


def _request(msg: Message, stage: str, state: _SiteState) -> ConfigRecord:
    """The protocol record of ``msg``, once the site is at the stage before ``stage`` of its round."""
    try:
        record = msg.content.config_records[RECORD]
        server_round = int(cast(int, record[_ROUND]))
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(f"the {stage} request has no valid '{RECORD}' record ({err})") from None
    if stage != "keys" and (state.stage != _PREVIOUS[stage] or state.round != server_round):
        raise ProtocolError(
            f"a {stage} request for round {server_round} out of order (this site is at "
            f"{state.stage or 'no stage'} of round {state.round})"
        )
    return record


_PREVIOUS = {"shares": "keys", "train": "shares", "unmask": "trained"}


def _reply(msg: Message, values: dict[str, Any]) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(values)}), reply_to=msg)


@_guarded
def handle_keys(msg: Message, context: Context) -> Message:
    """Exchange 1: start the round with two fresh key pairs; reply with the public keys."""
    record = _request(msg, "keys", _SiteState())
    enc_secret, enc_public = generate_key_pairs()
    mask_secret, mask_public = generate_key_pairs()
    state = _SiteState(
        "keys", int(cast(int, record[_ROUND])), msg.metadata.dst_node_id,
        enc_secret=private_key_to_bytes(enc_secret), mask_secret=private_key_to_bytes(mask_secret),
    )  # fmt: skip
    state.save(context)
    return _reply(msg, {_ENC_KEY: public_key_to_bytes(enc_public), _MASK_KEY: public_key_to_bytes(mask_public)})


@_guarded
def handle_shares(msg: Message, context: Context) -> Message:
    """Exchange 2: check the round's sites and threshold, split this site's self-mask seed and mask
    key into Shamir shares, and reply with each peer's shares encrypted for that peer."""
    state = _SiteState.load(context)
    record = _request(msg, "shares", state)
    nodes = list(cast(list[int], record[_NODES]))
    enc_keys, mask_keys = list(cast(list[bytes], record[_ENC_KEYS])), list(cast(list[bytes], record[_MASK_KEYS]))
    threshold = int(cast(int, record[_THRESHOLD]))
    own = nodes.index(state.node) if state.node in nodes else -1
    if len(set(nodes)) != len(nodes) or not len(nodes) == len(enc_keys) == len(mask_keys):
        raise ProtocolError("the round's node list is malformed")
    own_keys = [
        public_key_to_bytes(bytes_to_private_key(k).public_key()) for k in (state.enc_secret, state.mask_secret)
    ]
    if own < 0 or [enc_keys[own], mask_keys[own]] != own_keys:
        raise ProtocolError("the round's key list does not hold this site's own keys")
    if len(set(enc_keys + mask_keys)) != 2 * len(nodes):
        raise ProtocolError("two sites of the round have the same public key")
    if not len(nodes) // 2 + 1 <= threshold <= len(nodes) or threshold < 2:
        raise ProtocolError(f"threshold {threshold} of {len(nodes)} sites: a server could unmask one site's update")
    state.stage, state.threshold, state.peers, state.enc_keys, state.mask_keys = (
        "shares",
        threshold,
        nodes,
        enc_keys,
        mask_keys,
    )
    state.self_seed = secrets.token_bytes(32)
    seed_shares = create_shares(state.self_seed, threshold, len(nodes))
    key_shares = create_shares(state.mask_secret, threshold, len(nodes))
    destinations, ciphertexts = [], []
    for index, (peer, enc_key) in enumerate(zip(nodes, enc_keys, strict=True)):
        if peer == state.node:
            state.seed_shares[peer], state.key_shares[peer] = seed_shares[index], key_shares[index]
            continue
        key = generate_shared_key(bytes_to_private_key(state.enc_secret), bytes_to_public_key(enc_key))
        plaintext = share_keys_plaintext_concat(state.node, peer, seed_shares[index], key_shares[index])
        destinations.append(peer)
        ciphertexts.append(encrypt(key, plaintext))
    state.save(context)
    return _reply(msg, {_DESTINATIONS: destinations, _CIPHERTEXTS: ciphertexts})


def _received_shares(state: _SiteState, record: ConfigRecord) -> dict[int, bytes]:
    """Decrypt and keep the shares the peers sent this site; the mask keys agreed with those peers
    (peer node id to key): the peers whose pairwise masks this site's update carries."""
    sources, ciphertexts = list(cast(list[int], record[_SOURCES])), list(cast(list[bytes], record[_CIPHERTEXTS]))
    peers = {peer: index for index, peer in enumerate(state.peers)}
    if len(set(sources)) != len(sources) or len(sources) != len(ciphertexts):
        raise ProtocolError("the forwarded shares are malformed")
    if any(source not in peers or source == state.node for source in sources):
        raise ProtocolError("shares forwarded from a site that is not a peer of this round")
    if len(sources) + 1 < state.threshold:
        raise ProtocolError(f"{len(sources) + 1} sites remain, fewer than the threshold {state.threshold}")
    pair_keys = {}
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        enc_key = state.enc_keys[peers[source]]
        key = generate_shared_key(bytes_to_private_key(state.enc_secret), bytes_to_public_key(enc_key))
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        if (sender, receiver) != (source, state.node):
            raise ProtocolError(f"a share from site {source} was made by {sender} for {receiver}")
        state.seed_shares[source], state.key_shares[source] = seed_share, key_share
        pair_keys[source] = _agreed_key(state.mask_secret, state.mask_keys[peers[source]])
    return pair_keys


@_guarded
def handle_train(msg: Message, context: Context) -> Message:
    """Exchange 3: keep the peers' shares, then train as :func:`medfed.site.handle_train` does and
    reply with the masked update (:func:`mask_update`) in place of the weights."""
    from medfed.site import handle_train as train_site

    state = _SiteState.load(context)
    pair_keys = _received_shares(state, _request(msg, "train", state))
    max_update_norm = wire.read_request(msg)[0].run.max_update_norm
    state.stage = "trained"  # whatever training gives, this site holds its peers' shares for the unmask
    state.save(context)

    def package(received: ArrayRecord, trained: ArrayRecord, examples: int) -> ArrayRecord:
        keys = float_keys(received)
        delta = flatten(trained, keys) - flatten(received, keys)
        vector = mask_update(delta, examples, max_update_norm, state.node, state.self_seed, pair_keys)
        return ArrayRecord({MASKED: Array(vector)})

    return train_site(msg, dict(context.node_config), context.run_id, package=package)


@_guarded
def handle_unmask(msg: Message, context: Context) -> Message:
    """Exchange 4: for each site in the sum, its self-mask seed share; for each site that dropped,
    its mask key share. Once per round, and only for a sum of at least ``threshold`` sites."""
    state = _SiteState.load(context)
    record = _request(msg, "unmask", state)
    survivors, dropped = list(cast(list[int], record[_SURVIVORS])), list(cast(list[int], record[_DROPPED]))
    asked = survivors + dropped
    if len(set(asked)) != len(asked) or any(node not in state.seed_shares for node in asked):
        raise ProtocolError("the unmask request names a site twice or a site whose shares this site does not hold")
    if len(survivors) < state.threshold:
        raise ProtocolError(f"a sum of {len(survivors)} site(s) is below the threshold {state.threshold}")
    state.stage = "unmasked"  # a second request this round (another list of survivors) is refused
    state.save(context)
    shares = [state.seed_shares[node] for node in survivors] + [state.key_shares[node] for node in dropped]
    return _reply(msg, {_OWNERS: asked, _SHARE_LIST: shares})


SITE_HANDLERS: dict[str, Handler] = {
    KEYS: handle_keys,
    SHARES: handle_shares,
    TRAIN: handle_train,
    UNMASK: handle_unmask,
}
"""The site's function for each message type of the protocol (registered by the ClientApp)."""


# ---------------------------------------------------------------- the server's side


Exchange = Callable[[list[Message], float], list[Message]]


@dataclass
class SecureRound:
    """One round of secure aggregation: the new global weights (None when the round failed, with
    ``failure`` saying why), the sites in the sum (their parsed train replies, weights removed),
    the total example count, the sites that dropped out and why, the threshold, and the bytes moved
    by the protocol (keys, encrypted shares, masked updates; the model sent down is not counted)."""

    arrays: ArrayRecord | None
    summed: dict[int, wire.SiteReply]
    total_examples: int
    dropped: dict[int, str]
    threshold: int
    bytes_up: int = 0
    bytes_down: int = 0
    failure: str = ""


def _record_bytes(record: ConfigRecord) -> int:
    """Bytes of a protocol record's values (bytes as they are, numbers as 8)."""
    size = 0
    for value in record.values():
        for item in value if isinstance(value, list) else [value]:
            size += len(item) if isinstance(item, bytes | str) else 8
    return size


class _Exchanges:
    """The server's exchanges with the sites, counting bytes and naming the node behind each reply
    (Flower answers for a node that died with an error from the SuperLink's own id)."""

    def __init__(self, exchange: Exchange, timeout: float, result: SecureRound) -> None:
        self.exchange, self.timeout, self.result = exchange, timeout, result

    def send(
        self, kind: str, records: dict[int, ConfigRecord], train: dict[int, Message] | None = None
    ) -> dict[int, Message]:
        messages = []
        for node, record in records.items():
            self.result.bytes_down += _record_bytes(record)
            if train is None:
                messages.append(Message(RecordDict({RECORD: record}), dst_node_id=node, message_type=kind))
            else:
                content = RecordDict({**dict(train[node].content.items()), RECORD: record})
                group = train[node].metadata.group_id
                messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=group))
        replies = self.exchange(messages, self.timeout)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        answers: dict[int, Message] = {}
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id) or reply.metadata.src_node_id
            if node not in records or node in answers:
                continue
            if reply.has_error():
                self.result.dropped[node] = f"failed: {reply.error.reason}"
                continue
            answers[node] = reply
        for node in records:
            if node not in answers and node not in self.result.dropped:
                self.result.dropped[node] = "no reply"
        return answers

    def protocol_record(self, node: int, reply: Message) -> ConfigRecord | None:
        """The protocol record of a reply, or None (the site is noted as dropped)."""
        record = reply.content.config_records.get(RECORD)
        if record is None:
            try:
                parsed = wire.parse_reply(reply, str(node))
                self.result.dropped[node] = f"{parsed.status}: {parsed.reason}"
            except wire.MalformedReply:
                self.result.dropped[node] = "its reply has no secure-aggregation record"
            return None
        self.result.bytes_up += _record_bytes(record)
        return record


def secure_round(
    exchange: Exchange,
    train_messages: list[Message],
    reference: ArrayRecord,
    config: Config,
    read: Callable[[Message], wire.SiteReply],
    server_round: int,
) -> SecureRound:
    """Run the four exchanges with the sites ``train_messages`` go to (each message's content is
    what that site trains on) and return the new global weights: ``reference`` plus the
    example-weighted mean of the sites' clipped updates. ``read`` parses a train reply (raising
    :class:`medfed.wire.MalformedReply`), ``exchange`` sends messages and waits for the replies."""
    train = {m.metadata.dst_node_id: m for m in train_messages}
    fraction, timeout = config.run.secure_aggregation_threshold, config.run.round_timeout
    result = SecureRound(None, {}, 0, {}, threshold_for(len(train), fraction))
    link = _Exchanges(exchange, timeout, result)
    if not 2 <= len(train) <= MAX_SITES:
        result.failure = f"{len(train)} site(s) sampled: secure aggregation needs 2 to {MAX_SITES}"
        return result

    keys: dict[int, tuple[bytes, bytes]] = {}
    for node, reply in link.send(KEYS, {n: ConfigRecord({_ROUND: server_round}) for n in train}).items():
        record = link.protocol_record(node, reply)
        try:
            pair = (cast(bytes, record[_ENC_KEY]), cast(bytes, record[_MASK_KEY])) if record is not None else None
            if pair is not None:
                bytes_to_public_key(pair[0]), bytes_to_public_key(pair[1])
                keys[node] = pair
        except (KeyError, TypeError, ValueError) as err:
            result.dropped[node] = f"sent unusable public keys ({type(err).__name__})"
    first = sorted(keys)
    result.threshold = threshold_for(len(first), fraction)
    if not _enough(result, first, "sent public keys"):
        return result

    common: dict[str, Any] = {
        _ROUND: server_round, _THRESHOLD: result.threshold, _NODES: first,
        _ENC_KEYS: [keys[n][0] for n in first], _MASK_KEYS: [keys[n][1] for n in first],
    }  # fmt: skip
    forwarded: dict[int, dict[int, bytes]] = {node: {} for node in first}  # receiver -> sender -> ciphertext
    for node, reply in link.send(SHARES, {n: ConfigRecord(common) for n in first}).items():
        record = link.protocol_record(node, reply)
        if record is None:
            continue
        destinations, ciphertexts = record.get(_DESTINATIONS), record.get(_CIPHERTEXTS)
        expected = sorted(set(first) - {node})
        if not (isinstance(destinations, list) and isinstance(ciphertexts, list) and sorted(destinations) == expected
                and len(ciphertexts) == len(destinations) and all(isinstance(c, bytes) for c in ciphertexts)):  # fmt: skip
            result.dropped[node] = "sent shares for the wrong sites"
            continue
        for destination, ciphertext in zip(cast(list[int], destinations), ciphertexts, strict=True):
            forwarded[destination][node] = cast(bytes, ciphertext)
    second = sorted(n for n in first if n not in result.dropped)
    if not _enough(result, second, "shared their keys"):
        return result

    masked_sum, summed = _collect_masked(link, train, forwarded, second, reference, read, server_round)
    third = sorted(summed)
    if masked_sum is None or not _enough(result, third, "sent a masked update"):
        return result

    lost = sorted(set(second) - set(third))
    requests = {n: ConfigRecord({_ROUND: server_round, _SURVIVORS: third, _DROPPED: lost}) for n in third}
    shares: dict[int, list[bytes]] = {node: [] for node in second}
    for node, reply in link.send(UNMASK, requests).items():
        record = link.protocol_record(node, reply)
        owners, values = (record.get(_OWNERS), record.get(_SHARE_LIST)) if record is not None else (None, None)
        if not (isinstance(owners, list) and isinstance(values, list) and sorted(owners) == sorted(third + lost)
                and len(values) == len(owners) and all(isinstance(v, bytes) for v in values)):  # fmt: skip
            result.dropped.setdefault(node, "sent no usable unmask shares")
            continue
        for owner, share in zip(cast(list[int], owners), values, strict=True):
            shares[owner].append(cast(bytes, share))
    _finish(result, masked_sum, shares, third, lost, {n: keys[n][1] for n in third}, reference, config)
    if result.arrays is not None:
        result.summed = summed
    return result


def _enough(result: SecureRound, nodes: list[int], what: str) -> bool:
    if len(nodes) >= result.threshold:
        return True
    result.failure = f"{len(nodes)} site(s) {what}, fewer than the threshold {result.threshold}"
    return False


def _collect_masked(
    link: _Exchanges,
    train: dict[int, Message],
    forwarded: dict[int, dict[int, bytes]],
    nodes: list[int],
    reference: ArrayRecord,
    read: Callable[[Message], wire.SiteReply],
    server_round: int,
) -> tuple[np.ndarray | None, dict[int, wire.SiteReply]]:
    """Exchange 3: forward each site its peers' encrypted shares with the model to train; the sum of
    the masked updates that arrived well-formed, and those sites' replies (the masked update removed)."""
    length = sum(reference[key].numpy().size for key in float_keys(reference)) + 1
    requests = {}
    for node in nodes:
        sources = [s for s in nodes if s != node]
        requests[node] = ConfigRecord(
            {_ROUND: server_round, _SOURCES: sources, _CIPHERTEXTS: [forwarded[node][s] for s in sources]}
        )
    total: np.ndarray | None = None
    summed: dict[int, wire.SiteReply] = {}
    for node, reply in link.send(TRAIN, requests, train).items():
        try:
            parsed = read(reply)
        except wire.MalformedReply as err:
            link.result.dropped[node] = str(err)
            continue
        if parsed.status != wire.OK:
            link.result.dropped[node] = f"{parsed.status}: {parsed.reason}"
            continue
        vector = _masked_vector(parsed.arrays, length)
        if vector is None:
            link.result.dropped[node] = f"sent no masked update of {length} uint64 values"
            continue
        link.result.bytes_up += len(cast(ArrayRecord, parsed.arrays)[MASKED].data)
        if total is None:
            total = vector.copy()
        else:
            np.add(total, vector, out=total)
        parsed.arrays = None  # nothing of one site's update outlives the sum
        summed[node] = parsed
    return total, summed


def _masked_vector(arrays: ArrayRecord | None, length: int) -> np.ndarray | None:
    if arrays is None or list(arrays.keys()) != [MASKED]:
        return None
    try:
        vector = arrays[MASKED].numpy()
    except (ValueError, TypeError):
        return None
    return vector if vector.dtype == np.uint64 and vector.shape == (length,) else None


def _finish(
    result: SecureRound,
    masked_sum: np.ndarray,
    shares: dict[int, list[bytes]],
    survivors: list[int],
    lost: list[int],
    mask_public_keys: dict[int, bytes],
    reference: ArrayRecord,
    config: Config,
) -> None:
    """Exchange 4's end: rebuild the secrets, unmask the sum, check it and apply the weighted mean."""
    short = [node for node, values in shares.items() if len(values) < result.threshold]
    if short:
        result.failure = f"fewer than {result.threshold} unmask shares for {len(short)} site(s)"
        return
    try:
        seeds = {node: combine_shares(shares[node]) for node in survivors}
        dropped_keys = {node: combine_shares(shares[node]) for node in lost}
        for pem in dropped_keys.values():
            bytes_to_private_key(pem)
        if any(len(seed) != 32 for seed in seeds.values()):
            raise ValueError("a rebuilt self-mask seed is not 32 bytes")
    except (ValueError, TypeError) as err:
        result.failure = f"the unmask shares do not rebuild the secrets ({err})"
        return
    plain, total = unmask_sum(masked_sum, seeds, dropped_keys, mask_public_keys)
    result.failure = _aggregate_problem(plain, total, len(survivors), config.run.max_update_norm)
    if result.failure:
        return
    result.total_examples = total
    mean = plain.astype(np.float64) * (quantization_step(config.run.max_update_norm) / total)
    out, offset = {}, 0
    for key, array in reference.items():
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating):
            value = (value.astype(np.float64) + mean[offset : offset + value.size].reshape(value.shape)).astype(
                value.dtype
            )
            offset += value.size
        out[key] = Array(np.ascontiguousarray(value))
    result.arrays = ArrayRecord(out)


def _aggregate_problem(plain: np.ndarray, total: int, sites: int, max_update_norm: float) -> str:
    """Why the unmasked sum cannot be applied, or "": the total count must be that of ``sites`` sites
    and the weighted sum within ``total * run.max-update-norm`` (each site clipped its own update;
    plus the rounding of ``sites`` fixed-point vectors). A site that sent garbage makes the sum
    garbage: the round is then lost as a whole (no single update can be left out)."""
    if not sites <= total <= sites * MAX_SITE_EXAMPLES:
        return (
            f"the unmasked example count {total} is not possible for {sites} site(s): a site sent a bad masked update"
        )
    step = quantization_step(max_update_norm)
    norm = float(np.linalg.norm(plain.astype(np.float64))) * step
    bound = total * max_update_norm + math.sqrt(plain.size) * sites * step
    if not math.isfinite(norm) or norm > bound:
        return (
            f"the unmasked weighted sum has norm {norm:.3g}, above {bound:.3g} (the sites' example count times "
            "run.max-update-norm): a site sent a bad masked update"
        )
    return ""
