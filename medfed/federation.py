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

from medfed.config import Config
from medfed.evaluation.report import json_safe, write_report
from medfed.site import PHASE_FEDERATED, PHASE_LOCAL
from medfed.tasks import get_task
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

PRIVACY_KEYS = ("epsilon", "delta", "budget", "noise-multiplier", "max-grad-norm")
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
    notes: dict[str, list[str]] = field(default_factory=dict)
    sent_to: dict[str, int] = field(default_factory=dict)

    def exchange(self, messages: list[Message], timeout: float) -> list[Message]:
        """Send and wait for the replies, remembering which node each message went to: Flower answers
        for a node that died with an error reply from the SuperLink's own node id."""
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.sent_to.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id})
        return replies

    def note(self, site: str, text: str) -> None:
        """Remember what a site said about itself (pre-flight warnings, refusals, failures) for the report."""
        if text and text not in self.notes.setdefault(site, []):
            self.notes[site].append(text)

    def message_config(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord(
            {
                "medfed-config": self.config.to_json(),
                "simulation-state-root": self.state_root,
                "run-key": self.run_key,
                **extra,
            }
        )

    def site_of(self, reply: Message) -> str:
        """The reporting site's name, made unique per node (two sites may pick the same name)."""
        node = reply.metadata.src_node_id
        if reply.has_error():  # possibly on behalf of a node that is gone: name the node it was sent to
            node = self.sent_to.get(reply.metadata.reply_to_message_id, node)
        if node not in self.sites:
            try:
                name = str(reply.content["site"]["name"])
            except (KeyError, TypeError, ValueError):
                return f"node-{node}"
            if name in self.sites.values():
                name = f"{name}@{node}"
            self.sites[node] = name
        return self.sites[node]


class MalformedReply(ValueError):
    """A reply that does not have the shape every medfed site sends."""


@dataclass
class _Reply:
    site: str
    status: str
    reason: str
    metrics: dict[str, float]
    arrays: ArrayRecord | None
    privacy_unit: str = ""
    notes: str = ""


def _parse_reply(state: _RunState, reply: Message) -> _Reply:
    """Read a site's reply defensively: a malformed one is rejected, it never crashes the server."""
    site = state.site_of(reply)
    if reply.has_error():
        raise MalformedReply(f"site {site} failed: {reply.error.reason}")
    try:
        status = reply.content["site"]
        metrics = {str(k): float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
        arrays = reply.content["arrays"] if "arrays" in reply.content.array_records else None
        unit = str(status["privacy-unit"]) if "privacy-unit" in status else ""
        notes = str(status["notes"]) if "notes" in status else ""
        parsed = _Reply(site, str(status["status"]), str(status["reason"]), metrics, arrays, unit, notes)
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedReply(f"site {site} sent a malformed reply ({type(err).__name__}: {err})") from err
    state.note(site, f"data warnings: {parsed.notes}" if parsed.notes else "")
    state.note(site, f"{parsed.status}: {parsed.reason}" if parsed.status not in ("ok", "empty") else "")
    return parsed


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
    out_dir = Path(out_dir).resolve()
    checkpoints = out_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    state_root = Path(simulation_state_root or out_dir / "state").resolve()
    task = get_task(config.run.task)
    strategy = build_strategy(config)
    progress = _load_progress(checkpoints, config, strategy) if resume else None
    state = _RunState(config, grid, str(state_root), progress["run_key"] if progress else run_key(config))
    _wait_for_sites(grid, config.run.min_sites, config.run.site_wait)

    released: ArrayRecord | None = None  # the run.ema average of the global models, when on
    if progress is not None:
        model = task.build_model(config)  # the model's own key order, as every site sends it
        model.load_state_dict(load_checkpoint(checkpoints / f"round-{progress['round']:03d}.safetensors")[0])
        arrays = model_to_arrays(model)
        if config.run.ema:
            model.load_state_dict(load_checkpoint(checkpoints / f"round-{progress['round']:03d}-ema.safetensors")[0])
            released = model_to_arrays(model)
        rounds: list[dict[str, Any]] = progress["rounds"]
        state.privacy, state.privacy_units, state.notes = (
            progress["privacy"],
            progress["privacy_units"],
            progress["notes"],
        )
        first_round = progress["round"] + 1
        log.info("resuming run %s after round %d", state.run_key[:8], progress["round"])
    else:
        arrays = model_to_arrays(initial_model(config))
        traffic = _Traffic()
        metrics = _evaluate(state, arrays, "val", traffic)
        rounds = [
            {
                "round": 0,
                "seconds": 0.0,
                "local_seconds": {},
                "bytes_up": 0,
                "bytes_down": traffic.down,
                "metrics": metrics,
                "sites_aggregated": [],
            }
        ]
        _log_round(0, metrics, task.PRIMARY_METRIC)
        first_round = 1
    metrics = rounds[-1]["metrics"]
    for server_round in range(first_round, config.run.rounds + 1):
        _wait_for_sites(grid, config.run.min_sites, config.run.site_wait)
        started, traffic = time.perf_counter(), _Traffic()
        messages = list(
            strategy.configure_train(server_round, arrays, state.message_config(phase=PHASE_FEDERATED), grid)
        )
        traffic.down += array_bytes(arrays) * len(messages)
        replies = state.exchange(messages, config.run.round_timeout)
        accepted, local_seconds = _screen_train_replies(state, arrays, replies, traffic, server_round)
        aggregated_sites: list[str] = []
        if len(accepted) >= config.run.min_sites:
            aggregated_sites = sorted(state.sites[r.metadata.src_node_id] for r in accepted)
            new_arrays, _ = strategy.aggregate_train(server_round, accepted)
            if new_arrays is not None:
                arrays = _with_dtypes_of(new_arrays, arrays)
        else:
            log.warning(
                "round %d: %d usable update(s), fewer than run.min-sites = %d; global model kept",
                server_round,
                len(accepted),
                config.run.min_sites,
            )
        if config.run.ema:
            released = moving_average(released, arrays, config.run.ema)
            save_checkpoint(checkpoints / f"round-{server_round:03d}-ema.safetensors", released,
                            {"round": server_round, "ema": config.run.ema})  # fmt: skip
        metrics = _evaluate(state, released or arrays, "val", traffic)
        entry = {
            "round": server_round,
            "seconds": time.perf_counter() - started,
            "local_seconds": local_seconds,
            "bytes_up": traffic.up,
            "bytes_down": traffic.down,
            "metrics": metrics,
            "sites_aggregated": aggregated_sites,
            "epsilon": {site: p.get("epsilon", 0.0) for site, p in state.privacy.items()},
        }
        rounds.append(entry)
        save_checkpoint(
            checkpoints / f"round-{server_round:03d}.safetensors",
            arrays,
            {"round": server_round, "task": config.run.task, "config": config.to_public_dict(), "metrics": metrics},
        )
        _save_progress(checkpoints, state, strategy, server_round, rounds)
        _log_round(server_round, metrics, task.PRIMARY_METRIC)

    arrays = released or arrays
    operating = _operating_point(state, arrays)
    released_config = config.with_overrides({"evaluation.threshold": operating["threshold"]}) if operating else config
    site_thresholds = {site: p["threshold"] for site, p in operating.get("per_site", {}).items()}
    save_checkpoint(
        checkpoints / "global.safetensors",
        arrays,
        {"round": config.run.rounds, "task": config.run.task, "config": released_config.to_public_dict(),
         "metrics": metrics, "site_thresholds": site_thresholds},
    )  # fmt: skip
    thresholds = {site: {"threshold": t} for site, t in site_thresholds.items()}
    at_threshold = {"threshold": operating["threshold"]} if operating else {}
    per_site = _evaluate(state, arrays, "test", _Traffic(), thresholds, **at_threshold, **{"score-counts": True})
    pooled = task.pooled_metrics(per_site, released_config)
    per_site = {site: {k: v for k, v in m.items() if not k.startswith("score_")} for site, m in per_site.items()}
    cross_site = _cross_site(state, arrays, per_site, task.PRIMARY_METRIC) if config.evaluation.cross_site else None
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
        },
        "privacy": _privacy_section(state),
        "site_notes": dict(sorted(state.notes.items())),
    }
    if config.run.initial_model:
        report["initial_model"] = initial_model_provenance(config.run.initial_model)
    if progress is not None:
        report["resumed_after_round"] = progress["round"]
    write_report(report, out_dir)
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
    return "cfg-" + hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


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


PROGRESS = "progress.json"
STRATEGY_STATE = "strategy.safetensors"
STRATEGY_KEYS = ("current_arrays", "m_t", "v_t")  # FedOpt-family state (FedAdam); other strategies keep none


def _save_progress(
    checkpoints: Path, state: _RunState, strategy: FedAvg, server_round: int, rounds: list[dict[str, Any]]
) -> None:
    """What a resumed run needs besides the weights: round, run key, history, privacy, strategy state."""
    tensors = {
        f"{name}/{key}": torch.from_numpy(np.ascontiguousarray(value))
        for name in STRATEGY_KEYS
        for key, value in (getattr(strategy, name, None) or {}).items()
    }
    if tensors:
        save_file(tensors, checkpoints / f".{STRATEGY_STATE}")
        os.replace(checkpoints / f".{STRATEGY_STATE}", checkpoints / STRATEGY_STATE)
    progress = {
        "round": server_round,
        "run_key": state.run_key,
        "config": state.config.to_json(),
        "rounds": rounds,
        "privacy": state.privacy,
        "privacy_units": state.privacy_units,
        "notes": state.notes,
        "strategy_state": bool(tensors),
    }
    (checkpoints / f".{PROGRESS}").write_text(json.dumps(json_safe(progress)))
    os.replace(checkpoints / f".{PROGRESS}", checkpoints / PROGRESS)  # atomic: a crash leaves the last one whole


def _load_progress(checkpoints: Path, config: Config, strategy: FedAvg) -> dict[str, Any]:
    path = checkpoints / PROGRESS
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
        tensors = load_file(checkpoints / STRATEGY_STATE)
        for name in STRATEGY_KEYS:
            values = {k.split("/", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith(f"{name}/")}
            if values:
                setattr(strategy, name, values)
    return progress


def _screen_train_replies(
    state: _RunState, reference: ArrayRecord, replies: Iterable[Message], traffic: _Traffic, server_round: int
) -> tuple[list[Message], dict[str, float]]:
    """The replies fit for aggregation; every other one is logged with the reason and left out."""
    accepted: list[Message] = []
    local_seconds: dict[str, float] = {}
    for reply in replies:
        try:
            parsed = _parse_reply(state, reply)
            _record_privacy(state, parsed)
            if parsed.status != "ok":
                log.warning("round %d: site %s %s: %s", server_round, parsed.site, parsed.status, parsed.reason)
                continue
            update = _checked_update(state, reference, parsed)
        except (MalformedReply, UpdateRejected) as err:
            log.warning("round %d: reply left out: %s", server_round, err)
            site = state.site_of(reply)
            if not any(n.startswith("update left out") for n in state.notes.get(site, [])):
                state.note(site, f"update left out (first in round {server_round}): {err}")
            continue
        traffic.up += array_bytes(parsed.arrays)  # as received: compressed when the run compresses
        local_seconds[parsed.site] = parsed.metrics.get("local-seconds", math.nan)
        reply.content = RecordDict(
            {"arrays": update, "metrics": MetricRecord({"num-examples": parsed.metrics["num-examples"]})}
        )
        accepted.append(reply)
    return accepted, local_seconds


def _checked_update(
    state: _RunState, reference: ArrayRecord, parsed: _Reply, max_norm: float | None = None
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
    count = parsed.metrics.get("num-examples", math.nan)
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


def _record_privacy(state: _RunState, parsed: _Reply) -> None:
    privacy = {k: parsed.metrics[k] for k in PRIVACY_KEYS if k in parsed.metrics}
    if privacy:
        state.privacy[parsed.site] = privacy
    if parsed.privacy_unit in ("image", "patient"):
        state.privacy_units[parsed.site] = parsed.privacy_unit


def _with_dtypes_of(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` cast to the reference's dtypes (server optimisers such as FedAdam return float64)."""
    converted = {}
    for (key, array), ref in zip(arrays.items(), reference.values(), strict=True):
        converted[key] = torch.from_numpy(np.ascontiguousarray(array.numpy().astype(ref.numpy().dtype)))
    return ArrayRecord(converted)


def _operating_point(state: _RunState, arrays: ArrayRecord) -> dict[str, Any]:
    """The released model's operating threshold (binary tasks): ``evaluation.threshold`` when set,
    else chosen by the task from the sites' validation splits (counts of cases per score bin,
    summed here); {} for tasks without one."""
    settings = state.config.evaluation
    if settings.threshold:
        return {"threshold": settings.threshold, "method": "evaluation.threshold"}
    counts = _evaluate(state, arrays, "val", _Traffic(), **{"score-counts": True})
    task = get_task(state.config.run.task)
    chosen = task.operating_point(counts, state.config)
    if not chosen:
        return {}
    target = settings.target_sensitivity
    method = f"highest threshold with sensitivity >= {target:g}" if target else "Youden's J"
    log.info("operating threshold %.4f (%s on the validation splits)", chosen["threshold"], method)
    chosen["method"] = f"{method}, validation splits of {len(counts)} site(s) pooled"
    if settings.operating_point == "site":  # each site's own, where its validation split allows
        per_site = {site: task.operating_point({site: values}, state.config) for site, values in counts.items()}
        chosen["per_site"] = {site: point for site, point in per_site.items() if point}
    return chosen


def _evaluate(
    state: _RunState,
    arrays: ArrayRecord,
    split: str,
    traffic: _Traffic,
    per_site: dict[str, dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, dict[str, float]]:
    """Send ``arrays`` to every site for evaluation on ``split`` (``extra``: more message settings,
    ``per_site``: settings for the named sites only, e.g. their own thresholds); metrics by site name."""
    node_ids = list(state.grid.get_node_ids())
    messages = []
    for node in node_ids:
        settings = {**extra, **(per_site or {}).get(state.sites.get(node, ""), {})}
        content = RecordDict({"arrays": arrays, "config": state.message_config(split=split, **settings)})
        messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
    traffic.down += array_bytes(arrays) * len(messages)
    results: dict[str, dict[str, float]] = {}
    for reply in state.exchange(messages, state.config.run.round_timeout):
        try:
            parsed = _parse_reply(state, reply)
        except MalformedReply as err:
            log.warning("evaluation on %s: %s", split, err)
            continue
        if parsed.status != "ok":
            log.warning("site %s could not evaluate on %s: %s", parsed.site, split, parsed.reason)
            continue
        results[parsed.site] = {k: v for k, v in parsed.metrics.items() if k != "num-examples"}
    return dict(sorted(results.items()))


def _cross_site(
    state: _RunState, global_arrays: ArrayRecord, global_results: dict[str, dict[str, float]], metric: str
) -> dict[str, Any]:
    """Each site's local-only model (same epochs, same privacy settings) and the global model, at every site."""
    node_ids = list(state.grid.get_node_ids())
    initial = model_to_arrays(initial_model(state.config))
    content = RecordDict({"arrays": initial, "config": state.message_config(phase=PHASE_LOCAL, **{"server-round": 0})})
    messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]
    local_models: dict[str, ArrayRecord] = {}
    for reply in state.exchange(messages, state.config.run.round_timeout * state.config.run.rounds):
        try:
            parsed = _parse_reply(state, reply)
            _record_privacy(state, parsed)
            if parsed.status != "ok":
                raise MalformedReply(f"site {parsed.site} {parsed.status}: {parsed.reason}")
            # A local-only model is a whole run's training away from the initial weights and is never
            # aggregated: it must be well-formed and finite, not close to the starting point.
            local_models[parsed.site] = _checked_update(state, initial, parsed, max_norm=math.inf)
        except (MalformedReply, UpdateRejected) as err:
            log.warning("local-only model not used: %s", err)
    sites = sorted(set(state.sites.values()))
    models = sorted(local_models)
    matrix = []
    for name in models:
        results = _evaluate(state, local_models[name], "test", _Traffic())
        matrix.append([results.get(site, {}).get(metric, math.nan) for site in sites])
    matrix.append([global_results.get(site, {}).get(metric, math.nan) for site in sites])
    return {"models": [*models, "global"], "sites": sites, "metric": metric, "matrix": matrix}


def _privacy_section(state: _RunState) -> dict[str, dict[str, Any]]:
    if not state.config.privacy.enabled:
        return {}
    keys = {
        "epsilon": "epsilon",
        "delta": "delta",
        "budget": "budget",
        "noise-multiplier": "noise_multiplier",
        "max-grad-norm": "max_grad_norm",
    }
    return {
        site: {**{keys[k]: v for k, v in p.items()}, "unit": state.privacy_units.get(site, "image")}
        for site, p in sorted(state.privacy.items())
    }


def _log_round(server_round: int, metrics: dict[str, dict[str, float]], primary: str) -> None:
    shown = ", ".join(f"{site} {m.get(primary, math.nan):.3f}" for site, m in metrics.items())
    log.info("round %d: val %s: %s", server_round, primary, shown)
