"""DP-SGD at a site (Opacus), with a privacy ledger that outlives rounds, runs and restarts.

The ledger (``STATE_DIR/privacy.json``) holds the accountant history, one ``(noise_multiplier,
sample_rate, steps)`` entry per round trained, and the noise multiplier calibrated for each run.
ε is always recomputed from the whole history, so it composes across rounds and across runs. A
new Opacus ``PrivacyEngine`` is built for each round (live Opacus objects cannot be kept between
Flower calls), but its noise comes from the run's one calibration and its spend goes to the ledger.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

__all__ = ["BudgetExceeded", "PrivacyLedger", "default_delta", "make_private"]

LEDGER_FILE = "privacy.json"


class BudgetExceeded(RuntimeError):
    """Training would take the site past its privacy budget; the site refuses the round."""


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus' noise calibration (a binary search over σ, seconds on CPU), once per process per setting:
    simulated sites of equal size share it."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def default_delta(num_samples: int) -> float:
    """δ = 1/(10 n): well below 1/n, the usual ceiling for a meaningful guarantee."""
    return 1.0 / (10.0 * max(num_samples, 1))


@dataclass
class PrivacyLedger:
    """The persisted privacy state of one site.

    Args:
        path: the JSON file (inside the site's state folder).
        delta: fixed at first use; a site keeps one δ for its lifetime so ε values compose.
        accountant: ``rdp`` or ``prv``.
        history: accountant entries ``[noise_multiplier, sample_rate, steps]``.
        calibrations: noise multiplier chosen for each run id.
    """

    path: Path
    delta: float
    accountant: str = "rdp"
    history: list[list[float]] = field(default_factory=list)
    calibrations: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(cls, state_dir: str | Path, delta: float, accountant: str = "rdp") -> PrivacyLedger:
        """Load the site's ledger, or start one with ``delta`` and ``accountant``."""
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path=path, delta=delta, accountant=accountant)
        try:
            raw = json.loads(path.read_text())
            return cls(
                path=path,
                delta=float(raw["delta"]),
                accountant=str(raw["accountant"]),
                history=[[float(s), float(q), int(n)] for s, q, n in raw["history"]],
                calibrations={str(k): float(v) for k, v in raw["calibrations"].items()},
            )
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
            raise RuntimeError(
                f"privacy ledger {path} is unreadable ({err}); refusing to train rather than "
                "forget past privacy spending. Restore it from backup."
            ) from err

    def save(self) -> None:
        """Write atomically, so a crash never leaves a half-written ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "delta": self.delta,
            "accountant": self.accountant,
            "history": self.history,
            "calibrations": self.calibrations,
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".privacy-")
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.replace(tmp, self.path)

    def epsilon(self, extra: list[list[float]] | None = None) -> float:
        """ε spent by the whole history (plus ``extra`` planned entries)."""
        entries = [tuple(e) for e in self.history + (extra or []) if e[2] > 0]
        if not entries:
            return 0.0
        merged: dict[tuple[float, float], int] = {}  # the same mechanism n1 then n2 times = n1 + n2 times
        for sigma, q, n in entries:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(n)
        acc = RDPAccountant() if self.accountant == "rdp" else PRVAccountant()
        acc.history = [(sigma, q, n) for (sigma, q), n in merged.items()]
        return float(acc.get_epsilon(delta=self.delta))

    def noise_for_run(self, run_id: str, target_epsilon: float, sample_rate: float, steps: int) -> float:
        """The noise multiplier for this run: calibrated once so ``steps`` steps spend ``target_epsilon``."""
        if run_id not in self.calibrations:
            self.calibrations[run_id] = _calibrate(
                target_epsilon, self.delta, sample_rate, max(steps, 1), self.accountant
            )
            self.save()
        return self.calibrations[run_id]

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int, budget: float) -> float:
        """Record the planned steps before training and return the new total ε.

        Under an exclusive lock on the ledger, re-read it (another run at the same site may have
        trained meanwhile), refuse with :class:`BudgetExceeded` if the steps would pass ``budget``,
        else append and save. Spending is recorded before the data is touched, so a crash during
        training can only over-count, never under-count.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                current = PrivacyLedger.open(self.path.parent, self.delta, self.accountant)
                self.history, self.calibrations = current.history, {**current.calibrations, **self.calibrations}
            planned = self.epsilon([[noise_multiplier, sample_rate, steps]])
            if planned > budget + 1e-9:
                raise BudgetExceeded(
                    f"privacy budget exhausted: ε spent {self.epsilon():.2f}, this round would bring it to "
                    f"{planned:.2f} > budget {budget:.2f} (δ={self.delta:.2e})"
                )
            last = self.history[-1] if self.history else None
            if last and math.isclose(last[0], noise_multiplier) and math.isclose(last[1], sample_rate):
                last[2] += steps
            else:
                self.history.append([noise_multiplier, sample_rate, steps])
            self.save()
        return planned


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "hooks",
) -> tuple[nn.Module, Optimizer, DataLoader]:
    """Wrap model/optimizer/loader for DP-SGD with Poisson sampling (per-sample clipping + noise).

    ``grad_sample_mode`` is how Opacus computes per-sample gradients (``hooks``, ``functorch``, ...;
    ``benchmarks/segmentation_dp.py`` compares them).
    """
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
    )
    return private_model, private_optimizer, private_loader
