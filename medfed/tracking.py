"""Experiment tracking: a run followed in MLflow or TensorBoard as it goes (``run.tracking``).

After every round the server hands the round's report entry to a :class:`Tracker`, and the report
at the end; the tracker logs, with the round as the step:

- ``round/seconds``, ``round/bytes_up``, ``round/bytes_down``;
- ``sites/aggregated``, and ``sites/answered``, ``sites/refused``, ``sites/failed``,
  ``sites/rejected`` (an update left out): what each site's training reply was that round;
- per site: ``val/SITE/METRIC`` (the global model on its validation split), ``epsilon/SITE``,
  ``local_seconds/SITE``; ``site_dp/epsilon`` under site-level DP;
- at the end: ``test/SITE/METRIC``, ``test/pooled/METRIC``.

MLflow also gets the config as parameters (dotted keys, as in the report) and report.json,
report.html, its plots and the released checkpoint as artifacts; TensorBoard gets the config as
text. Nothing names a site beyond the site names the report already carries, and nothing sent by
a site is logged but numbers under its (sanitised) metric names.

A tracker that fails (a server gone, a disk full) logs one warning and stops tracking: it never
ends a run. A setting that cannot work (the extra not installed) is refused before the run starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medfed.config import Config, ConfigError, finite_number
from medfed.run_folder import RunFolder

__all__ = ["Tracker", "check_tracking", "open_tracker", "config_params", "round_scalars", "final_scalars"]

log = logging.getLogger("medfed.tracking")

INSTALL = "pip install 'medfed[tracking]'"
_PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # run.tracking -> the module it needs
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
MAX_KEY = 250  # MLflow's limit on a metric or parameter name
MAX_PARAM = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow takes at most 100 parameters (1000 metrics) per call
# A team's MLflow server that does not answer stalls the run for as long as MLflow retries (its
# defaults: 7 retries with growing waits, 120 s each); these apply unless the environment sets them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class Tracker:
    """Where a run's progress goes. This base class tracks nothing (``run.tracking = "none"``)."""

    def round_done(self, entry: dict[str, Any]) -> None:
        """Log one round's report ``entry`` (round 0: the starting model)."""

    def finished(self, report: dict[str, Any], folder: RunFolder) -> None:
        """Log the finished run's ``report`` and the files in ``folder``, and close the tracker."""


def check_tracking(config: Config) -> None:
    """Refuse ``run.tracking`` when the package it needs is not installed (a :class:`ConfigError`)."""
    module = _PACKAGES.get(config.run.tracking)
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"run.tracking = '{config.run.tracking}' needs the {module} package, which is not installed: "
            f"{INSTALL} (or set run.tracking = 'none')",
            "run.tracking",
        )


def open_tracker(config: Config, folder: RunFolder, resumed: bool) -> Tracker:
    """The tracker ``run.tracking`` names for the run in ``folder`` (``resumed``: a run that goes on
    after its last checkpoint). Refuses a tracker whose package is missing (:func:`check_tracking`);
    one that cannot start (an MLflow server that does not answer) is warned about, and the run goes
    on without it."""
    check_tracking(config)
    if config.run.tracking == "none":
        return Tracker()
    try:
        inner = (_MLflow if config.run.tracking == "mlflow" else _TensorBoard)(config, folder, resumed)
    except Exception as err:  # noqa: BLE001 - any failure of the tool: the run goes on without it
        _warn(config.run.tracking, err)
        return Tracker()
    return _Guarded(config.run.tracking, inner)


class _Guarded(Tracker):
    """Passes calls to ``inner`` until one fails; then warns once and tracks nothing more."""

    def __init__(self, name: str, inner: Tracker) -> None:
        self.name = name
        self.inner: Tracker | None = inner

    def round_done(self, entry: dict[str, Any]) -> None:
        self._call(lambda tracker: tracker.round_done(entry))

    def finished(self, report: dict[str, Any], folder: RunFolder) -> None:
        self._call(lambda tracker: tracker.finished(report, folder))

    def _call(self, call: Callable[[Tracker], None]) -> None:
        if self.inner is None:
            return
        try:
            call(self.inner)
        except Exception as err:  # noqa: BLE001 - a tracking failure never ends a run
            self.inner = None
            _warn(self.name, err)


def _warn(name: str, err: Exception) -> None:
    text = " ".join(str(err).split())[:300]
    log.warning("run.tracking = %s failed (%s: %s); the run goes on without tracking", name, type(err).__name__, text)


def _name(*parts: str) -> str:
    """A metric or parameter name from ``parts`` (site and metric names come from sites: only
    letters, digits, '_', '.', '-' are kept, no part is '.' or '..'), joined by '/'."""
    cleaned = []
    for part in parts:
        text = _UNSAFE.sub("_", str(part))[:64]
        cleaned.append("_" if text in ("", ".", "..") else text)
    return "/".join(cleaned)[:MAX_KEY]


def _scalars(items: Iterator[tuple[str, Any]]) -> dict[str, float]:
    return {key: number for key, value in items if (number := finite_number(value)) is not None}


def round_scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers logged for one round's report ``entry``, by name (see the module docstring)."""

    def items() -> Iterator[tuple[str, Any]]:
        yield "round/seconds", entry.get("seconds")
        yield "round/bytes_up", entry.get("bytes_up")
        yield "round/bytes_down", entry.get("bytes_down")
        yield "sites/aggregated", len(entry.get("sites_aggregated", []))
        outcomes = list(entry.get("outcomes", {}).values())  # this round's reply of each site (round 0: none)
        for kind, outcome in (("answered", "answered"), ("refused", "refused"), ("failed", "error"),
                              ("rejected", "rejected")):  # fmt: skip
            yield f"sites/{kind}", outcomes.count(outcome)
        for site, metrics in entry.get("metrics", {}).items():
            for metric, value in metrics.items():
                yield _name("val", site, metric), value
        for site, value in entry.get("epsilon", {}).items():
            yield _name("epsilon", site), value
        for site, value in entry.get("local_seconds", {}).items():
            yield _name("local_seconds", site), value
        yield "site_dp/epsilon", entry.get("site_epsilon")

    return _scalars(items())


def final_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The numbers logged for a finished run: the released model on each site's test split, pooled."""
    final = report.get("final", {})
    per_site = {**final.get("per_site", {}), "pooled": final.get("pooled") or {}}
    return _scalars(
        (_name("test", site, metric), value) for site, metrics in per_site.items() for metric, value in metrics.items()
    )


def config_params(config: Config) -> dict[str, str]:
    """The config as the report has it (:meth:`Config.to_public_dict`), one text value per dotted key
    (lists as JSON), each within MLflow's limits."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
            return
        text = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
        flat[_UNSAFE.sub("_", prefix)[:MAX_KEY]] = text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"

    walk("", config.to_public_dict())
    return flat


class _MLflow(Tracker):
    """An MLflow run in ``run.tracking-uri`` (default: ``OUT/mlflow.db``), in the experiment named
    ``run.name``; a resumed run goes on logging to the run it started."""

    def __init__(self, config: Config, folder: RunFolder, resumed: bool) -> None:
        from mlflow.tracking import MlflowClient

        uri = config.run.tracking_uri or f"sqlite:///{folder.mlflow_store}"
        artifacts: str | None = None
        if uri.startswith("sqlite:///"):  # MLflow would put the artifacts in the working folder
            database = Path(uri.removeprefix("sqlite:///"))
            database.parent.mkdir(parents=True, exist_ok=True)
            artifacts = (database.parent.resolve() / folder.mlflow_artifacts.name).as_uri()
        else:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        self.client, self.uri = MlflowClient(tracking_uri=uri), uri
        experiment = self.client.get_experiment_by_name(config.run.name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(config.run.name, artifact_location=artifacts)
        )
        resumed_run = self._resumed_run(folder) if resumed else None
        self.run_id: str = resumed_run or self._new_run(config, folder, experiment_id)
        self.logged = self._last_step() if resumed_run else -1
        log.info("run.tracking: MLflow run %s in %s", self.run_id, uri)

    def _new_run(self, config: Config, folder: RunFolder, experiment_id: str) -> str:
        """A new MLflow run with the config as its parameters, remembered in the run folder for a resume."""
        tags = {"medfed.task": config.run.task, "medfed.run-folder": folder.root.name}
        run_id: str = self.client.create_run(experiment_id, run_name=folder.root.name, tags=tags).info.run_id
        self._log_params(run_id, config_params(config))
        folder.tracking_state.parent.mkdir(parents=True, exist_ok=True)
        folder.tracking_state.write_text(json.dumps({"mlflow_uri": self.uri, "mlflow_run_id": run_id}))
        return run_id

    def _resumed_run(self, folder: RunFolder) -> str | None:
        """The MLflow run this run's earlier part logged to, when it is still in this store."""
        from mlflow.exceptions import MlflowException

        try:
            saved = json.loads(folder.tracking_state.read_text())
        except (OSError, ValueError):
            return None
        run_id = saved.get("mlflow_run_id") if isinstance(saved, dict) and saved.get("mlflow_uri") == self.uri else None
        if not isinstance(run_id, str):
            return None
        try:
            self.client.update_run(self.client.get_run(run_id).info.run_id, status="RUNNING")
        except MlflowException:  # deleted from the store since: the resumed part gets a run of its own
            return None
        return run_id

    def _last_step(self) -> int:
        """The last round logged (-1: none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, "round/seconds")), default=-1)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[start : start + BATCH])

    def _log_metrics(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in scalars.items()]
        for start in range(0, len(items), 10 * BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + 10 * BATCH])

    def round_done(self, entry: dict[str, Any]) -> None:
        step = int(entry["round"])
        if step > self.logged:  # a resumed run does not log its earlier rounds twice
            self._log_metrics(round_scalars(entry), step)
            self.logged = step

    def finished(self, report: dict[str, Any], folder: RunFolder) -> None:
        self._log_metrics(final_scalars(report), max(self.logged, 0))
        for path in (folder.report_json, folder.report_html):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if folder.plots.is_dir():  # report.html shows them from plots/
            self.client.log_artifacts(self.run_id, str(folder.plots), "plots")
        for path in (folder.global_model, folder.global_model.with_suffix(".json")):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), "checkpoints")
        self.client.set_terminated(self.run_id, "FINISHED")


class _TensorBoard(Tracker):
    """TensorBoard event files in ``run.tracking-uri`` (default: ``OUT/tensorboard``). A resumed run
    starts with its last checkpointed round and hides what the interrupted part wrote from that
    round on (TensorBoard's ``purge_step``)."""

    def __init__(self, config: Config, folder: RunFolder, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        uri = config.run.tracking_uri
        self.log_dir = Path(urllib.parse.unquote(uri.removeprefix("file://"))) if uri else folder.tensorboard
        self.writer_class, self.resumed = SummaryWriter, resumed
        self.config = json.dumps(config.to_public_dict(), indent=2, sort_keys=True, default=str)
        self.writer: Any = None
        self.step = 0

    def round_done(self, entry: dict[str, Any]) -> None:
        self.step = int(entry["round"])
        if self.writer is None:  # the first round logged: round 0, or a resumed run's last checkpointed one
            self.writer = self.writer_class(str(self.log_dir), purge_step=self.step if self.resumed else None)
            self.writer.add_text("config", "\n".join(f"    {line}" for line in self.config.splitlines()), self.step)
            log.info("run.tracking: TensorBoard events in %s", self.log_dir)
        for key, value in round_scalars(entry).items():
            self.writer.add_scalar(key, value, self.step)
        self.writer.flush()

    def finished(self, report: dict[str, Any], folder: RunFolder) -> None:
        if self.writer is None:
            return
        for key, value in final_scalars(report).items():
            self.writer.add_scalar(key, value, self.step)
        self.writer.close()
