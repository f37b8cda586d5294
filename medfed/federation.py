"""The server's side of a run: rounds, validation of updates, checkpoints, cross-site evaluation.

Aggregation itself is Flower's (``FedAvg``, ``FedProx``, ``FedAdam`` from ``flwr.serverapp.strategy``);
this module decides which replies reach it. A reply is left out when the site failed, refused
(privacy budget) or sent an update that fails :func:`medfed.weights.validate_update`; the round
goes on with the others as long as ``run.min-sites`` remain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from safetensors.torch import load_file, save_file

from medfed import held_model, packing, wire
from medfed.config import Config
from medfed.evaluation.report import json_safe, write_report
from medfed.run_folder import RunFolder
from medfed.run_status import write_running_report
from medfed.secure_aggregation import secure_round
from medfed.site_level_dp import SiteLevelDP, poisson_sample
from medfed.tasks import get_task
from medfed.tracking import Tracker, open_tracker
from medfed.weights import (
    CheckpointError,
    UpdateRejected,
    array_bytes,
    decompress_update,
    load_checkpoint,
    load_state,
    model_to_arrays,
    moving_average,
    save_checkpoint,
    validate_update,
)

__all__ = ["build_strategy", "run_federation", "untrained_reason"]

log = logging.getLogger("medfed.server")

MAX_EXAMPLES = 1e9


def build_strategy(config: Config) -> FedAvg:
    """Flower strategy named by ``run.strategy``, waiting for ``run.min-sites`` sites."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": config.run.min_sites,
        "min_evaluate_nodes": config.run.min_sites,
        "min_available_nodes": config.run.min_sites,
    }
    if config.run.strategy == "fedprox":
        return FedProx(proximal_mu=config.run.proximal_mu, **common)
    if config.run.strategy == "fedadam":
        return FedAdam(eta=config.run.server_lr, eta_l=config.train.lr, **common)
    if config.run.strategy == "fedmedian":
        return FedMedian(**common)
    if config.run.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=config.run.trim_fraction, **common)
    return FedAvg(**common)


@dataclass
class _Traffic:
    down: int = 0
    up: int = 0


@dataclass
class _RunState:
    config: Config
    grid: Grid
    state_root: str
    run_key: str
    sites: dict[int, str] = field(default_factory=dict)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    privacy_units: dict[str, str] = field(default_factory=dict)
    synthetic: dict[str, dict[str, float]] = field(default_factory=dict)  # train.synthetic-augmentation, per site
    notes: dict[str, list[str]] = field(default_factory=dict)
    sent_to: dict[str, int] = field(default_factory=dict)
    # this round's training reply per site: answered (update usable), refused, error, rejected (by the server)
    outcomes: dict[str, str] = field(default_factory=dict)
    site_dp: SiteLevelDP | None = None  # privacy.level with "site": DP-FedAvg at the server
    held: dict[int, str] = field(default_factory=dict)  # node -> digest of the model its site holds
    scored: dict[int, str] = field(default_factory=dict)  # node -> digest of the model its site scored last
    scoring_base: str = ""  # digest of the model the last round's requests asked to score
    tracker: Tracker = field(default_factory=Tracker)

    def exchange(self, messages: list[Message], timeout: float, traffic: _Traffic | None = None) -> list[Message]:
        """Send and wait for the replies. With ``traffic`` (the bytes of the weights sent are added
        to it), a request whose weights are the model its site holds names them by digest instead
        (:mod:`medfed.held_model`); a site that turns out not to hold them gets them in a second
        request, answered within ``timeout`` again."""
        weights: dict[int, Message] = {}  # node -> the request as it was, for a site that lacks the model
        if traffic is not None:
            digests: dict[int, str] = {}  # id of an ArrayRecord -> its digest (requests share one record)
            for msg in messages:
                arrays = msg.content.array_records.get(wire.ARRAYS)
                node = msg.metadata.dst_node_id
                if arrays is None or node not in self.held:
                    continue
                if id(arrays) not in digests:
                    digests[id(arrays)] = held_model.model_digest(arrays)
                if self.held[node] == digests[id(arrays)]:
                    weights[node] = _resent(msg)
                    held_model.by_reference(msg, self.held[node])
            traffic.down += sum(_weights_bytes(msg) for msg in messages)
        replies = self._send(messages, timeout)
        lacking = {
            id(reply): weights[reply.metadata.src_node_id]
            for reply in replies
            if wire.reply_status(reply) == wire.UNKNOWN_MODEL and reply.metadata.src_node_id in weights
        }
        if lacking and traffic is not None:
            log.info("%d site(s) no longer hold the model: sending the weights", len(lacking))
            traffic.down += sum(_weights_bytes(msg) for msg in lacking.values())
            replies = [reply for reply in replies if id(reply) not in lacking] + self._send(
                list(lacking.values()), timeout
            )
        return replies

    def _send(self, messages: list[Message], timeout: float) -> list[Message]:
        """Send and wait for the replies (each model one array on the wire, :mod:`medfed.packing`),
        remembering which node each message went to (Flower answers for a node that died with an
        error reply from the SuperLink's own node id) and which model each site says it holds."""
        for msg in messages:
            packing.pack(msg)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.sent_to.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id})
        for reply in replies:
            try:
                packing.unpack(reply)
            except ValueError as err:  # left as it is: reading it fails, and it is left out
                log.warning("a reply is malformed: %s", err)
            node = self.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            held = wire.held_model(reply)
            if held:
                self.held[node] = held
            else:
                self.held.pop(node, None)
            scored = wire.scored_model(reply)
            if scored is not None:
                self.scored[node] = scored
        return replies

    def note(self, site: str, text: str) -> None:
        """Remember what a site said about itself (pre-flight warnings, refusals, failures) for the report."""
        if text and text not in self.notes.setdefault(site, []):
            self.notes[site].append(text)

    def message_config(self, settings: dict[str, Any]) -> ConfigRecord:
        """The config record of a request to the sites, with this message's ``settings``."""
        return wire.request_config(self.config, self.state_root, self.run_key, settings)

    def site_of(self, reply: Message) -> str:
        """The reporting site's name, made unique per node (two sites may pick the same name)."""
        node = reply.metadata.src_node_id
        if reply.has_error():  # possibly on behalf of a node that is gone: name the node it was sent to
            node = self.sent_to.get(reply.metadata.reply_to_message_id, node)
        if node not in self.sites:
            name = wire.reported_site_name(reply)
            if name is None:
                return f"node-{node}"
            if name in self.sites.values():
                name = f"{name}@{node}"
            self.sites[node] = name
        return self.sites[node]


def _resent(msg: Message) -> Message:
    """A new request with ``msg``'s content, type, destination and group (a request is sent once)."""
    return Message(content=msg.content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type,
                   group_id=msg.metadata.group_id)  # fmt: skip


def _weights_bytes(msg: Message) -> int:
    """The bytes of the weights a request carries (0 when it names its site's held model)."""
    records = msg.content.array_records
    return sum(array_bytes(records[key]) for key in (wire.ARRAYS, wire.SCORED) if key in records)


def _read_reply(state: _RunState, reply: Message) -> wire.SiteReply:
    """A site's reply, parsed (:func:`medfed.wire.parse_reply`: a malformed one is rejected, it never
    crashes the server); what the site said about itself is noted for the report."""
    parsed = wire.parse_reply(reply, state.site_of(reply))
    state.note(parsed.site, f"data warnings: {parsed.notes}" if parsed.notes else "")
    state.note(parsed.site, f"{parsed.status}: {parsed.reason}" if parsed.status not in (wire.OK, wire.EMPTY) else "")
    return parsed


@dataclass
class _Rounds:
    """The run so far: the global model, its ``run.ema`` average (when on: the model released),
    one report entry per round done (round 0: the starting model), and the next round. The last
    entry's ``metrics`` are None until the sites have scored its model (:func:`_scored`)."""

    arrays: ArrayRecord
    released: ArrayRecord | None
    history: list[dict[str, Any]]
    next_round: int


def run_federation(
    grid: Grid,
    config: Config,
    out_dir: str | Path,
    simulation_state_root: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run all rounds and the final evaluations; write ``out_dir``/report.json, html, plots, checkpoints.

    ``simulation_state_root`` is where simulated sites keep their state (privacy ledger), one
    folder per site; real sites ignore it and use the ``state-dir`` of their own node config.
    After every round the global model, the strategy's own state and the run's progress are
    checkpointed; ``resume`` continues a run from its last checkpoint in ``out_dir`` (same config
    required) with the same weights, round number and run key (:func:`run_key`), so that sites
    calibrate the same noise and, with their seeds, repeat the same local training.
    """
    folder = RunFolder(Path(out_dir).resolve())
    folder.checkpoints.mkdir(parents=True, exist_ok=True)
    state_root = Path(simulation_state_root or folder.site_states).resolve()
    strategy = build_strategy(config)
    progress = _load_progress(folder, config, strategy) if resume else None
    tracker = open_tracker(config, folder, resumed=progress is not None)
    state = _RunState(
        config, grid, str(state_root), progress["run_key"] if progress else run_key(config), tracker=tracker
    )
    _wait_for_sites(grid, config.run.min_sites, config.run.site_wait)
    if config.privacy.site_level:
        state.site_dp = SiteLevelDP.start(config, len(list(grid.get_node_ids())), folder.site_privacy, resume)
        for line in state.site_dp.plan.lines():
            (log.warning if line.startswith("WARNING") else log.info)("site-level DP: %s", line)
    run = _resumed_rounds(state, folder, progress) if progress is not None else _first_evaluation(state)
    if run.history[-1]["metrics"] is not None:
        tracker.round_done(run.history[-1])
    for server_round in range(run.next_round, config.run.rounds + 1):
        _wait_for_sites(grid, config.run.min_sites, config.run.site_wait)
        _train_round(state, strategy, folder, run, server_round)
    counts = _score_last_round(state, strategy, folder, run) if run.history[-1]["metrics"] is None else None
    report = _final_report(state, folder, run.released or run.arrays, run.history, counts)
    if progress is not None:
        report["resumed_after_round"] = progress["round"]
    write_report(report, folder.root)
    tracker.finished(report, folder)
    return report


def _resumed_rounds(state: _RunState, folder: RunFolder, progress: dict[str, Any]) -> _Rounds:
    """Where a checkpointed run stopped: its last round's models, history, privacy and notes."""
    config = state.config
    model = get_task(config.run.task).build_model(config)  # the model's own key order, as every site sends it
    model.load_state_dict(load_checkpoint(folder.round_model(progress["round"]))[0])
    arrays = model_to_arrays(model)
    released: ArrayRecord | None = None
    if config.run.ema:
        model.load_state_dict(load_checkpoint(folder.round_model(progress["round"], ema=True))[0])
        released = model_to_arrays(model)
    state.privacy, state.privacy_units, state.notes = (
        progress["privacy"],
        progress["privacy_units"],
        progress["notes"],
    )
    state.synthetic = progress.get("synthetic", {})
    log.info("resuming run %s after round %d", state.run_key[:8], progress["round"])
    return _Rounds(arrays, released, progress["rounds"], progress["round"] + 1)


def _folded(config: Config) -> bool:
    """Whether a round's training requests also ask the sites to score the model they carry on
    their validation split (:data:`medfed.wire.SCORE`): one message per site per round instead of a
    training and an evaluation message. Not under secure aggregation, whose training request opens
    a protocol of its own."""
    return not config.run.secure_aggregation


def _first_evaluation(state: _RunState) -> _Rounds:
    """Round 0: the starting model, evaluated on every site's validation split (when rounds are
    folded, :func:`_folded`: by round 1's training requests)."""
    arrays = model_to_arrays(initial_model(state.config))
    traffic = _Traffic()
    metrics = None if _folded(state.config) else _evaluate(state, arrays, "val", traffic)
    entry = {
        "round": 0,
        "seconds": 0.0,
        "local_seconds": {},
        "bytes_up": 0,
        "bytes_down": traffic.down,
        "metrics": metrics,
        "sites_aggregated": [],
    }
    if metrics is not None:
        _log_round(0, metrics, get_task(state.config.run.task).PRIMARY_METRIC)
    return _Rounds(arrays, None, [entry], 1)


def _train_round(state: _RunState, strategy: FedAvg, folder: RunFolder, run: _Rounds, server_round: int) -> None:
    """One round: train at the sites, aggregate the updates fit for it, checkpoint the round
    (``run`` is updated). The model released after the round before is scored on the validation
    splits by the same requests (:func:`_folded`; the sites not sampled get an evaluation request
    in the same exchange), else the model released after this round is scored after it."""
    config = state.config
    started, traffic = time.perf_counter(), _Traffic()
    state.outcomes = {}
    scoring = run.history[-1]["metrics"] is None  # the last round's model is still to be scored
    settings = {wire.PHASE: wire.PHASE_FEDERATED, **({wire.SCORE: True} if scoring else {})}
    messages = list(strategy.configure_train(server_round, run.arrays, state.message_config(settings), state.grid))
    messages = _sampled_sites(state, messages, server_round)
    secure: dict[str, Any] | None = None
    scores: dict[str, dict[str, float]] = {}
    if config.run.secure_aggregation:  # the weights always travel: the masked update is made from them
        traffic.down += array_bytes(run.arrays) * len(messages)
        aggregated_sites, local_seconds, secure = _secure_train(state, run, messages, traffic, server_round)
    else:
        requests = messages + (_scoring_requests(state, run, messages) if scoring else [])
        kinds = {msg.metadata.dst_node_id: msg.metadata.message_type for msg in requests}
        replies = state.exchange(requests, config.run.round_timeout, traffic)
        trained = [reply for reply in replies if kinds.get(_node_of(state, reply)) == MessageType.TRAIN]
        scores = _scores(state, [reply for reply in replies if all(reply is not t for t in trained)], "val")
        lacking = [_node_of(state, reply) for reply in trained if _scores_status(reply) == wire.UNKNOWN_MODEL]
        accepted, local_seconds = _screen_train_replies(state, run.arrays, trained, traffic, server_round, scores)
        if lacking:  # sites that could not make the released moving average: send it
            log.info("%d site(s) could not make the released model: sending its weights", len(lacking))
            requests = _evaluation_requests(state, run.released or run.arrays, "val", lacking)
            scores.update(_scores(state, state.exchange(requests, config.run.round_timeout, traffic), "val"))
        if state.site_dp:
            aggregated_sites = _aggregate_site_level(state, state.site_dp, run, accepted)
        else:
            aggregated_sites = _aggregate(state, strategy, run, accepted, server_round)
    if scoring:
        _scored(state, folder, run.history[-1], dict(sorted(scores.items())))
    if config.run.ema:
        run.released = moving_average(run.released, run.arrays, config.run.ema)
        save_checkpoint(folder.round_model(server_round, ema=True), run.released,
                        {"round": server_round, "ema": config.run.ema})  # fmt: skip
    metrics = None if _folded(config) else _evaluate(state, run.released or run.arrays, "val", traffic)
    entry = {
        "round": server_round,
        "seconds": time.perf_counter() - started,
        "local_seconds": local_seconds,
        "bytes_up": traffic.up,
        "bytes_down": traffic.down,
        "metrics": metrics,
        "sites_aggregated": aggregated_sites,
        "outcomes": dict(sorted(state.outcomes.items())),
        "epsilon": {site: p.get(wire.EPSILON, 0.0) for site, p in state.privacy.items()},
        **(state.site_dp.round_entry() if state.site_dp else {}),
    }
    if secure is not None:
        entry["secure_aggregation"] = secure
    run.history.append(entry)
    save_checkpoint(
        folder.round_model(server_round),
        run.arrays,
        {"round": server_round, "task": config.run.task, "config": config.to_public_dict(), "metrics": metrics},
    )
    if metrics is not None:
        _scored(state, folder, entry, metrics)
    _round_written(state, strategy, folder, run)


def _scoring_requests(state: _RunState, run: _Rounds, messages: list[Message]) -> list[Message]:
    """Make the training requests ``messages`` say which model to score, when it is not the one they
    train from (``run.ema``): the moving average the site makes from the model it scored last
    (:data:`medfed.wire.SCORE_AVERAGE`), or else its weights; and the evaluation requests of that
    model for the sites left out of the round (``run.fraction-train``)."""
    released = run.released or run.arrays
    digest = held_model.model_digest(released)
    if digest != held_model.model_digest(run.arrays):
        averaged: dict[str, float | str] = {wire.SCORE_AVERAGE: state.config.run.ema,
                                            wire.SCORE_BASE: state.scoring_base, wire.SCORED_DIGEST: digest}  # fmt: skip
        for msg in messages:
            if state.scoring_base and state.scored.get(msg.metadata.dst_node_id) == state.scoring_base:
                msg.content[wire.CONFIG] = ConfigRecord({**msg.content.config_records[wire.CONFIG], **averaged})
            else:
                msg.content[wire.SCORED] = released
    state.scoring_base = digest
    sampled = {msg.metadata.dst_node_id for msg in messages}
    others = [node for node in state.grid.get_node_ids() if node not in sampled]
    return _evaluation_requests(state, released, "val", others)


def _scores_status(reply: Message) -> str:
    """The status of the scoring a train reply answers ("" when it answers none or is malformed)."""
    try:
        scores = wire.parse_reply(reply, "").scores
    except wire.MalformedReply:
        return ""
    return "" if scores is None else scores.status


def _node_of(state: _RunState, reply: Message) -> int:
    """The node a reply answers for (Flower answers for a node that is gone from its own id)."""
    return state.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def _scored(state: _RunState, folder: RunFolder, entry: dict[str, Any], metrics: dict[str, dict[str, float]]) -> None:
    """The validation ``metrics`` of round ``entry``'s model are in: into the entry, the round's
    checkpoint metadata, the tracker and the log."""
    entry["metrics"] = metrics
    if entry["round"] > 0:
        meta = folder.round_model(entry["round"]).with_suffix(".json")
        written = json.loads(meta.read_text())
        _beside(meta).write_text(json.dumps({**written, "metrics": metrics}, indent=1, sort_keys=True, default=str))
        os.replace(_beside(meta), meta)
    state.tracker.round_done(entry)
    _log_round(entry["round"], metrics, get_task(state.config.run.task).PRIMARY_METRIC)


def _round_written(state: _RunState, strategy: FedAvg, folder: RunFolder, run: _Rounds) -> None:
    """The progress file (what a resumed run needs) and the running report, for the rounds so far."""
    rounds = run.history[-1]["round"]
    _save_progress(folder, state, strategy, rounds, run.history)
    shown = [entry for entry in run.history if entry["metrics"] is not None]
    write_running_report(folder, state.config, shown, _privacy_section(state), state.notes, rounds)


def _score_last_round(state: _RunState, strategy: FedAvg, folder: RunFolder, run: _Rounds) -> dict[str, dict[str, Any]]:
    """Score the model released after the last round on the validation splits, with the counts of
    cases per score bin when the operating point is to be chosen from them (one request per site
    for both); those counts per site ({} when not asked)."""
    settings = {wire.SCORE_COUNTS: True} if _choose_operating_point(state.config) else {}
    results = _evaluate(state, run.released or run.arrays, "val", _Traffic(), settings=settings)
    _scored(state, folder, run.history[-1], {site: _without_counts(m) for site, m in results.items()})
    _round_written(state, strategy, folder, run)
    return results if settings else {}


def _without_counts(metrics: dict[str, Any]) -> dict[str, Any]:
    """A site's metrics without the counts of cases per score bin."""
    return {k: v for k, v in metrics.items() if not k.startswith("score_")}


def _aggregate(
    state: _RunState, strategy: FedAvg, run: _Rounds, accepted: list[Message], server_round: int
) -> list[str]:
    """Aggregate the accepted updates into ``run.arrays`` when at least ``run.min-sites`` remain
    (else the global model is kept); the sites aggregated."""
    min_sites = state.config.run.min_sites
    if len(accepted) < min_sites:
        log.warning(
            "round %d: %d usable update(s), fewer than run.min-sites = %d; global model kept",
            server_round,
            len(accepted),
            min_sites,
        )
        return []
    new_arrays, _ = strategy.aggregate_train(server_round, accepted)
    if new_arrays is not None:
        run.arrays = _with_dtypes_of(new_arrays, run.arrays)
    return sorted(state.sites[r.metadata.src_node_id] for r in accepted)


def _secure_train(
    state: _RunState, run: _Rounds, messages: list[Message], traffic: _Traffic, server_round: int
) -> tuple[list[str], dict[str, float], dict[str, Any]]:
    """One round's training under secure aggregation (:func:`medfed.secure_aggregation.secure_round`):
    the server never holds one site's update, only their example-weighted sum, checked before it
    is applied to ``run.arrays`` (kept when the round fails or fewer than ``run.min-sites`` are in
    the sum). The sites in the sum, their local seconds, and the round's report entry."""

    def read(reply: Message) -> wire.SiteReply:
        parsed = _read_reply(state, reply)
        _record_privacy(state, parsed)
        state.outcomes[parsed.site] = "answered" if parsed.status == wire.OK else parsed.status
        return parsed

    result = secure_round(state.exchange, messages, run.arrays, state.config, read, server_round)
    traffic.up += result.bytes_up
    traffic.down += result.bytes_down
    dropped = {}
    for node, reason in result.dropped.items():
        site = dropped[node] = state.sites.get(node, f"node-{node}")
        state.outcomes[site] = "rejected"
        log.warning("round %d: site %s is not in the secure sum: %s", server_round, site, reason)
        if not any(n.startswith("left out of the secure sum") for n in state.notes.get(site, [])):
            state.note(site, f"left out of the secure sum (first in round {server_round}): {reason}")
    sites = sorted(reply.site for reply in result.summed.values())
    local_seconds = {reply.site: reply.metrics.get(wire.LOCAL_SECONDS, math.nan) for reply in result.summed.values()}
    entry: dict[str, Any] = {"threshold": result.threshold, "dropped": sorted(dropped.values())}
    min_sites = state.config.run.min_sites
    if result.arrays is None or len(sites) < min_sites:
        entry["failure"] = result.failure or f"{len(sites)} site(s) in the sum, fewer than run.min-sites = {min_sites}"
        log.warning("round %d: no secure aggregate (%s); global model kept", server_round, entry["failure"])
        return [], local_seconds, entry
    run.arrays = result.arrays
    entry["total_examples"] = result.total_examples
    log.info("round %d: secure sum of %d site(s), %d examples", server_round, len(sites), result.total_examples)
    return sites, local_seconds, entry


def _protections(config: Config) -> dict[str, Any]:
    """What protected the sites' data in this run, for the report."""
    secure = config.run.secure_aggregation
    return {
        "secure_aggregation": secure,
        "sample_level_dp": config.privacy.sample_level,
        "site_level_dp": config.privacy.site_level,
        "update_norm_bound": config.run.max_update_norm,
        "update_norm_checked_by": "each site, before masking (the server checks the sum)" if secure else "the server",
    }


def _sampled_sites(state: _RunState, messages: list[Message], server_round: int) -> list[Message]:
    """The training requests of the sites taking part in the round: each with probability
    ``run.fraction-train`` (Poisson sampling), drawn from the site-level mechanism's secret
    generator under site-level DP, else seeded by ``run.seed`` and the round (a resumed run
    repeats the draw)."""
    rate = state.config.run.fraction_train
    rng = state.site_dp.rng if state.site_dp else np.random.default_rng([state.config.run.seed, server_round])
    sampled = poisson_sample(messages, rate, rng)
    if rate < 1:
        log.info("round %d: %d of %d sites sampled (run.fraction-train = %g)", server_round, len(sampled),
                 len(messages), rate)  # fmt: skip
    return sampled


def _aggregate_site_level(state: _RunState, site_dp: SiteLevelDP, run: _Rounds, accepted: list[Message]) -> list[str]:
    """Site-level DP's aggregation (:mod:`medfed.site_level_dp`) into ``run.arrays``: every round is
    released, whatever number of sites took part (keeping the model when few did would make the
    release depend on who took part, outside the accounting); the sites aggregated."""
    updates = [reply.content.array_records[wire.ARRAYS] for reply in accepted]
    run.arrays = site_dp.aggregate(run.arrays, updates)
    log.info("site-level DP: ε = %.2f after %d round(s); clipping norm next %.4g", site_dp.epsilon,
             site_dp.rounds_charged, site_dp.clip_norm)  # fmt: skip
    return sorted(state.sites[r.metadata.src_node_id] for r in accepted)


def _final_report(
    state: _RunState,
    folder: RunFolder,
    arrays: ArrayRecord,
    rounds: list[dict[str, Any]],
    counts: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Release ``arrays`` (the global model, with its operating threshold, chosen from ``counts``
    when the last round's scoring brought them), score it on every site's test split and, when
    asked, against each site's local-only model: the run's report."""
    config = state.config
    task = get_task(config.run.task)
    operating = _operating_point(state, arrays, counts)
    released_config = config.with_overrides(_operating_overrides(operating)) if operating else config
    site_thresholds = {site: p["threshold"] for site, p in operating.get("per_site", {}).items()}
    save_checkpoint(
        folder.global_model,
        arrays,
        {"round": config.run.rounds, "task": config.run.task, "config": released_config.to_public_dict(),
         "metrics": rounds[-1]["metrics"], "site_thresholds": site_thresholds},
    )  # fmt: skip
    thresholds = {site: {wire.THRESHOLD: t} for site, t in site_thresholds.items()}
    at_threshold = _operating_settings(operating)
    per_site = _evaluate(state, arrays, "test", _Traffic(), thresholds, {**at_threshold, wire.SCORE_COUNTS: True})
    pooled = task.pooled_metrics(per_site, released_config)
    per_site = {site: _without_counts(m) for site, m in per_site.items()}
    personal = None
    if config.run.personalization != "none":
        personal = _personal_models(state, arrays, thresholds, at_threshold, task.PRIMARY_METRIC)
    cross_site = _cross_site(state, arrays, per_site, task.PRIMARY_METRIC) if config.evaluation.cross_site else None
    if cross_site is not None and personal is not None:  # each site's personal model on its own test split
        cross_site["models"].append("personal")
        cross_site["matrix"].append([personal["metrics"].get(s, {}).get(task.PRIMARY_METRIC, math.nan)
                                     for s in cross_site["sites"]])  # fmt: skip
    report = {
        "task": config.run.task,
        "primary_metric": task.PRIMARY_METRIC,
        "sites": sorted(set(state.sites.values())),
        "config": config.to_public_dict(),
        "rounds": rounds,
        "final": {
            "per_site": per_site,
            "pooled": pooled or None,
            "cross_site": cross_site,
            "operating_point": operating or None,
            "personalization": personal,
        },
        "privacy": _privacy_section(state),
        "synthetic": _synthetic_section(state),
        "protections": _protections(config),
        "site_privacy": state.site_dp.report() if state.site_dp else None,
        "site_notes": dict(sorted(state.notes.items())),
    }
    if config.run.initial_model:
        report["initial_model"] = initial_model_provenance(config.run.initial_model)
    return report


def untrained_reason(report: dict[str, Any]) -> str:
    """Why a finished run trained nothing, or "" when it did: when no round aggregated an update
    (every update rejected, every site failed or refused, or fewer than ``run.min-sites`` usable),
    the released model is the starting model and the run must not pass for a result."""
    if any(entry.get("sites_aggregated") for entry in report["rounds"][1:]):
        return ""
    notes = "; ".join(f"{site}: {' / '.join(lines)}" for site, lines in report.get("site_notes", {}).items())
    min_sites = report["config"]["run"]["min-sites"]
    return f"no round aggregated an update (run.min-sites = {min_sites}): the model is the starting model. " + (
        f"What the sites said: {notes}" if notes else "No site explained why: see the log above."
    )


def initial_model(config: Config) -> torch.nn.Module:
    """The model a run starts from: seeded random weights, or the checkpoint ``run.initial-model``."""
    torch.manual_seed(config.run.seed)
    model = get_task(config.run.task).build_model(config)
    if not config.run.initial_model:
        return model
    path = Path(config.run.initial_model)
    try:
        state, meta = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as err:
        raise ValueError(
            f"run.initial-model = {path}: {err} (build one with: medfed pretrain --config RUN.toml --out {path})"
        ) from err
    if meta.get("task", config.run.task) != config.run.task:
        raise ValueError(f"run.initial-model = {path} is a {meta.get('task')} model; run.task is {config.run.task}")
    remedy = "build it with the same [model] and [data] settings (medfed pretrain --config RUN.toml)"
    try:
        load_state(model, state, path, "this run's model", remedy)
    except CheckpointError as err:
        raise CheckpointError(f"run.initial-model = {err}") from None
    return model


def initial_model_provenance(path: str | Path) -> dict[str, Any]:
    """What the report says of a starting checkpoint: its file name, digest and recorded provenance."""
    path = Path(path)
    _, meta = load_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"file": path.name, "sha256": digest, "provenance": meta.get("provenance", "not recorded")}


def run_key(config: Config) -> str:
    """The run's key at the sites (privacy calibration, training seeds): a digest of the config, so a
    resumed or repeated run with the same config and seeds repeats the same local training."""
    untracked = config.with_overrides({"run.tracking": "none", "run.tracking-uri": ""})  # no effect on training
    return "cfg-" + hashlib.sha256(untracked.to_json().encode()).hexdigest()[:16]


class SitesUnavailable(RuntimeError):
    """Fewer sites than ``run.min-sites`` are connected after ``run.site-wait`` seconds."""


def _wait_for_sites(grid: Grid, minimum: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < minimum:
        if time.monotonic() > deadline:
            raise SitesUnavailable(
                f"only {connected} site(s) connected after {timeout:.0f} s, fewer than run.min-sites = {minimum}: "
                "check that the sites are running and registered, or lower run.min-sites"
            )
        log.info("waiting for sites: %d connected, run.min-sites = %d", connected, minimum)
        time.sleep(1.0)


STRATEGY_KEYS = ("current_arrays", "m_t", "v_t")  # FedOpt-family state (FedAdam); other strategies keep none


def _save_progress(
    folder: RunFolder, state: _RunState, strategy: FedAvg, server_round: int, rounds: list[dict[str, Any]]
) -> None:
    """What a resumed run needs besides the weights: round, run key, history, privacy, strategy state."""
    tensors = {
        f"{name}/{key}": torch.from_numpy(np.ascontiguousarray(value))
        for name in STRATEGY_KEYS
        for key, value in (getattr(strategy, name, None) or {}).items()
    }
    if tensors:
        save_file(tensors, _beside(folder.strategy_state))
        os.replace(_beside(folder.strategy_state), folder.strategy_state)
    progress = {
        "round": server_round,
        "run_key": state.run_key,
        "config": state.config.to_json(),
        "primary_metric": get_task(state.config.run.task).PRIMARY_METRIC,  # medfed status reads it
        "rounds": rounds,
        "privacy": state.privacy,
        "privacy_units": state.privacy_units,
        "synthetic": state.synthetic,
        "notes": state.notes,
        "strategy_state": bool(tensors),
    }
    _beside(folder.progress).write_text(json.dumps(json_safe(progress)))
    os.replace(_beside(folder.progress), folder.progress)  # atomic: a crash leaves the last one whole


def _beside(path: Path) -> Path:
    """The hidden file beside ``path`` that an atomic write of ``path`` goes through."""
    return path.with_name(f".{path.name}")


def _load_progress(folder: RunFolder, config: Config, strategy: FedAvg) -> dict[str, Any]:
    """The progress file of the run checkpointed in ``folder`` (and the strategy's own state, put
    back into ``strategy``), if it was checkpointed with the same config."""
    path = folder.progress
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (no round of this run was checkpointed)")
    try:
        progress = json.loads(path.read_text())
        saved = Config.from_json(progress["config"]).to_dict()
    except (OSError, KeyError, TypeError, ValueError, RecursionError) as err:
        raise ValueError(
            f"cannot resume: {path} is not the progress file medfed writes ({type(err).__name__})"
        ) from None
    changed = [
        f"{section}.{key}"
        for section, values in config.to_dict().items()
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ]
    if changed:
        raise ValueError(f"cannot resume: the config differs from the checkpointed run's in {changed}")
    if progress["strategy_state"]:
        tensors = load_file(folder.strategy_state)
        for name in STRATEGY_KEYS:
            values = {k.split("/", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith(f"{name}/")}
            if values:
                setattr(strategy, name, values)
    return progress


def _screen_train_replies(
    state: _RunState,
    reference: ArrayRecord,
    replies: Iterable[Message],
    traffic: _Traffic,
    server_round: int,
    scores: dict[str, dict[str, float]] | None = None,
) -> tuple[list[Message], dict[str, float]]:
    """The replies fit for aggregation; every other one is logged with the reason and left out.
    The validation scores the replies carry (:data:`medfed.wire.SCORE`) go into ``scores``."""
    accepted: list[Message] = []
    local_seconds: dict[str, float] = {}
    for reply in replies:
        try:
            parsed = _read_reply(state, reply)
            if parsed.scores is not None and scores is not None:
                _take_scores(scores, parsed.scores, "val")
            _record_privacy(state, parsed)
            if parsed.status != wire.OK:
                log.warning("round %d: site %s %s: %s", server_round, parsed.site, parsed.status, parsed.reason)
                state.outcomes[parsed.site] = parsed.status
                continue
            update = _checked_update(state, reference, parsed)
        except (wire.MalformedReply, UpdateRejected) as err:
            log.warning("round %d: reply left out: %s", server_round, err)
            site = state.site_of(reply)
            state.outcomes[site] = wire.ERROR if reply.has_error() else "rejected"
            if not any(n.startswith("update left out") for n in state.notes.get(site, [])):
                state.note(site, f"update left out (first in round {server_round}): {err}")
            continue
        assert parsed.arrays is not None  # _checked_update refuses a reply without weights
        state.outcomes[parsed.site] = "answered"
        traffic.up += array_bytes(parsed.arrays)  # as received: compressed when the run compresses
        local_seconds[parsed.site] = parsed.metrics.get(wire.LOCAL_SECONDS, math.nan)
        reply.content = RecordDict(
            {wire.ARRAYS: update, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: parsed.metrics[wire.NUM_EXAMPLES]})}
        )
        accepted.append(reply)
    accepted.sort(key=state.site_of)  # one summation order whatever order the replies came in
    return accepted, local_seconds


def _checked_update(
    state: _RunState, reference: ArrayRecord, parsed: wire.SiteReply, max_norm: float | None = None
) -> ArrayRecord:
    """The reply's weights, if they and the sample count that weighs them are sound.

    ``max_norm`` bounds ``||update - reference||`` (default ``run.max-update-norm``, meant for one
    round's update of the global model).
    """
    if parsed.arrays is None:
        raise UpdateRejected(f"site {parsed.site} sent no weights")
    try:
        arrays = decompress_update(reference, parsed.arrays, state.config.run.update_compression)
    except UpdateRejected as err:
        raise UpdateRejected(f"update from site {parsed.site} rejected: {err}") from err
    except (ValueError, TypeError) as err:
        raise UpdateRejected(f"update from site {parsed.site} is undecodable: {err}") from err
    count = parsed.metrics.get(wire.NUM_EXAMPLES, math.nan)
    if not (math.isfinite(count) and 0 < count <= MAX_EXAMPLES):
        raise UpdateRejected(f"site {parsed.site}: num-examples = {count} is not in (0, {MAX_EXAMPLES:.0e}]")
    try:
        check = validate_update(reference, arrays, max_norm or state.config.run.max_update_norm)
    except UpdateRejected as err:
        raise UpdateRejected(f"update from site {parsed.site} rejected: {err}") from err
    except (ValueError, TypeError) as err:  # undecodable array bytes
        raise UpdateRejected(f"update from site {parsed.site} is undecodable: {err}") from err
    log.debug("site %s update norm %.3g", parsed.site, check.update_norm)
    return arrays


def _record_privacy(state: _RunState, parsed: wire.SiteReply) -> None:
    privacy = {k: parsed.metrics[k] for k in wire.PRIVACY_METRICS if k in parsed.metrics}
    if privacy:
        state.privacy[parsed.site] = privacy
    synthetic = {k: v for k, v in parsed.metrics.items() if k.startswith(wire.SYNTHETIC_PREFIX)}
    if synthetic:
        state.synthetic[parsed.site] = synthetic
    if parsed.privacy_unit in ("image", "patient"):
        state.privacy_units[parsed.site] = parsed.privacy_unit


def _with_dtypes_of(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` cast to the reference's dtypes (server optimisers such as FedAdam return float64)."""
    converted = {}
    for (key, array), ref in zip(arrays.items(), reference.values(), strict=True):
        converted[key] = torch.from_numpy(np.ascontiguousarray(array.numpy().astype(ref.numpy().dtype)))
    return ArrayRecord(converted)


def _choose_operating_point(config: Config) -> bool:
    """Whether the operating point is chosen from the validation splits (no threshold in the config)."""
    return not (config.evaluation.threshold or config.evaluation.label_thresholds)


def _operating_point(
    state: _RunState, arrays: ArrayRecord, counts: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The released model's operating threshold (binary tasks): ``evaluation.threshold`` when set,
    else chosen by the task from the sites' validation splits (counts of cases per score bin,
    summed here; ``counts``: the sites' answers when already asked); {} for tasks without one."""
    settings = state.config.evaluation
    if settings.threshold:
        return {"threshold": settings.threshold, "method": "evaluation.threshold"}
    if settings.label_thresholds:
        return {"label_thresholds": list(settings.label_thresholds), "method": "evaluation.label-thresholds"}
    if not counts:
        counts = _evaluate(state, arrays, "val", _Traffic(), settings={wire.SCORE_COUNTS: True})
    task = get_task(state.config.run.task)
    chosen: dict[str, Any] = task.operating_point(counts, state.config)
    if not chosen:
        return {}
    target = settings.target_sensitivity
    method = f"highest threshold with sensitivity >= {target:g}" if target else "Youden's J"
    if "label_thresholds" in chosen:
        shown = ", ".join(f"{t:.4f}" for t in chosen["label_thresholds"])
        log.info("operating thresholds per label %s (%s on the validation splits)", shown, method)
    else:
        log.info("operating threshold %.4f (%s on the validation splits)", chosen["threshold"], method)
    chosen["method"] = f"{method}, validation splits of {len(counts)} site(s) pooled"
    if settings.operating_point == "site" and "threshold" in chosen:  # each site's own, where its data allow
        per_site = {site: task.operating_point({site: values}, state.config) for site, values in counts.items()}
        chosen["per_site"] = {site: point for site, point in per_site.items() if point}
    return chosen


def _operating_overrides(operating: dict[str, Any]) -> dict[str, Any]:
    """The config settings of an operating point: one threshold, or one per label (multi-label)."""
    if "label_thresholds" in operating:
        return {"evaluation.label-thresholds": operating["label_thresholds"]}
    return {"evaluation.threshold": operating["threshold"]}


def _operating_settings(operating: dict[str, Any]) -> dict[str, Any]:
    """The evaluation request settings that make a site score at ``operating`` ({}: none chosen)."""
    if not operating:
        return {}
    if "label_thresholds" in operating:
        return {wire.LABEL_THRESHOLDS: json.dumps(operating["label_thresholds"])}
    return {wire.THRESHOLD: operating["threshold"]}


def _evaluate(
    state: _RunState,
    arrays: ArrayRecord,
    split: str,
    traffic: _Traffic,
    per_site: dict[str, dict[str, Any]] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Send ``arrays`` to every site for evaluation on ``split`` (``settings``: more message settings,
    ``per_site``: settings for the named sites only, e.g. their own thresholds); metrics by site name."""
    messages = _evaluation_requests(state, arrays, split, state.grid.get_node_ids(), per_site, settings)
    replies = state.exchange(messages, state.config.run.round_timeout, traffic)
    return dict(sorted(_scores(state, replies, split).items()))


def _evaluation_requests(
    state: _RunState,
    arrays: ArrayRecord,
    split: str,
    nodes: Iterable[int],
    per_site: dict[str, dict[str, Any]] | None = None,
    settings: dict[str, Any] | None = None,
) -> list[Message]:
    """The requests to evaluate ``arrays`` on ``split`` at ``nodes`` (``settings`` and ``per_site``:
    as :func:`_evaluate` takes them)."""
    messages = []
    for node in nodes:
        own = {wire.SPLIT: split, **(settings or {}), **(per_site or {}).get(state.sites.get(node, ""), {})}
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: state.message_config(own)})
        messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
    return messages


def _scores(state: _RunState, replies: Iterable[Message], split: str) -> dict[str, dict[str, float]]:
    """The metrics of evaluation ``replies`` on ``split`` by site name (failures logged and left out)."""
    results: dict[str, dict[str, float]] = {}
    for reply in replies:
        try:
            _take_scores(results, _read_reply(state, reply), split)
        except wire.MalformedReply as err:
            log.warning("evaluation on %s: %s", split, err)
    return results


def _take_scores(results: dict[str, dict[str, float]], parsed: wire.SiteReply, split: str) -> None:
    """Put one site's evaluation answer into ``results`` (a failure or refusal is logged instead)."""
    if parsed.status == wire.UNKNOWN_MODEL:  # the model is sent to it next
        log.info("site %s does not hold the model to evaluate on %s", parsed.site, split)
    elif parsed.status != wire.OK:
        log.warning("site %s could not evaluate on %s: %s", parsed.site, split, parsed.reason)
    if parsed.status != wire.OK:
        return
    results[parsed.site] = {k: v for k, v in parsed.metrics.items() if k != wire.NUM_EXAMPLES}


def _cross_site(
    state: _RunState, global_arrays: ArrayRecord, global_results: dict[str, dict[str, float]], metric: str
) -> dict[str, Any]:
    """Each site's local-only model (same epochs, same privacy settings) and the global model, at every site."""
    node_ids = list(state.grid.get_node_ids())
    initial = model_to_arrays(initial_model(state.config))
    settings = {wire.PHASE: wire.PHASE_LOCAL, wire.SERVER_ROUND: 0}
    content = RecordDict({wire.ARRAYS: initial, wire.CONFIG: state.message_config(settings)})
    messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]
    local_models: dict[str, ArrayRecord] = {}
    for reply in state.exchange(messages, state.config.run.round_timeout * state.config.run.rounds):
        try:
            parsed = _read_reply(state, reply)
            _record_privacy(state, parsed)
            if parsed.status != wire.OK:
                raise wire.MalformedReply(f"site {parsed.site} {parsed.status}: {parsed.reason}")
            # A local-only model is a whole run's training away from the initial weights and is never
            # aggregated: it must be well-formed and finite, not close to the starting point.
            local_models[parsed.site] = _checked_update(state, initial, parsed, max_norm=math.inf)
        except (wire.MalformedReply, UpdateRejected) as err:
            log.warning("local-only model not used: %s", err)
    sites = sorted(set(state.sites.values()))
    models = sorted(local_models)
    matrix = []
    for name in models:
        results = _evaluate(state, local_models[name], "test", _Traffic())
        matrix.append([results.get(site, {}).get(metric, math.nan) for site in sites])
    matrix.append([global_results.get(site, {}).get(metric, math.nan) for site in sites])
    return {"models": [*models, "global"], "sites": sites, "metric": metric, "matrix": matrix}


def _personal_models(
    state: _RunState,
    arrays: ArrayRecord,
    thresholds: dict[str, dict[str, float]],
    at_threshold: dict[str, float],
    metric: str,
) -> dict[str, Any]:
    """Ask every site to make its personal model from the final global model ``arrays`` and keep
    it (:mod:`medfed.personalization`), then to score it on its test split at the released
    operating point: per site, the global and the personal model's ``metric`` with 95 % bootstrap
    intervals and their paired difference (``gain``), and the personal model's metrics."""
    config = state.config
    messages = []
    for node in state.grid.get_node_ids():
        own = {wire.PHASE: wire.PHASE_PERSONALIZE, **at_threshold, **thresholds.get(state.sites.get(node, ""), {})}
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: state.message_config(own)})
        messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
    for reply in state.exchange(messages, config.run.round_timeout):
        try:
            parsed = _read_reply(state, reply)
            _record_privacy(state, parsed)
        except wire.MalformedReply as err:
            log.warning("personal model not made: %s", err)
            continue
        if parsed.status != wire.OK:
            log.warning("site %s made no personal model: %s", parsed.site, parsed.reason)
    asked = {**at_threshold, wire.PERSONAL: True, wire.INTERVALS: True}
    results = _evaluate(state, arrays, "test", _Traffic(), thresholds, asked)
    prefix = f"{wire.INTERVALS}-"
    per_site = {
        site: {
            model: {key: values.get(f"{prefix}{model}-{key}", math.nan) for key in ("value", "low", "high")}
            for model in ("global", "personal", "gain")
        }
        for site, values in results.items()
    }
    metrics = {
        site: {k: v for k, v in values.items() if not k.startswith((prefix, "score_"))}
        for site, values in results.items()
    }
    return {"method": config.run.personalization, "metric": metric, "per_site": per_site, "metrics": metrics}


def _privacy_section(state: _RunState) -> dict[str, dict[str, Any]]:
    if not state.config.privacy.enabled:
        return {}
    keys = {
        wire.EPSILON: "epsilon",
        wire.DELTA: "delta",
        wire.BUDGET: "budget",
        wire.NOISE_MULTIPLIER: "noise_multiplier",
        wire.MAX_GRAD_NORM: "max_grad_norm",
    }
    return {
        site: {**{keys[k]: v for k, v in p.items()}, "unit": state.privacy_units.get(site, "image")}
        for site, p in sorted(state.privacy.items())
    }


def _synthetic_section(state: _RunState) -> dict[str, Any] | None:
    """``train.synthetic-augmentation``: the ratio, and per site the generated images it added (per
    class) and its generator (DP or not, its own ε, steps, seconds); None when the run adds none."""
    ratio = state.config.train.synthetic_augmentation
    if not ratio:
        return None
    classes = range(state.config.data.num_classes)
    sites = {
        site: {
            "images": int(m.get(wire.SYNTHETIC_IMAGES, 0)),
            "per_class": [int(m.get(f"{wire.SYNTHETIC_IMAGES}-{c}", 0)) for c in classes],
            "private": bool(m.get(wire.SYNTHETIC_PRIVATE, 0)),
            "epsilon": m.get(wire.SYNTHETIC_EPSILON) if m.get(wire.SYNTHETIC_PRIVATE) else None,
            "steps": int(m.get(wire.SYNTHETIC_STEPS, 0)),
            "seconds": m.get(wire.SYNTHETIC_SECONDS),
        }
        for site, m in sorted(state.synthetic.items())
    }
    return {"ratio": ratio, "steps": state.config.train.synthetic_steps, "sites": sites}


def _log_round(server_round: int, metrics: dict[str, dict[str, float]], primary: str) -> None:
    shown = ", ".join(f"{site} {m.get(primary, math.nan):.3f}" for site, m in metrics.items())
    log.info("round %d: val %s: %s", server_round, primary, shown)
