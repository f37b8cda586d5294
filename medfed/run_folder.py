"""The names of the files a run writes: one place that knows a run folder's layout.

A federation run's folder (``--out DIR``, design.md "A run's output")::

    DIR/report.json, report.html, plots/*.png
    DIR/checkpoints/round-NNN.safetensors (+ .json)   global model after round NNN
    DIR/checkpoints/round-NNN-ema.safetensors         its run.ema average, when on
    DIR/checkpoints/global.safetensors (+ .json)      the released model
    DIR/checkpoints/progress.json, strategy.safetensors   what --resume needs (stays with the coordinator)
    DIR/state/SITE/                                   simulated sites' state (privacy ledgers), by default
    DIR/mlflow.db, mlflow-artifacts/, tensorboard/    run.tracking's store, by default (medfed.tracking)

A cross-site protocol's folder holds ``protocol.json``, ``protocol.html``, ``plots/`` and one run
folder per federation it runs (:class:`ProtocolFolder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProtocolFolder", "RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    """The files of one federation run's output folder ``root``."""

    root: Path

    @property
    def report_json(self) -> Path:
        """The run's report (schema in design.md)."""
        return self.root / "report.json"

    @property
    def report_html(self) -> Path:
        """The report for people: tables and the plots."""
        return self.root / "report.html"

    @property
    def plots(self) -> Path:
        """The report's figures (PNG)."""
        return self.root / "plots"

    @property
    def checkpoints(self) -> Path:
        """Models per round, the released model, and the resume state."""
        return self.root / "checkpoints"

    @property
    def global_model(self) -> Path:
        """The released global model (after the last round, its run.ema average when on)."""
        return self.checkpoints / "global.safetensors"

    def round_model(self, server_round: int, ema: bool = False) -> Path:
        """The global model after ``server_round`` (``ema``: its run.ema moving average)."""
        return self.checkpoints / f"round-{server_round:03d}{'-ema' if ema else ''}.safetensors"

    @property
    def progress(self) -> Path:
        """Where a resumed run starts from: round, run key, history, privacy (JSON)."""
        return self.checkpoints / "progress.json"

    @property
    def site_privacy(self) -> Path:
        """Site-level DP's state at the server (clipping norm, rounds charged): ``medfed.site_level_dp``."""
        return self.checkpoints / "site_privacy.json"

    @property
    def strategy_state(self) -> Path:
        """The server optimiser's state (FedAdam's moments), when the strategy keeps one."""
        return self.checkpoints / "strategy.safetensors"

    @property
    def tracking_state(self) -> Path:
        """Which MLflow run a resumed run goes on logging to (JSON)."""
        return self.checkpoints / "tracking.json"

    @property
    def mlflow_store(self) -> Path:
        """The MLflow store (SQLite) of ``run.tracking = "mlflow"`` when ``run.tracking-uri`` names none."""
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """Where the default MLflow store keeps the run's artifacts (report, final checkpoint)."""
        return self.root / "mlflow-artifacts"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's log folder for ``run.tracking = "tensorboard"`` when ``run.tracking-uri`` names none."""
        return self.root / "tensorboard"

    @property
    def site_states(self) -> Path:
        """Where simulated sites keep their state (one folder per site) unless told otherwise."""
        return self.root / "state"


@dataclass(frozen=True)
class ProtocolFolder:
    """The files of one cross-site protocol's output folder ``root``."""

    root: Path

    @property
    def protocol_json(self) -> Path:
        """The protocol's report (schema in :mod:`medfed.protocol`)."""
        return self.root / "protocol.json"

    @property
    def protocol_html(self) -> Path:
        """The protocol's tables for people."""
        return self.root / "protocol.html"

    @property
    def plots(self) -> Path:
        """The protocol's figures (PNG)."""
        return self.root / "plots"

    def run(self, name: str) -> RunFolder:
        """The run folder of the federation run named ``name`` (``fedavg``, ``without-SITE``)."""
        return RunFolder(self.root / name)
