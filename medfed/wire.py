"""What the server and the sites say to each other: record and key names, phases, statuses, and
the encode / parse pair of a site's reply.

A request (server to site) is ``RecordDict({ARRAYS: ArrayRecord, CONFIG: ConfigRecord})``: the
config record holds the run's config as JSON (:data:`MEDFED_CONFIG`, made by :func:`request_config`,
read by :func:`read_request`) and the message's own settings (:data:`PHASE`, :data:`SPLIT`, ...).
A request for the model its site holds carries :data:`MODEL_DIGEST` instead of ARRAYS
(:mod:`medfed.held_model`, which puts the weights back before the site's handlers read it).
A training request with :data:`SCORE` also asks the site to score a model on its validation split
first (the model it trains from, or :data:`SCORED` when another one is released, or, with
:data:`SCORE_AVERAGE`, the moving average the site makes itself from the model it scored last):
one message per site per round, whose reply carries those metrics in a :data:`SCORES` record
(:func:`attach_scores`, read back into :attr:`SiteReply.scores`) and names the model the site
scored (:func:`scored_model`).
A reply (site to server) is ``RecordDict({METRICS: MetricRecord, SITE: ConfigRecord[, ARRAYS]})``:
the site record says who answers and how it went (one of :data:`STATUSES`) and which model the
site holds (:func:`held_model`), made by :func:`encode_reply` and read back by :func:`parse_reply`.

Some names are Flower's own and must stay as they are: its strategies read ``"arrays"``,
``"config"`` and ``"num-examples"`` and write ``"server-round"`` and (FedProx) ``"proximal-mu"``.
Nothing here may carry a path, an image or a patient id (design.md, non-negotiables).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medfed.config import Config

__all__ = [
    "ARRAYS",
    "BUDGET",
    "CONFIG",
    "DELTA",
    "EMPTY",
    "EPSILON",
    "ERROR",
    "LOCAL_SECONDS",
    "MAX_GRAD_NORM",
    "MEDFED_CONFIG",
    "METRICS",
    "MODEL_DIGEST",
    "NOISE_MULTIPLIER",
    "NUM_EXAMPLES",
    "OK",
    "PHASE",
    "PHASE_FEDERATED",
    "PHASE_LOCAL",
    "PHASE_PERSONALIZE",
    "PERSONAL",
    "INTERVALS",
    "PRIVACY_METRICS",
    "PROXIMAL_MU",
    "REFUSED",
    "RUN_KEY",
    "SAMPLE_RATE",
    "SCORE",
    "SCORED",
    "SCORED_DIGEST",
    "SCORE_AVERAGE",
    "SCORE_BASE",
    "SCORES",
    "SCORE_COUNTS",
    "SCORING_SETTINGS",
    "SERVER_ROUND",
    "SITE",
    "SPLIT",
    "STATE_ROOT",
    "STATUSES",
    "STEPS",
    "SYNTHETIC_EPSILON",
    "SYNTHETIC_IMAGES",
    "SYNTHETIC_PREFIX",
    "SYNTHETIC_PRIVATE",
    "SYNTHETIC_SECONDS",
    "SYNTHETIC_STEPS",
    "THRESHOLD",
    "LABEL_THRESHOLDS",
    "TRAIN_LOSS",
    "UNKNOWN_MODEL",
    "MalformedReply",
    "SiteReply",
    "attach_scores",
    "encode_reply",
    "held_model",
    "mark_held",
    "parse_reply",
    "read_content",
    "read_request",
    "reply_status",
    "scored_model",
    "reported_site_name",
    "request_config",
    "setting",
]

# The records of a message.
ARRAYS = "arrays"  # the model's weights (both ways)
CONFIG = "config"  # request: the run's config and the message's settings
METRICS = "metrics"  # reply: the site's numbers
SITE = "site"  # reply: who answers, and how it went
SCORED = "scored-arrays"  # train request with SCORE: the model to score when it is not ARRAYS (run.ema)
SCORES = "scores"  # reply to a train request with SCORE: the validation metrics of the model scored

# Request settings (keys of the CONFIG record).
MEDFED_CONFIG = "medfed-config"  # the run's Config as JSON
STATE_ROOT = "simulation-state-root"  # where simulated sites keep their state; real sites ignore it
RUN_KEY = "run-key"  # the run's key at the sites (privacy calibration, training seeds)
PHASE = "phase"  # train: PHASE_FEDERATED or PHASE_LOCAL
SERVER_ROUND = "server-round"  # train: the round (Flower's strategies set it)
PROXIMAL_MU = "proximal-mu"  # train: FedProx's proximal term (Flower's FedProx sets it)
SPLIT = "split"  # evaluate: "val" or "test"
THRESHOLD = "threshold"  # evaluate: the operating threshold the server chose
LABEL_THRESHOLDS = "label-thresholds"  # evaluate: multi-label, each label's threshold (a JSON list)
SCORE_COUNTS = "score-counts"  # evaluate: also send counts of cases per score bin
PERSONAL = "personal"  # evaluate: the site's personal model of the run instead of the weights sent
INTERVALS = "intervals"  # evaluate (with PERSONAL): bootstrap intervals of the personal and sent models
MODEL_DIGEST = "model-digest"  # train, evaluate: no ARRAYS, the weights are the site's held model of this digest
SCORE = "score"  # train: first score SCORED (else ARRAYS) on the val split, as an evaluate request would
# train with SCORE, run.ema: score SCORE_AVERAGE * (the model of digest SCORE_BASE, which the site scored
# last) + (1 - SCORE_AVERAGE) * ARRAYS, whose digest must be SCORED_DIGEST
SCORE_AVERAGE, SCORE_BASE, SCORED_DIGEST = "score-average", "score-base", "scored-digest"
SCORING_SETTINGS = (SCORE, SCORE_AVERAGE, SCORE_BASE, SCORED_DIGEST)  # none of them is the training's

PHASE_FEDERATED = "federated"  # one round of the federation
PHASE_LOCAL = "local-baseline"  # the site's local-only model, a whole run's training in one pass
PHASE_PERSONALIZE = "personalize"  # after the last round: the site makes and keeps its personal model

# Reply statuses (the SITE record's "status").
OK = "ok"
REFUSED = "refused"  # the site will not take part (task, privacy budget, privacy off, split)
ERROR = "error"  # the site failed; the reason names the kind of failure only
EMPTY = "empty"  # nothing to evaluate on the asked split
UNKNOWN_MODEL = "unknown-model"  # the request's MODEL_DIGEST is not the model the site holds: send the weights
STATUSES = (OK, REFUSED, ERROR, EMPTY, UNKNOWN_MODEL)

# Reply metrics (keys of the METRICS record) that the server reads.
NUM_EXAMPLES = "num-examples"  # training or evaluation samples: FedAvg weighs updates by it
LOCAL_SECONDS = "local-seconds"
STEPS = "steps"
TRAIN_LOSS = "train-loss"  # sent only without DP (an un-noised statistic of the data)
EPSILON = "epsilon"
DELTA = "delta"
BUDGET = "budget"
NOISE_MULTIPLIER = "noise-multiplier"
MAX_GRAD_NORM = "max-grad-norm"
SAMPLE_RATE = "sample-rate"
PRIVACY_METRICS = (EPSILON, DELTA, BUDGET, NOISE_MULTIPLIER, MAX_GRAD_NORM)  # what the report's privacy section holds
# train.synthetic-augmentation: generated training images added (SYNTHETIC_IMAGES-C: of class C), and
# their generator: trained with DP (1) or not (0), its own ε, steps and seconds
SYNTHETIC_PREFIX = "synthetic-"
SYNTHETIC_IMAGES = "synthetic-images"
SYNTHETIC_PRIVATE = "synthetic-private"
SYNTHETIC_EPSILON = "synthetic-epsilon"
SYNTHETIC_STEPS = "synthetic-steps"
SYNTHETIC_SECONDS = "synthetic-seconds"

# Keys of the SITE record.
_NAME, _STATUS, _REASON, _PRIVACY_UNIT, _NOTES = "name", "status", "reason", "privacy-unit", "notes"
_HELD = "held-model"  # the digest of the weights the site holds (medfed.held_model)
_SCORES_STATUS, _SCORES_REASON = "scores-status", "scores-reason"  # how the scoring asked by SCORE went
_SCORED = "scored-model"  # the digest of the model the site scored (and keeps: SCORE_BASE of the next request)


def request_config(
    config: Config, state_root: str, run_key: str, settings: dict[str, Any] | None = None
) -> ConfigRecord:
    """The CONFIG record of a request: the run's config, where simulated sites keep their state,
    the run key, and this message's ``settings`` (keys above, e.g. ``{PHASE: PHASE_FEDERATED}``)."""
    return ConfigRecord({MEDFED_CONFIG: config.to_json(), STATE_ROOT: state_root, RUN_KEY: run_key, **(settings or {})})


def read_request(msg: Message) -> tuple[Config, ConfigRecord]:
    """The run's config and the whole CONFIG record (the message's settings) of a request."""
    return read_content(msg.content)


def read_content(content: RecordDict) -> tuple[Config, ConfigRecord]:
    """:func:`read_request` of a request's content."""
    record = content.config_records[CONFIG]
    return Config.from_json(str(record[MEDFED_CONFIG])), record


def setting(settings: ConfigRecord, key: str, default: float | str | None = None) -> float | str | bytes | bool:
    """One value of a request's settings (``default`` when the key is absent; without a default,
    KeyError). TypeError for a list: every medfed setting is a single value."""
    value = settings[key] if default is None else settings.get(key, default)
    if isinstance(value, list):
        raise TypeError(f"the request setting {key!r} is a list: expected a single value")
    return value


class MalformedReply(ValueError):
    """A reply that does not have the shape every medfed site sends."""


@dataclass
class SiteReply:
    """A site's answer: its name, a status (one of :data:`STATUSES`) and why, its metrics, the
    weights (train replies), the privacy unit it counted in and its pre-flight warnings (kinds
    and counts only)."""

    site: str
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: ArrayRecord | None = None
    privacy_unit: str = ""
    notes: str = ""
    scores: SiteReply | None = None  # a train reply to a request with SCORE: the scoring's own answer


def encode_reply(request: Message, reply: SiteReply) -> Message:
    """The Flower message that answers ``request`` with ``reply``."""
    site = ConfigRecord({_NAME: reply.site, _STATUS: reply.status, _REASON: reply.reason})
    if reply.privacy_unit:
        site[_PRIVACY_UNIT] = reply.privacy_unit
    if reply.notes:
        site[_NOTES] = reply.notes
    content = RecordDict({METRICS: MetricRecord({k: float(v) for k, v in reply.metrics.items()}), SITE: site})
    if reply.arrays is not None:
        content[ARRAYS] = reply.arrays
    return Message(content=content, reply_to=request)


def attach_scores(reply: Message, scores: SiteReply, digest: str) -> None:
    """Add to a site's train ``reply`` the answer of the scoring its request asked for
    (:data:`SCORE`) and the ``digest`` of the model it scored and keeps ("" when none)."""
    if reply.has_error() or SITE not in reply.content.config_records:
        return
    reply.content[SCORES] = MetricRecord({k: float(v) for k, v in scores.metrics.items()})
    site = reply.content.config_records[SITE]
    site[_SCORES_STATUS], site[_SCORES_REASON], site[_SCORED] = scores.status, scores.reason, digest


def scored_model(reply: Message) -> str | None:
    """The digest of the model the replying site scored and keeps ("" when it keeps none), or
    None when the reply answers no scoring."""
    if reply.has_error():
        return None
    try:
        scored = reply.content.config_records[SITE][_SCORED]
    except (KeyError, TypeError, ValueError):
        return None
    return scored if isinstance(scored, str) else None


def reported_site_name(reply: Message) -> str | None:
    """The name the replying site gives itself, or None when the reply carries none."""
    try:
        return str(reply.content[SITE][_NAME])
    except (KeyError, TypeError, ValueError):
        return None


def mark_held(reply: Message, digest: str) -> None:
    """Say in a site's reply which model it holds (the digest of :func:`medfed.held_model.model_digest`)."""
    if not reply.has_error() and SITE in reply.content.config_records:
        reply.content.config_records[SITE][_HELD] = digest


def held_model(reply: Message) -> str:
    """The digest of the model the replying site holds, or "" when it names none."""
    if reply.has_error():
        return ""
    try:
        held = reply.content.config_records[SITE][_HELD]
    except (KeyError, TypeError, ValueError):
        return ""
    return held if isinstance(held, str) else ""


def reply_status(reply: Message) -> str:
    """The status a reply states, or "" for Flower's error reply or a reply that states none."""
    if reply.has_error():
        return ""
    try:
        return str(reply.content.config_records[SITE][_STATUS])
    except (KeyError, TypeError, ValueError):
        return ""


def parse_reply(reply: Message, site: str) -> SiteReply:
    """Read a site's reply defensively; ``site`` is the name the server knows the sender by.

    Raises:
        MalformedReply: the reply is Flower's error reply (the site failed or is gone), or it
            lacks a record or key, or holds a value of the wrong type.
    """
    if reply.has_error():
        raise MalformedReply(f"site {site} failed: {reply.error.reason}")
    try:
        status = reply.content[SITE]
        # float() of a list value raises TypeError: a malformed reply, below
        metrics = {str(k): float(v) for k, v in reply.content[METRICS].items()}  # type: ignore[arg-type]
        arrays = reply.content.array_records.get(ARRAYS)
        unit = str(status[_PRIVACY_UNIT]) if _PRIVACY_UNIT in status else ""
        notes = str(status[_NOTES]) if _NOTES in status else ""
        scores = None
        if _SCORES_STATUS in status:
            scored = {str(k): float(v) for k, v in reply.content[SCORES].items()}  # type: ignore[arg-type]
            scores = SiteReply(site, str(status[_SCORES_STATUS]), str(status[_SCORES_REASON]), scored)
        return SiteReply(site, str(status[_STATUS]), str(status[_REASON]), metrics, arrays, unit, notes, scores)
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedReply(f"site {site} sent a malformed reply ({type(err).__name__}: {err})") from err
