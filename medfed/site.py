"""What a site does when the server asks it to train or evaluate.

The site's identity and data come from its own ``node_config`` (deployment: ``site-name``,
``data-path``, ``state-dir``, optional ``privacy-budget``). In a simulation, where ``node_config``
only carries ``partition-id``, the site is the simulated site of that index and its state lives
under the folder the simulation names. Only weights and aggregate metrics are returned: never
images, patient ids or file paths (errors are logged here in full and reported to the server
without paths).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from medfed import held_model, wire
from medfed.approval import ApprovalError, config_digest, load_approvals, requires_approval
from medfed.config import Config, node_state_dir
from medfed.data import DataError, PrivacyUnitDataset, SiteArrays, load_simulated_site
from medfed.data.manifest import SiteReading, folder_signature
from medfed.data.preflight import Preflight, run_preflight
from medfed.data.sites import simulated_site_names
from medfed.data.vocabulary import DataProblem
from medfed.evaluation.bootstrap import bootstrap_scores, interval
from medfed.personalization import norm_keys, personal_model_path, privacy_shape
from medfed.privacy import (
    BudgetExceeded,
    PrivacyLedger,
    Release,
    check_delta,
    default_delta,
    make_private,
    plan_privacy,
)
from medfed.tasks import Task, get_task, seeded_train_transform
from medfed.tasks.classification import LogitAdjustment
from medfed.training import TrainStats, build_optimizer, evaluate, loop_options, lr_schedule, resolve_device, train
from medfed.weights import (
    CheckpointError,
    compress_update,
    load_checkpoint,
    load_state,
    model_to_arrays,
    moving_average,
    save_checkpoint,
    set_model_arrays,
)

__all__ = ["Site", "approval_refusal", "handle_evaluate", "handle_train", "node_state_dir", "resolve_site"]

log = logging.getLogger("medfed.site")

SECRET_FILE = "site-secret"  # seeds local training; never leaves the site
CACHE_FOLDER = "cache"  # model-ready arrays of the site's data, under its state folder
_SITE_CACHE: dict[tuple[Any, ...], tuple[tuple[tuple[str, int, int], ...], Preflight]] = {}


@dataclass
class Site:
    """A site as seen from its own process: name, data, state folder, privacy budget, and the
    pre-flight warnings about its data (kinds and counts only, see :meth:`Preflight.summary`)."""

    name: str
    data: SiteArrays
    state_dir: Path
    budget: float
    notes: str = ""
    seed_secret: str | None = None  # None: the secret in the state folder (see :func:`training_seed`)


class PreflightFailed(ValueError):
    """The site's data failed the pre-flight check; the message holds kinds and counts only."""


def resolve_site(node_config: dict[str, Any], message_config: ConfigRecord, config: Config) -> Site:
    """Build the site from ``node_config`` (deployment) or from the partition id (simulation)."""
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"]))
        if "site-name" not in node_config:
            raise ValueError("node_config needs site-name (the name this site reports to the server)")
        name = str(node_config["site-name"])
        state_dir = node_state_dir(node_config)
        reading = SiteReading.from_config(config.data, get_task(config.run.task).TARGET)
        checked = _checked_site(data_path, state_dir, reading)
        if checked.site is None:
            raise PreflightFailed(f"site data failed the pre-flight check: {checked.summary()}")
        data, notes = checked.site, checked.summary()
    else:
        index = int(node_config["partition-id"])
        name, data = load_simulated_site(config, index)
        state_dir = Path(str(message_config[wire.STATE_ROOT])) / name
        # the researcher holds all the data: the run's seed seeds the noise too, so a simulation repeats
        secret = f"simulated|{config.run.seed}|{name}"
        return Site(name, data, state_dir, site_budget(node_config, config), "", secret)
    return Site(name, data, state_dir, site_budget(node_config, config), notes)


def site_budget(node_config: dict[str, Any], config: Config) -> float:
    """The site's lifetime ε cap: its own ``privacy-budget`` (node config), else the run's. A value
    that is not a finite number > 0 is refused: a NaN cap would never be exceeded."""
    value = node_config.get("privacy-budget", config.privacy.site_budget)
    try:
        budget = float(value)
    except (TypeError, ValueError, OverflowError):
        budget = math.nan
    if isinstance(value, bool) or not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"node config privacy-budget = {str(value)[:40]!r}: expected a finite number > 0")
    return budget


def _checked_site(folder: Path, state_dir: Path, reading: SiteReading) -> Preflight:
    """The site folder's pre-flight check (:func:`run_preflight`, as ``medfed data check`` runs it),
    done once while the folder's files and ``reading`` stay the same.

    Every error and warning is logged here in full, at the site. A site answers a train and an
    evaluate message every round, and a deployed site (Flower's subprocess isolation) starts a new
    process for each: a passed check is therefore kept in memory and in ``STATE_DIR/cache/`` (the
    model-ready arrays, as sensitive as the data itself, beside the privacy ledger), since
    re-reading and resampling every scan took as long as a local DP epoch
    (benchmarks/data_loading.py).
    """
    key = (str(folder.resolve()), *reading.key())
    signature = folder_signature(folder, state_dir)
    cached = _SITE_CACHE.get(key)
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = hashlib.sha256(repr((key, signature)).encode()).hexdigest()[:24]
    checked = _load_cached(state_dir / CACHE_FOLDER / f"{digest}.npz")
    if checked is None:
        checked = run_preflight(folder, reading)
        for problem in checked.errors:
            log.error("pre-flight check: %s", problem)
        for problem in checked.warnings:
            log.warning("pre-flight check: %s", problem)
        if checked.label_map is not None:
            log.info("pre-flight check: label map, site value -> class: %s", "; ".join(checked.label_map.lines()))
        if checked.site is not None:
            _store_cached(state_dir / CACHE_FOLDER, f"{digest}.npz", checked)
    _SITE_CACHE.clear()  # one site, one configuration at a time: keep memory to one copy
    _SITE_CACHE[key] = (signature, checked)
    return checked


def _store_cached(folder: Path, name: str, checked: Preflight) -> None:
    """Keep one passed check on disk (older ones are removed), written atomically."""
    site = checked.site
    if site is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    # Any: numpy types savez's keywords as arrays or its bool allow_pickle, and ** could fill either
    arrays: dict[str, Any] = {
        "images": site.images,
        "targets": site.targets,
        "splits": site.splits,
        "spacing": site.spacing,
        "target_key": np.asarray(site.target_key),
        "warnings": np.asarray(json.dumps([[w.where, w.reason] for w in checked.warnings])),
    }
    if site.patient_ids is not None:
        arrays["patient_ids"] = site.patient_ids
    if site.labelled is not None:
        arrays["labelled"] = site.labelled
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, folder / name)


def _load_cached(path: Path) -> Preflight | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            site = SiteArrays(
                stored["images"],
                stored["targets"],
                stored["splits"],
                stored.get("patient_ids"),
                target_key=str(stored["target_key"]),
                spacing=stored["spacing"],
                labelled=stored.get("labelled"),
            )
            warnings = [DataProblem(where, reason) for where, reason in json.loads(str(stored["warnings"]))]
    except (OSError, ValueError, KeyError) as err:  # a damaged cache is only a cache
        log.warning("ignoring the site data cache %s: %s", path.name, err)
        return None
    return Preflight(site, [], warnings)


Package = Callable[[ArrayRecord, ArrayRecord, int], ArrayRecord]
"""What a site sends of its training: (weights received, weights trained, example count) -> record."""


def handle_train(msg: Message, node_config: dict[str, Any], run_id: int, package: Package | None = None) -> Message:
    """Train the received model on the site's train split; reply with weights and metrics.

    ``package`` makes what is sent from the trained weights (default: :func:`compress_update` with
    ``run.update-compression``; secure aggregation sends a masked update instead). Any failure
    becomes an ``error`` reply that names the kind of failure only: the full error, which may hold
    file paths, stays in the site's log.
    """

    def answer() -> Message:
        scored = _scores_first(msg, node_config)
        try:
            reply = _train(msg, node_config, run_id, package)
        except _Refused as refused:
            reply = wire.encode_reply(msg, wire.SiteReply(refused.site, wire.REFUSED, refused.reason, refused.metrics))
        except Exception as err:  # noqa: BLE001 - nothing a site raises may reach the server verbatim
            reply = _failure(msg, _node_site_name(node_config), err)
        if scored is not None:
            wire.attach_scores(reply, *scored)
        return reply

    return _holding(msg, node_config, answer)


def _scores_first(msg: Message, node_config: dict[str, Any]) -> tuple[wire.SiteReply, str] | None:
    """The validation scores a train request asks for first (:data:`wire.SCORE`), answered as an
    evaluate request with the same settings is, and the digest of the model scored, which the site
    keeps (the base of the next request's :data:`wire.SCORE_AVERAGE`); None when the request asks
    for none. The scoring's settings and model are then taken out of ``msg``: the training sees
    (and the privacy ledger's release key hashes) the request a plain training request is."""
    settings = msg.content.config_records.get(wire.CONFIG)
    if settings is None or settings.get(wire.SCORE, False) is not True:
        return None
    records = msg.content.array_records
    scored = records.get(wire.SCORED, records.get(wire.ARRAYS))
    training = {k: v for k, v in settings.items() if k not in wire.SCORING_SETTINGS}
    msg.content = RecordDict({k: r for k, r in msg.content.items() if k not in (wire.SCORED, wire.CONFIG)})
    msg.content[wire.CONFIG] = ConfigRecord(training)
    name, folder = _node_site_name(node_config), _held_model_folder(msg, node_config)
    try:
        if wire.SCORE_AVERAGE in settings:
            scored = _site_average(settings, records.get(wire.ARRAYS), folder)
            if scored is None:
                reason = "the site does not hold the model the moving average starts from"
                return wire.SiteReply(name, wire.UNKNOWN_MODEL, reason), ""
        asked = ConfigRecord({**training, wire.SPLIT: "val"})
        content = RecordDict({wire.CONFIG: asked} if scored is None else {wire.ARRAYS: scored, wire.CONFIG: asked})
        scores = _evaluation(content, node_config)
    except Exception as err:  # noqa: BLE001 - as in handle_train
        log.error("site cannot score the model on its validation split: %s", err)
        return wire.SiteReply(name, wire.ERROR, _failure_reason(err)), ""
    digest = held_model.keep(scored, folder, held_model.SCORED_FILE) if scored is not None and folder else ""
    return scores, digest


def _site_average(settings: ConfigRecord, latest: ArrayRecord | None, folder: Path | None) -> ArrayRecord | None:
    """The moving average a request with :data:`wire.SCORE_AVERAGE` asks to score, made here from
    the model the site scored last and ``latest`` as the server makes it
    (:func:`medfed.weights.moving_average`); None when the site does not keep that model or the
    average is not the model the server released (its digest differs)."""
    base = settings.get(wire.SCORE_BASE)
    if folder is None or latest is None or not isinstance(base, str):
        return None
    before = held_model.kept(folder, base, held_model.SCORED_FILE)
    if before is None:
        return None
    average = moving_average(before, latest, float(wire.setting(settings, wire.SCORE_AVERAGE)))
    return average if held_model.model_digest(average) == settings.get(wire.SCORED_DIGEST) else None


def handle_evaluate(msg: Message, node_config: dict[str, Any]) -> Message:
    """Evaluate the received model on the site's ``val`` or ``test`` split (never ``train``)."""

    def answer() -> Message:
        try:
            return _evaluate(msg, node_config)
        except Exception as err:  # noqa: BLE001 - as in handle_train
            return _failure(msg, _node_site_name(node_config), err)

    return _holding(msg, node_config, answer)


def _holding(msg: Message, node_config: dict[str, Any], answer: Callable[[], Message]) -> Message:
    """``answer()`` once the weights ``msg`` names by digest are back in it (:mod:`medfed.held_model`);
    the weights received are kept as the site's held model, which the reply names. A request that
    names a model the site does not hold is answered :data:`wire.UNKNOWN_MODEL`."""
    folder = _held_model_folder(msg, node_config)
    if folder is None:  # a malformed request: answer() says what is wrong with it
        return answer()
    settings = msg.content.config_records.get(wire.CONFIG)
    named = None if settings is None else settings.get(wire.MODEL_DIGEST)
    if named is not None:
        if not held_model.resolve(msg, folder):
            log.info("the server named a model this site does not hold: asking for the weights")
            reason = "the site does not hold the model the request names"
            return wire.encode_reply(msg, wire.SiteReply(_node_site_name(node_config), wire.UNKNOWN_MODEL, reason))
        held = str(named)
    elif wire.ARRAYS in msg.content.array_records:
        held = held_model.keep(msg.content.array_records[wire.ARRAYS], folder)
    else:
        held = ""
    reply = answer()
    if held:
        wire.mark_held(reply, held)
    return reply


def _held_model_folder(msg: Message, node_config: dict[str, Any]) -> Path | None:
    """Where the site keeps the model it holds (its state folder), or None for a malformed request."""
    try:
        if "data-path" in node_config:
            return node_state_dir(node_config)
        config, settings = wire.read_request(msg)
        return Path(str(settings[wire.STATE_ROOT])) / simulated_site_names(config)[int(node_config["partition-id"])]
    except Exception:  # noqa: BLE001 - the handler refuses the request and says why
        return None


def data_digest(data: SiteArrays) -> str:
    """A digest of the site's model-ready data (images, targets, splits, patient ids, the classes it
    labels when not all): what a round
    is trained on, so that a round repeated on changed data is told apart (and charged)."""
    digest = hashlib.sha256()
    arrays = [data.images, data.targets, data.splits]
    arrays += [] if data.patient_ids is None else [data.patient_ids.astype(str)]
    for array in arrays if data.labelled is None else [*arrays, data.labelled]:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def request_digest(msg: Message) -> str:
    """A digest of what the server sent for one round: the model's weights and every setting."""
    digest = hashlib.sha256()
    for key, array in msg.content.array_records[wire.ARRAYS].items():
        digest.update(repr((key, array.dtype, tuple(array.shape), array.stype)).encode())
        digest.update(array.data)
    digest.update(repr(sorted(msg.content.config_records[wire.CONFIG].items())).encode())
    return digest.hexdigest()


def training_seed(state_dir: Path, key: str, secret: str | None = None) -> int:
    """The seed of one round's local training (batch sampling, augmentation, DP noise) for ``key``
    (run key, phase, round and the data's digest, see :class:`medfed.privacy.Release`, plus the
    ledger's salt): the same when a round is repeated exactly (a resumed run), different once the
    data change (the same noise on two versions of the data would reveal their difference), and
    unpredictable to the server: it mixes in a secret kept in the site's state folder, so the DP
    noise cannot be reproduced and subtracted off-site. A simulated site passes its own ``secret``
    (derived from ``run.seed``: the same simulation repeats exactly) and keeps no file."""
    if secret is not None:
        return _seed_of(secret, key)
    secret_file = state_dir / SECRET_FILE
    if not secret_file.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        except FileExistsError:
            pass  # another process of this site wrote it first
    return _seed_of(secret_file.read_text().strip(), key)


def _seed_of(secret: str, key: str) -> int:
    digest = hashlib.sha256(f"{secret}|{key}".encode())
    return int.from_bytes(digest.digest()[:8], "little") % (2**63)


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's generators (batch sampling, augmentation and Opacus noise draw from them)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def task_refusal(node_config: dict[str, Any], config: Config) -> str:
    """Why this site refuses the run's task (its ``allowed-tasks``, comma-separated), or ""."""
    allowed = [t.strip() for t in str(node_config.get("allowed-tasks", "")).split(",") if t.strip()]
    if allowed and config.run.task not in allowed:
        return f"task {config.run.task!r} is not in this site's allowed-tasks {allowed}"
    return ""


def approval_refusal(node_config: dict[str, Any], config: Config) -> str:
    """Why this deployed site refuses the run for want of its operator's approval, or "".

    Only with ``require-approval = true`` in the node config: the digest of the received config
    must be approved (and not revoked) in the site's approvals file (:mod:`medfed.approval`).
    Reads nothing but that file, so a run is refused before any of the site's data is read. A
    broken approvals file or setting refuses every run; the reason sent names no path.
    """
    if "data-path" not in node_config:  # a simulated site: no operator to approve
        return ""
    try:
        if not requires_approval(node_config):
            return ""
        approvals = load_approvals(node_state_dir(node_config))
    except ApprovalError as err:
        log.error("site refuses every run until this is fixed: %s", err)
        return "this site's run approvals are broken (require-approval or its approvals file); details are in its log"
    digest = config_digest(config)
    mine = [a for a in approvals if a.digest == digest]
    if any(a.active for a in mine):
        return ""
    how = (
        f"its approval was withdrawn at this site on {mine[-1].revoked_at}"
        if mine
        else "this site has not approved it (its operator runs `medfed site approve CONFIG --by NAME`)"
    )
    return f"run {config.run.name!r} with config digest {digest[:16]} is not approved: {how}"


class _Refused(Exception):
    """The site will not train this message (task, privacy): a ``refused`` reply, logged where raised."""

    def __init__(self, site: str, reason: str, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.site, self.reason, self.metrics = site, reason, metrics or {}


@dataclass(frozen=True)
class _Steps:
    """How much one train message trains: a federated round is one slice of the run (one
    round's epochs or steps), the local-only model (``wire.PHASE_LOCAL``) all rounds in one pass."""

    epochs: int
    max_steps: int
    planned: int  # what is accounted for (privacy) and must be trained
    per_round: int  # one round's slice, for the learning-rate schedule

    @classmethod
    def of(cls, config: Config, phase: str, batches: int) -> _Steps:
        """The steps of ``phase`` over a loader of ``batches`` batches."""
        rounds = config.run.rounds if phase == wire.PHASE_LOCAL else 1
        epochs, max_steps = config.train.local_epochs * rounds, config.train.local_steps * rounds
        planned = max_steps or epochs * batches
        return cls(epochs, max_steps, planned, planned // config.run.rounds if phase == wire.PHASE_LOCAL else planned)


def _train(msg: Message, node_config: dict[str, Any], run_id: int, package: Package | None) -> Message:
    """Refuse, or train the received model on the site's train split and reply with the update."""
    started = time.perf_counter()
    config, settings = wire.read_request(msg)
    site = _site_that_trains(node_config, settings, config, run_id)
    task = get_task(config.run.task)
    device = resolve_device(config.train.device)
    model = _received_model(task, config, msg.content).to(device)
    run_key = str(settings.get(wire.RUN_KEY) or run_id)
    phase = str(settings.get(wire.PHASE, wire.PHASE_FEDERATED))
    server_round = int(wire.setting(settings, wire.SERVER_ROUND, 0))
    if not (site.data.splits == "train").any():
        return _failure(msg, site.name, ValueError("the site has no training samples"))
    site, synthetic = _with_synthetic(site, config, run_key)
    unit, units = site.data.privacy_units("train", config.privacy.unit)
    n = len(units)
    mode = config.run.personalization if phase == wire.PHASE_FEDERATED else "none"
    personal = personal_model_path(site.state_dir, run_key)
    if phase == wire.PHASE_PERSONALIZE:
        return _personalize(msg, site, config, run_key, units, unit, started, synthetic)
    batch_size = min(config.train.batch_size, n)
    steps = _Steps.of(config, phase, math.ceil(n / batch_size))
    release = Release(f"{run_key}|{phase}|{server_round}|{data_digest(site.data)}", request_digest(msg))
    privacy: dict[str, float] = {}
    salt, sigma = "", 0.0
    if config.privacy.sample_level:  # Ditto: the personal model's steps are charged with the global model's
        charged = steps.planned * (2 if mode == "ditto" else 1)
        sigma, privacy, salt = _spend_privacy(site, config, release, run_key, unit, n, charged, synthetic)
    if mode == "fedbn" and personal.is_file():  # the site's own normalisation layers, back in place
        _load_norm_layers(model, personal)
    seed = training_seed(site.state_dir, release.round_key + salt, site.seed_secret)
    seed_everything(seed)
    loader = DataLoader(_train_dataset(task, config, site, seed, units), batch_size=batch_size, shuffle=True)
    optimizer = build_optimizer(model, config.train)
    if config.privacy.sample_level:
        model, optimizer, loader = make_private(model, optimizer, loader, sigma, config.privacy.max_grad_norm)
    stats = _local_training(task, model, loader, optimizer, device, config, settings, phase, steps)
    trained = getattr(model, "_module", model)
    if not _all_finite(trained):
        return _diverged(msg, site.name, privacy)
    if mode == "ditto":
        personal_seed = training_seed(site.state_dir, release.round_key + salt + "|personal", site.seed_secret)
        ditto = _Ditto(msg, site, config, settings, steps, personal, sigma)
        if not ditto.train(task, device, personal_seed, units, batch_size):
            return _diverged(msg, site.name, privacy)
    if mode == "fedbn":
        _save_personal(personal, model_to_arrays(trained.cpu()), config, site, server_round)
    real = n - synthetic.images  # FedAvg weighs a site by its own data, not by what its generator drew
    metrics = {wire.NUM_EXAMPLES: real, wire.STEPS: stats.steps, wire.LOCAL_SECONDS: time.perf_counter() - started}
    metrics |= privacy | synthetic.metrics()
    if not config.privacy.sample_level:
        metrics[wire.TRAIN_LOSS] = stats.loss  # an un-noised statistic of the data: only sent without DP
    received = msg.content.array_records[wire.ARRAYS]
    sent = model_to_arrays(trained.cpu())
    if mode == "fedbn":  # the normalisation layers as received: a zero update, they stay at the site
        kept = norm_keys(trained)
        sent = ArrayRecord({k: received[k] if k in kept else v for k, v in sent.items()})
    if package is None:
        arrays = compress_update(received, sent, config.run.update_compression)
    else:
        arrays = package(received, sent, real)
    return wire.encode_reply(msg, wire.SiteReply(site.name, wire.OK, "", metrics, arrays, unit, site.notes))


@dataclass
class _Ditto:
    """One round of a Ditto site's personal model: trained from where it was (the received global
    model the first time) with the penalty ``run.ditto-lambda``/2 ||w - w_global||², on as many
    steps as the global model and with the same noise (charged with it), then kept."""

    msg: Message
    site: Site
    config: Config
    settings: ConfigRecord
    steps: _Steps
    path: Path
    sigma: float

    def train(self, task: Task, device: torch.device, seed: int, units: list[np.ndarray], batch_size: int) -> bool:
        """Train and keep the personal model; False when it diverged (then it is not kept)."""
        config = self.config
        received = _received_model(task, config, self.msg.content)
        model = _received_model(task, config, self.msg.content)
        if self.path.is_file():
            _load_personal(model, self.path)
        anchor = [p.detach().to(device) for p in received.parameters()]
        model.to(device)
        seed_everything(seed)
        loader = DataLoader(_train_dataset(task, config, self.site, seed, units), batch_size=batch_size, shuffle=True)
        optimizer = build_optimizer(model, config.train)
        if config.privacy.sample_level:
            model, optimizer, loader = make_private(model, optimizer, loader, self.sigma, config.privacy.max_grad_norm)
        phase = wire.PHASE_FEDERATED
        _local_training(task, model, loader, optimizer, device, config, self.settings, phase, self.steps, anchor)
        trained = getattr(model, "_module", model)
        if not _all_finite(trained):
            return False
        server_round = int(wire.setting(self.settings, wire.SERVER_ROUND, 0))
        _save_personal(self.path, model_to_arrays(trained.cpu()), config, self.site, server_round)
        return True


def _personalize(
    msg: Message,
    site: Site,
    config: Config,
    run_key: str,
    units: list[np.ndarray],
    unit: str,
    started: float,
    synthetic: _Synthetic,
) -> Message:
    """After the last round: make the site's personal model from the final global model and keep
    it (fine-tuned, with the site's normalisation layers, or Ditto's own); nothing but metrics is sent."""
    settings = msg.content.config_records[wire.CONFIG]
    task = get_task(config.run.task)
    path = personal_model_path(site.state_dir, run_key)
    model = _received_model(task, config, msg.content)
    mode, privacy, steps = config.run.personalization, dict[str, float](), 0
    if mode == "none":
        raise _Refused(site.name, "this run has no personal models (run.personalization = 'none')")
    if mode == "fedbn" and path.is_file():
        _load_norm_layers(model, path)
    elif mode == "ditto":
        if not path.is_file():
            raise _Refused(site.name, "no personal model: this site trained no round of this run")
        _load_personal(model, path)
    elif mode == "finetune":
        privacy, steps = _fine_tune(msg, site, config, run_key, model, units, unit, synthetic)
        if not _all_finite(model):
            return _diverged(msg, site.name, privacy)
    if wire.THRESHOLD in settings:  # the operating point the server chose: the personal model keeps it
        config = config.with_overrides({"evaluation.threshold": float(wire.setting(settings, wire.THRESHOLD))})
    _save_personal(path, model_to_arrays(model.cpu()), config, site, config.run.rounds)
    real = len(units) - synthetic.images
    metrics = {wire.NUM_EXAMPLES: real, wire.STEPS: steps, wire.LOCAL_SECONDS: time.perf_counter() - started}
    metrics |= privacy | synthetic.metrics()
    return wire.encode_reply(msg, wire.SiteReply(site.name, wire.OK, "", metrics, None, unit, site.notes))


def _fine_tune(
    msg: Message,
    site: Site,
    config: Config,
    run_key: str,
    model: torch.nn.Module,
    units: list[np.ndarray],
    unit: str,
    synthetic: _Synthetic,
) -> tuple[dict[str, float], int]:
    """Train ``model`` (the final global model) ``run.finetune-steps`` steps on the site's train
    split, charged to its privacy ledger first; the privacy metrics and the steps trained."""
    task, device, n = get_task(config.run.task), resolve_device(config.train.device), len(units)
    planned = config.run.finetune_steps
    release = Release(f"{run_key}|{wire.PHASE_PERSONALIZE}|0|{data_digest(site.data)}", request_digest(msg))
    privacy: dict[str, float] = {}
    salt, sigma = "", 0.0
    if config.privacy.sample_level:
        sigma, privacy, salt = _spend_privacy(site, config, release, run_key, unit, n, planned, synthetic)
    seed = training_seed(site.state_dir, release.round_key + salt, site.seed_secret)
    seed_everything(seed)
    batch_size = min(config.train.batch_size, n)
    loader = DataLoader(_train_dataset(task, config, site, seed, units), batch_size=batch_size, shuffle=True)
    model.to(device)
    optimizer = build_optimizer(model, config.train)
    trained: torch.nn.Module = model
    if config.privacy.sample_level:
        trained, optimizer, loader = make_private(model, optimizer, loader, sigma, config.privacy.max_grad_norm)
    amp = config.train.amp and not config.privacy.sample_level
    stats = train(task, trained, loader, optimizer, device, epochs=0, max_steps=planned, amp=amp,
                  **loop_options(config.train))  # fmt: skip
    if stats.steps != planned:
        raise RuntimeError(f"trained {stats.steps} steps but {planned} were accounted for")
    return privacy, stats.steps


def _load_personal(model: torch.nn.Module, path: Path) -> None:
    """Load the site's personal model kept at ``path`` into ``model``."""
    state, _ = load_checkpoint(path)
    load_state(model, state, path, "this run's model", "remove it: it is not this run's personal model")


def _load_norm_layers(model: torch.nn.Module, path: Path) -> None:
    """Put the normalisation layers of the personal model kept at ``path`` into ``model`` (FedBN)."""
    state, _ = load_checkpoint(path)
    own = model.state_dict()
    keys = norm_keys(model)
    if not keys <= set(state) or any(state[k].shape != own[k].shape for k in keys):
        raise CheckpointError(f"{path} does not hold this run's normalisation layers: remove it")
    model.load_state_dict({k: state[k] for k in keys}, strict=False)


def _save_personal(path: Path, arrays: ArrayRecord, config: Config, site: Site, server_round: int) -> None:
    """Keep the site's personal model at ``path``, with the metadata ``medfed evaluate`` reads."""
    meta = {
        "round": server_round,
        "task": config.run.task,
        "config": config.to_public_dict(),
        "personal": {"site": site.name, "method": config.run.personalization, "run": config.run.name},
    }
    save_checkpoint(path, arrays, meta)


def _site_that_trains(node_config: dict[str, Any], settings: ConfigRecord, config: Config, run_id: int) -> Site:
    """The site, once it accepts the run's task and, deployed, its privacy: a deployed site trains
    only with DP unless its node config says ``allow-training-without-privacy = true``.

    Raises:
        _Refused: the task is not in the site's ``allowed-tasks``, or DP is off and not allowed.
    """
    refusal = task_refusal(node_config, config) or approval_refusal(node_config, config)
    if refusal:
        log.warning("site refuses run %s: %s", run_id, refusal)
        raise _Refused(_node_site_name(node_config), refusal)
    site = resolve_site(node_config, settings, config)
    without_privacy = node_config.get("allow-training-without-privacy", False) is True  # a TOML true, not "false"
    if "data-path" in node_config and not config.privacy.sample_level and not without_privacy:
        asked = "privacy.enabled = false" if not config.privacy.enabled else "privacy.level = 'site': no DP-SGD here"
        reason = f"this site trains only with differential privacy at the site ({asked} was asked)"
        log.warning("site %s refuses round: %s", site.name, reason)
        raise _Refused(site.name, reason)
    return site


def _received_model(task: Task, config: Config, content: RecordDict) -> torch.nn.Module:
    """The run's model holding the weights the server sent (``content``: the request's)."""
    model = task.build_model(config)
    set_model_arrays(model, content.array_records[wire.ARRAYS])
    return model


SYNTHETIC_FOLDER = "synthetic"  # a run's generated training images, under the site's state folder


@dataclass(frozen=True)
class _Synthetic:
    """The generated images a site added to its training split (``train.synthetic-augmentation``):
    how many (per class; for segmentation per largest class in the mask each was drawn for), the
    generator that drew them, and with DP its accountant entry."""

    images: int = 0
    per_class: tuple[int, ...] = ()
    private: bool = False
    epsilon: float = 0.0  # the generator's own ε (DP); 0 without DP
    steps: int = 0
    seconds: float = 0.0
    prior: tuple[tuple[float, float, int], ...] = ()  # (σ, sample rate, steps) of the generator under DP

    def metrics(self) -> dict[str, float]:
        """What the reply says of them (numbers only; nothing without generated images)."""
        if not self.steps:
            return {}
        counts = {f"{wire.SYNTHETIC_IMAGES}-{c}": float(k) for c, k in enumerate(self.per_class)}
        return {
            wire.SYNTHETIC_IMAGES: float(self.images),
            wire.SYNTHETIC_PRIVATE: float(self.private),
            wire.SYNTHETIC_EPSILON: self.epsilon,
            wire.SYNTHETIC_STEPS: float(self.steps),
            wire.SYNTHETIC_SECONDS: self.seconds,
            **counts,
        }


def _with_synthetic(site: Site, config: Config, run_key: str) -> tuple[Site, _Synthetic]:
    """The site with ``train.synthetic-augmentation`` generated images added to its training split,
    and what they are (the site as it is when the run has none).

    The generator is trained once per run and data (:func:`medfed.generative.fit_generator` with
    :func:`medfed.generative.generator_config`), its images drawn and kept in the state folder
    (as sensitive as the data: without DP they may reproduce it), and read back in later rounds.
    Under DP-SGD at the site its steps are charged to the ledger first.

    Raises:
        _Refused: the generator's steps would take the site past its privacy budget, or δ does not
            suit its privacy units.
    """
    ratio = config.train.synthetic_augmentation
    if not ratio:
        return site, _Synthetic()
    from medfed.generative import draw_synthetic, fit_generator, generator_config, largest_classes, with_synthetic

    digest = data_digest(site.data)
    path = site.state_dir / SYNTHETIC_FOLDER / f"{hashlib.sha256(f'{run_key}|{digest}'.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as kept:
            images, labels = kept["images"], kept["labels"]
            spacing = kept.get("spacing")  # None: kept before generated pairs had one
            info = json.loads(str(kept["info"]))
    else:
        generator = generator_config(config)
        seed = training_seed(site.state_dir, f"{run_key}|generator|{digest}", site.seed_secret)
        try:
            model, fit = fit_generator(generator, site.data, state_dir=site.state_dir, budget=site.budget,
                                       run_key=run_key, seed=seed)  # fmt: skip
        except (BudgetExceeded, ValueError) as err:
            log.warning("site %s refuses to train this run's generator: %s", site.name, err)
            raise _Refused(site.name, f"the image generator (train.synthetic-augmentation): {err}") from err
        train = site.data.splits == "train"
        images, labels, source = draw_synthetic(model, site.data.targets[train], ratio, config.data.image_size, seed)
        assert site.data.spacing is not None  # filled in by SiteArrays
        spacing = np.ones((len(images), site.data.spacing.shape[1]))  # a generated pair's: its mask's
        if source is not None:
            spacing = site.data.spacing[train][source]
        info = {"private": fit.epsilon is not None, "steps": fit.steps, "seconds": fit.seconds, "prior": []}
        if fit.noise_multiplier is not None and fit.sample_rate is not None and fit.delta is not None:
            entry = [fit.noise_multiplier, fit.sample_rate, fit.steps]
            info |= {"prior": [entry], "epsilon": PrivacyLedger(Path(os.devnull), fit.delta).epsilon([entry])}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, images=images, labels=labels, spacing=spacing, info=np.asarray(json.dumps(info)))
        os.replace(tmp, path)
        how = (
            f"DP-SGD, ε {info['epsilon']:.2f}" if info["private"] else "WITHOUT DP: its images may reproduce the site's"
        )
        log.info("site %s: generator trained (%d steps, %s); %d generated training images added",
                 site.name, fit.steps, how, len(images))  # fmt: skip
    classes = labels if labels.ndim == 1 else largest_classes(labels, config.data.num_classes)
    synthetic = _Synthetic(
        len(images),
        tuple(int(k) for k in np.bincount(classes.clip(0).astype(int), minlength=config.data.num_classes)),
        bool(info["private"]),
        float(info.get("epsilon", 0.0)),
        int(info["steps"]),
        float(info["seconds"]),
        tuple((float(e[0]), float(e[1]), int(e[2])) for e in info["prior"]),
    )
    data = with_synthetic(site.data, images, labels, spacing)
    return dataclasses.replace(site, data=data), synthetic


def _train_dataset(task: Task, config: Config, site: Site, seed: int, units: list[np.ndarray]) -> PrivacyUnitDataset:
    """The site's train split, one privacy unit (``units``: sample indices) per item, with the seeded
    training transform."""
    transform = seeded_train_transform(task, config, seed)
    if config.train.logit_adjust:  # classification without DP (the config refuses it otherwise)
        train_labels = site.data.targets[site.data.splits == "train"]
        transform = LogitAdjustment(transform, train_labels, config.data.num_classes)
    return PrivacyUnitDataset(site.data.split("train"), units, transform, config.train.augmentations)


def _spend_privacy(
    site: Site,
    config: Config,
    release: Release,
    run_key: str,
    unit: str,
    n: int,
    steps: int,
    synthetic: _Synthetic,
) -> tuple[float, dict[str, float], str]:
    """Calibrate this run's noise (once per run, in the site's ledger; with the run's generator
    steps, when it has one, composed in) and reserve the ε of ``steps`` more steps for ``release``
    (once: an exact repetition is not charged again); the noise multiplier, the privacy metrics
    the reply carries and the salt of the noise's seed (:meth:`PrivacyLedger.noise_salt`). ``n``
    counts the generated images as units (they set the sampling rate); δ is that of the real ones.

    Raises:
        _Refused: δ does not suit the site's privacy units, or the steps would exceed its budget.
    """
    real = n - synthetic.images
    try:
        check_delta(config.privacy.delta, real)
    except ValueError as err:
        log.warning("site %s refuses the run: %s", site.name, err)
        raise _Refused(site.name, str(err)) from err
    ledger = PrivacyLedger.open(site.state_dir, config.privacy.delta or default_delta(real), config.privacy.accountant)
    plan = plan_privacy(
        n,
        config.train.batch_size,
        config.run.rounds,
        config.privacy.target_epsilon,
        local_epochs=config.train.local_epochs,
        local_steps=config.train.local_steps,
        delta=ledger.delta,
        accountant=config.privacy.accountant,
        **privacy_shape(config),
    )
    sample_rate = plan.sample_rate
    first = run_key not in ledger.calibrations  # the first round of this run here: say what DP will do
    sigma = ledger.noise_for_run(run_key, config.privacy.target_epsilon, sample_rate, plan.run_steps, synthetic.prior)
    if first:
        spent = ledger.epsilon()
        log.info("site %s, privacy plan for this run (%s units):", site.name, unit)
        if synthetic.prior:  # the plan alone would calibrate without the generator
            log.info("  units %d (%d generated), sample rate %.4f, %d steps: σ = %.3f for ε = %g with this run's "
                     "generator (ε %.2f) composed in", plan.units, synthetic.images, plan.sample_rate, plan.run_steps,
                     sigma, config.privacy.target_epsilon, synthetic.epsilon)  # fmt: skip
        else:
            for line in plan.lines():
                (log.warning if line.startswith("WARNING") else log.info)("  %s", line)
        if spent:
            log.info("  earlier runs spent ε %.2f at this site (budget %.2f)", spent, site.budget)
    salt = ledger.noise_salt(release)
    privacy = {
        wire.NOISE_MULTIPLIER: sigma,
        wire.MAX_GRAD_NORM: config.privacy.max_grad_norm,
        wire.DELTA: ledger.delta,
        wire.BUDGET: site.budget,
        wire.SAMPLE_RATE: sample_rate,
    }
    try:
        privacy[wire.EPSILON] = ledger.reserve(sigma, sample_rate, steps, site.budget, release)
    except BudgetExceeded as err:
        log.warning("site %s refuses round: %s", site.name, err)
        raise _Refused(site.name, str(err), {wire.EPSILON: ledger.epsilon(), **privacy}) from err
    return sigma, privacy, salt


def _local_training(
    task: Task,
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: Optimizer,
    device: torch.device,
    config: Config,
    settings: ConfigRecord,
    phase: str,
    steps: _Steps,
    anchor: list[torch.Tensor] | None = None,
) -> TrainStats:
    """Train ``steps`` (with FedProx's term in a federated round, or Ditto's toward ``anchor``) on
    the learning-rate schedule's slice of this round; the steps trained must be the steps accounted for."""
    proximal_mu = float(wire.setting(settings, wire.PROXIMAL_MU, 0.0)) if phase == wire.PHASE_FEDERATED else 0.0
    if anchor is not None:
        proximal_mu = 0.0
    first_step = (
        0 if phase == wire.PHASE_LOCAL else (int(wire.setting(settings, wire.SERVER_ROUND, 1)) - 1) * steps.per_round
    )
    schedule = lr_schedule(optimizer, config.train, first_step, steps.per_round * config.run.rounds, steps.per_round)
    stats = train(
        task,
        model,
        loader,
        optimizer,
        device,
        epochs=steps.epochs,
        max_steps=steps.max_steps,
        proximal_mu=proximal_mu,
        anchor=anchor,
        anchor_lambda=config.run.ditto_lambda,
        amp=config.train.amp and not config.privacy.sample_level,
        schedule=schedule,
        **loop_options(config.train),
    )
    if stats.steps != steps.planned:
        raise RuntimeError(f"trained {stats.steps} steps but {steps.planned} were accounted for")
    return stats


def _all_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point weight and buffer of ``model`` is finite."""
    return all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def _diverged(msg: Message, site_name: str, privacy: dict[str, float]) -> Message:
    """The ``error`` reply of a training that ended with NaN/Inf weights: the update is not sent
    (the server would reject it anyway); the ledger keeps the charge (see medfed.privacy)."""
    reason = "local training diverged (NaN/Inf weights); update not sent: lower train.lr or privacy.max-grad-norm"
    log.error("site %s: %s", site_name, reason)
    return wire.encode_reply(msg, wire.SiteReply(site_name, wire.ERROR, reason, privacy))


def _evaluate(msg: Message, node_config: dict[str, Any]) -> Message:
    """Refuse, or evaluate the received model on the asked split and reply with the metrics."""
    return wire.encode_reply(msg, _evaluation(msg.content, node_config))


def _evaluation(content: RecordDict, node_config: dict[str, Any]) -> wire.SiteReply:
    """The answer to an evaluate request (its ``content``): a refusal, or the metrics of its model
    on the asked split."""
    config, settings = wire.read_content(content)
    refusal = task_refusal(node_config, config) or approval_refusal(node_config, config)
    if refusal:
        log.warning("site refuses to evaluate: %s", refusal)
        return wire.SiteReply(_node_site_name(node_config), wire.REFUSED, refusal)
    site = resolve_site(node_config, settings, config)
    split = str(settings.get(wire.SPLIT, "val"))
    if split not in ("val", "test"):
        return wire.SiteReply(site.name, wire.REFUSED, f"evaluation is allowed on val or test only, not {split!r}")
    dataset = site.data.split(split)
    if len(dataset) == 0:
        return wire.SiteReply(site.name, wire.EMPTY, f"no samples in the {split} split", {wire.NUM_EXAMPLES: 0})
    if wire.THRESHOLD in settings:  # the operating point the server chose on the validation splits
        config = config.with_overrides({"evaluation.threshold": float(wire.setting(settings, wire.THRESHOLD))})
    if wire.LABEL_THRESHOLDS in settings:  # multi-label: each label's
        chosen = json.loads(str(wire.setting(settings, wire.LABEL_THRESHOLDS)))
        config = config.with_overrides({"evaluation.label-thresholds": chosen})
    task = get_task(config.run.task)
    device = resolve_device(config.train.device)
    model = _received_model(task, config, content)
    intervals: dict[str, float] = {}
    if settings.get(wire.PERSONAL, False) is True:  # the site's personal model of this run, not the one sent
        path = personal_model_path(site.state_dir, str(settings.get(wire.RUN_KEY, "")))
        if not path.is_file():
            return wire.SiteReply(site.name, wire.REFUSED, "no personal model of this run at this site")
        sent, model = model, _received_model(task, config, content)
        _load_personal(model, path)
        if settings.get(wire.INTERVALS, False) is True and split == "test":
            intervals = _paired_intervals(config, site, model, sent)
    score_counts = settings.get(wire.SCORE_COUNTS, False) is True
    results = evaluate(task, model.to(device), dataset, config, device, score_counts=score_counts)
    metrics = {wire.NUM_EXAMPLES: len(dataset), **results, **intervals}
    return wire.SiteReply(site.name, wire.OK, "", metrics)


def _paired_intervals(config: Config, site: Site, personal: torch.nn.Module, sent: torch.nn.Module) -> dict[str, float]:
    """The primary test metric of the personal and the sent (global) model with 95 % bootstrap
    intervals, and of their difference, on the same resamples of the site's test cases
    (:func:`medfed.evaluation.bootstrap.bootstrap_scores`): aggregate numbers only."""
    data = {site.name: site.data}
    replicates, seed = config.evaluation.replicates, config.run.seed
    mine = bootstrap_scores(config, personal.cpu(), data, replicates, seed)["per_site"][site.name]
    theirs = bootstrap_scores(config, sent.cpu(), data, replicates, seed)["per_site"][site.name]
    gain = {"value": mine["value"] - theirs["value"], **interval(np.asarray(mine["draws"]) - theirs["draws"])}
    return {
        f"{wire.INTERVALS}-{model}-{key}": float(entry[key])
        for model, entry in (("personal", mine), ("global", theirs), ("gain", gain))
        for key in ("value", "low", "high")
    }


def _node_site_name(node_config: dict[str, Any]) -> str:
    """The name a site answers with before its data is resolved (a refusal, a failure)."""
    return str(node_config.get("site-name", "unknown"))


def _failure(msg: Message, site_name: str, err: Exception) -> Message:
    """Log the full error at the site; tell the server only what kind of failure it was."""
    log.error("site cannot take part: %s", err)
    return wire.encode_reply(msg, wire.SiteReply(site_name, wire.ERROR, _failure_reason(err)))


def _failure_reason(err: Exception) -> str:
    """What the server is told of a failure at the site: its kind only (the log has the rest)."""
    if isinstance(err, PreflightFailed):  # kinds and counts only: no file, patient or value
        reason = str(err)
    elif isinstance(err, DataError):
        reason = f"site data failed validation ({len(err.problems)} problem(s))"
    else:
        reason = type(err).__name__
    return f"{reason}; details are in the site's log"
